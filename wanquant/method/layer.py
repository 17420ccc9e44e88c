"""One linear layer of one expert: the per-layer pipeline and the reference forward.

Layering: ``formats`` -> ``numerics`` -> ``method`` (here) -> ``kernels`` / ``runtime``.
:func:`quantize_layer` translates a :class:`~wanquant.method.config.QuantConfig` into the
explicit arguments of the numerics (smoothing, low-rank, GPTQ, clip tables);
:func:`reference_forward` is the one PyTorch definition of what a quantized layer
computes (the runtime's ``reference`` backend, the ground truth of every kernel).

All work runs on ``weight``'s device in fp32 (put the weight on the GPU for real Wan
shapes); the returned tensors live there too. Runtime convention, which the kernels
rely on for bit-exactness: the layer input is smoothed as ``x.float() * (1.0 / smooth)``.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from typing import Any

import torch

from wanquant.formats import GroupFormat, pack_nibbles
from wanquant.method.config import ClipConfig, QuantConfig
from wanquant.method.params import QuantizedLinearParams
from wanquant.numerics.clip import clip_table, subsample
from wanquant.numerics.gptq import gptq_quantize, hessian_weighted_error
from wanquant.numerics.lowrank import lowrank_split
from wanquant.numerics.smooth import SmoothResult, search_smoothing
from wanquant.numerics.stats import LayerStats


def reference_forward(p: QuantizedLinearParams, x: torch.Tensor, wfmt: GroupFormat, afmt: GroupFormat,
                      clip_ratio: float, exp_offset: int, with_bias: bool = True) -> torch.Tensor:
    """``Q(x'; clip_ratio, exp_offset) Wq^T + (x' L1^T) L2^T + b`` in fp32 for ``x [..., K]``, x' = x / s."""
    xs = x.float() * (1.0 / p.smooth)  # the fp32 reciprocal, exactly as the kernels do
    y = afmt.fake_quantize(xs, clip_ratio, exp_offset) @ p.dequantized_weight(wfmt).T
    if p.rank:
        y = y + (xs @ p.l1.to(xs.device, torch.float32).T) @ p.l2.to(xs.device, torch.float32).T
    if with_bias and p.bias is not None:
        y = y + p.bias.to(xs.device, torch.float32)
    return y


def output_error(p: QuantizedLinearParams, weight: torch.Tensor, x: torch.Tensor, bin_index: int,
                 cfg: QuantConfig) -> float:
    """``||y_q - y||^2 / ||y||^2`` against the full-precision layer (bias excluded) in bin ``bin_index``."""
    x = x.to(weight.device)
    y = x.float() @ weight.float().T
    c, o = p.clip_table[bin_index].tolist()
    d = reference_forward(p, x, cfg.weight_format, cfg.act_format, c, int(o), with_bias=False) - y
    den = float(y.double().square().sum())
    return float(d.double().square().sum()) / den if den > 0 else 0.0


@contextmanager
def tf32_matmul(device: torch.device, enabled: bool = True):
    """fp32 matmuls on ``device`` in TF32 inside the block (CUDA only; the flag is restored).

    For the searches, whose objectives only rank candidates. Uses whichever of torch's two
    TF32 switches is in use: mixing them is an error on torch >= 2.9.
    """
    if not enabled or torch.device(device).type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    try:
        name, old, new = "allow_tf32", m.allow_tf32, True
    except RuntimeError:  # the new API was used: keep to it
        name, old, new = "fp32_precision", m.fp32_precision, "tf32"
    setattr(m, name, new)
    try:
        yield
    finally:
        setattr(m, name, old)


def search_clip_table(clip: ClipConfig, reservoirs: dict[int, torch.Tensor], w_deq: torch.Tensor,
                      afmt: GroupFormat, num_bins: int, smooth: torch.Tensor | None = None,
                      seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`wanquant.numerics.clip.clip_table` with the grids and switches of ``clip``."""
    with tf32_matmul(w_deq.device, clip.tf32):
        return clip_table(reservoirs, w_deq, afmt, num_bins, clip.clip_ratios, clip.exp_offsets,
                          max_tokens=clip.max_tokens, per_bin=clip.per_bin, enabled=clip.enabled, smooth=smooth,
                          seed=seed)


def _smoothing(w: torch.Tensor, stats: LayerStats, cfg: QuantConfig, seed: int) -> SmoothResult:
    lr = cfg.lowrank
    # The search only ranks alphas, so a randomized branch does unless the branch itself
    # depends on the (smoothed) Hessian.
    method = "activation_aware" if lr.method == "activation_aware" else "randomized"
    with tf32_matmul(w.device, cfg.smooth.tf32):
        return search_smoothing(
            w, stats, cfg.weight_format, cfg.act_format, cfg.smooth.alpha_grid if cfg.smooth.enabled else None,
            act_quantile=cfg.smooth.act_quantile, max_tokens=cfg.clip.max_tokens, rank=lr.rank, lowrank_method=method,
            oversample=lr.randomized_oversample, n_iter=lr.randomized_iters, seed=seed)


def _validate(weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats, cfg: QuantConfig,
              num_bins: int, who: str) -> None:
    """Raise a clear error, naming the layer, for anything that would quantize to garbage."""
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"{who}: weight must be a floating-point [N, K] tensor, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    for fmt in (cfg.weight_format, cfg.act_format):
        if k % fmt.group_size:
            raise ValueError(f"{who}: K = {k} is not a multiple of the group size {fmt.group_size} of "
                             f"{fmt.describe()}; keep this layer in 16-bit")
    if not 0 <= cfg.lowrank.rank <= min(n, k):
        raise ValueError(f"{who}: low-rank rank {cfg.lowrank.rank} exceeds min(N, K) = {min(n, k)}")
    if num_bins < 1:
        raise ValueError(f"{who}: num_bins must be >= 1, got {num_bins}")
    checks: list[tuple[str, torch.Tensor | None, tuple[int, ...]]] = [
        ("weight", weight, (n, k)), ("bias", bias, (n,)), ("act_absmax", stats.act_absmax, (k,)),
        ("act_quantile", stats.act_quantile, (k,)), ("hessian", stats.hessian, (k, k)),
    ] + [(f"reservoir[{b}]", t, (t.shape[0], k)) for b, t in stats.reservoirs.items()]
    for what, t, shape in checks:
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{who}: {what} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point():
            raise TypeError(f"{who}: {what} must be floating point, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{who}: {what} contains NaN or Inf")
    bad = [b for b in stats.reservoirs if not 0 <= b < num_bins]
    if bad:
        raise ValueError(f"{who}: reservoir bins {bad} outside [0, {num_bins})")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def quantize_layer(weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats, cfg: QuantConfig,
                   num_bins: int, name: str = "", seed: int = 0) -> QuantizedLinearParams:
    """Quantize ``y = weight x + bias`` (``weight [N, K]``) with calibration ``stats`` of one expert.

    Pipeline (``report["seconds"]`` times each stage; "smooth" includes reading the
    statistics onto the device): smoothing search (s = 1 when disabled), low-rank split of ``W diag(s)`` with
    bf16 factors, GPTQ of the residual against the smoothed-space Hessian
    ``diag(1/s) H diag(1/s)`` (round-to-nearest when disabled), per-bin activation clip
    search, and the final relative output error per bin on the reservoir tokens.
    """
    who = f"layer {name!r}" if name else "layer"
    dev, t0 = weight.device, time.perf_counter()
    # The reservoirs (host memory) are read by every stage: moved to the weight's device once.
    stats = dataclasses.replace(stats, reservoirs={b: x.to(dev) for b, x in stats.reservoirs.items()})
    _validate(weight, bias, stats, cfg, num_bins, who)
    wfmt, afmt = cfg.weight_format, cfg.act_format
    seconds: dict[str, float] = {}

    def lap(stage: str, start: float) -> float:
        _sync(dev)
        now = time.perf_counter()
        seconds[stage] = now - start
        return now

    w = weight.float()
    sm = _smoothing(w, stats, cfg, seed)
    s = sm.smooth.to(dev)
    inv = 1.0 / s
    t = lap("smooth", t0)
    ws = w * s
    h = stats.hessian.to(dev, torch.float32, copy=True)
    h.mul_(inv[:, None]).mul_(inv[None, :])  # Hessian of x' = x / s
    lr = cfg.lowrank
    aware = lr.method == "activation_aware"
    l1, l2, _ = lowrank_split(ws, lr.rank, lr.method, h if aware else None, lr.randomized_oversample,
                              lr.randomized_iters, seed)
    l1b, l2b = l1.bfloat16(), l2.bfloat16()
    resid = ws - l2b.float() @ l1b.float()  # the residual absorbs the bf16 rounding of the branch
    t = lap("lowrank", t)
    if cfg.gptq.enabled:
        g = cfg.gptq
        qz, deq, ginfo = gptq_quantize(resid, h, wfmt, g.block_size, g.damp, g.max_damp_retries, g.act_order, name,
                                       cuda_graph=g.cuda_graph)
    else:
        qz = wfmt.quantize(resid)
        deq, ginfo = wfmt.dequantize(qz), {"fallback": None}
    ginfo = {"enabled": cfg.gptq.enabled, **ginfo, "weighted_rel_err": hessian_weighted_error(resid, deq, h)}
    if cfg.gptq.enabled:
        ginfo["rtn_weighted_rel_err"] = hessian_weighted_error(resid, wfmt.dequantize(wfmt.quantize(resid)), h)
    del h
    t = lap("gptq", t)
    table, creport = search_clip_table(cfg.clip, stats.reservoirs, deq, afmt, num_bins, smooth=s, seed=seed)
    t = lap("clip", t)
    params = QuantizedLinearParams(
        qweight=pack_nibbles(qz.codes), wscales=qz.scales, smooth=s.float().contiguous(), l1=l1b, l2=l2b,
        bias=None if bias is None else bias.to(dev, torch.bfloat16), clip_table=table.to(dev), report={},
    )
    params.validate(wfmt)
    per_bin = {b: output_error(params, weight, subsample(x, cfg.clip.max_tokens, seed + b), b, cfg)
               for b, x in sorted(stats.reservoirs.items()) if len(x)}
    t = lap("eval", t)
    seconds["total"] = t - t0
    energy = float((l2 @ l1).square().sum() / ws.square().sum().clamp_min(1e-30)) if lr.rank else 0.0
    params.report = _json({
        "name": name, "shape": [w.shape[0], w.shape[1]], "weight_format": wfmt.to_dict(),
        "act_format": afmt.to_dict(),
        "smooth": {"enabled": cfg.smooth.enabled, "alpha": sm.alpha, "errors": sm.errors,
                   "identity_error": sm.identity_error, "objective": sm.objective},
        "lowrank": {"method": lr.method, "rank": lr.rank, "energy_fraction": energy},
        "gptq": ginfo, "clip": creport,
        "final": {"rel_err_per_bin": per_bin, "rel_err": sum(per_bin.values()) / len(per_bin) if per_bin else None},
        "seconds": seconds,
    })
    return params


def _json(v: Any) -> Any:
    """Plain JSON types only (dict keys as str, tensors and numpy scalars as lists/floats)."""
    if isinstance(v, dict):
        return {str(k): _json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v
