"""SVDQuant/SmoothQuant smoothing: move activation outliers into the weights.

``x' = x * (1 / s)`` and ``W' = W diag(s)`` leave ``W x`` unchanged; with
``s_j = amax_x_j^a / amax_w_j^(1-a)`` large activation channels shrink and the
matching weight columns grow, which the low-rank branch then absorbs. The exponent
``a`` is searched with the whole quantizer in the loop (low-rank branch, 4-bit
weights, 4-bit activations) because the best value depends on all three.

Layering: ``formats`` -> ``numerics`` (here) -> ``method``: the formats, the alpha grid and
the low-rank settings arrive as explicit arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from wanquant.formats import GroupFormat
from wanquant.numerics.clip import subsample
from wanquant.numerics.lowrank import Method, lowrank_split
from wanquant.numerics.stats import LayerStats


def smoothing_scales(act_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float, max_ratio: float = 1e4) -> torch.Tensor:
    """``s = act_amax^alpha / w_amax^(1-alpha)`` (fp32 [K]), guarded.

    Channels where either maximum is 0 (never active, or an all-zero weight column)
    carry no information: they get the geometric mean of the other channels' scales.
    Scales are clamped to ``[g / max_ratio, g * max_ratio]`` around that mean ``g`` so
    that neither ``x'`` nor ``W'`` can blow up on a nearly dead channel.
    """
    if act_amax.shape != w_amax.shape or act_amax.ndim != 1:
        raise ValueError(f"act_amax {tuple(act_amax.shape)} and w_amax {tuple(w_amax.shape)} must be the same [K]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a, w = act_amax.float(), w_amax.float().to(act_amax.device)
    live = (a > 0) & (w > 0) & torch.isfinite(a) & torch.isfinite(w)
    if not bool(live.any()):
        return torch.ones_like(a)
    log_s = alpha * torch.log(a.clamp_min(1e-30)) - (1.0 - alpha) * torch.log(w.clamp_min(1e-30))
    g = log_s[live].mean()
    r = math.log(max_ratio)
    log_s = torch.minimum(torch.maximum(torch.where(live, log_s, g), g - r), g + r)
    return torch.exp(log_s)


class SmoothResult(NamedTuple):
    smooth: torch.Tensor  # fp32 [K]
    alpha: float | None  # None when no search ran
    errors: dict[float, float]  # alpha -> objective
    identity_error: float  # the objective with s = 1, for reference
    objective: str  # "output" (reservoir tokens) or "hessian" (weight error only, no tokens)


def _act_amax(stats: LayerStats, act_quantile: float) -> torch.Tensor:
    if act_quantile < 1.0 and stats.act_quantile is not None:
        return stats.act_quantile
    return stats.act_absmax


def _pooled_tokens(stats: LayerStats, max_tokens: int, seed: int) -> torch.Tensor | None:
    parts = [subsample(t, max_tokens, seed + b) for b, t in sorted(stats.reservoirs.items()) if len(t)]
    return subsample(torch.cat(parts), max_tokens, seed) if parts else None


def search_smoothing(
    weight: torch.Tensor, stats: LayerStats, wfmt: GroupFormat, afmt: GroupFormat, alphas: Sequence[float] | None,
    *, act_quantile: float = 1.0, max_tokens: int = 4096, rank: int = 0, lowrank_method: Method = "randomized",
    oversample: int = 16, n_iter: int = 4, seed: int = 0,
) -> SmoothResult:
    """Try each ``a`` in ``alphas``; return the best scales and all errors (``alphas`` None: s = 1).

    Objective: ``||y - y_ref||^2 / ||y_ref||^2`` on pooled reservoir tokens (at most
    ``max_tokens``), ``y_ref = x W^T``, ``y = Q(x') Q(R)^T + x' L1^T L2^T`` with
    round-to-nearest weights in ``wfmt`` and unclipped activations in ``afmt`` (GPTQ and
    clip search are too slow for the loop and refine later). The rank-``rank`` branch is
    found with ``lowrank_method`` (``oversample``, ``n_iter`` for ``randomized``);
    ``activation_aware`` uses the Hessian moved into each candidate's smoothed space.
    Without tokens the objective falls back to the Hessian-weighted weight error
    ``tr(dW H dW^T)``, which ignores activation quantization. ``act_quantile < 1`` uses
    the stats' per-channel quantile instead of the maximum, where there is one.
    """
    w = weight.float()
    dev = w.device
    act = _act_amax(stats, act_quantile).to(dev)
    w_amax = w.abs().amax(0)
    x = _pooled_tokens(stats, max_tokens, seed)
    objective = "output" if x is not None else "hessian"
    aware = lowrank_method == "activation_aware"
    h = stats.hessian.to(dev, torch.float32) if (x is None or aware) else None
    if x is not None:
        x = x.to(dev, torch.float32)
        y_ref = x @ w.T
        den = float(y_ref.double().square().sum())
    else:
        den = float(((w @ h) * w).sum())

    def err(s: torch.Tensor) -> float:
        inv = 1.0 / s
        hs = h * inv[:, None] * inv[None, :] if aware else None  # Hessian of x' = x / s
        l1, l2, r = lowrank_split(w * s, rank, lowrank_method, hs, oversample, n_iter, seed)
        rq = wfmt.fake_quantize(r)
        if x is None:
            d = (rq + l2 @ l1) * inv - w  # back in the original space
            return float(((d @ h) * d).sum()) / den if den > 0 else 0.0
        xs = x * inv
        y = afmt.fake_quantize(xs) @ rq.T + (xs @ l1.T) @ l2.T
        return float((y - y_ref).double().square().sum()) / den if den > 0 else 0.0

    ident = err(torch.ones_like(w_amax))
    if alphas is None:
        return SmoothResult(torch.ones_like(w_amax), None, {}, ident, objective)
    errors: dict[float, float] = {}
    best, best_s = None, None
    for a in alphas:
        s = smoothing_scales(act, w_amax, a)
        errors[float(a)] = e = err(s)
        if best is None or e < errors[best]:
            best, best_s = float(a), s
    if best_s is None:
        raise ValueError("alphas is empty; pass None to turn smoothing off")
    return SmoothResult(best_s.float(), best, errors, ident, objective)
