"""The memory-bound pre-passes of a W4A4 block at 720p, against their read/write floors.

Two kernels read every activation before the compute-bound kernels run:

* the activation quantization of each W4A4 linear (``kernels.act_quant``: a first pass for
  the row maximum and the low-rank projection, a second that writes e4m3); swept over its
  launches, including grid-stride launches with a few programs per SM, whose row blocks in
  flight fit in L2 so that the second pass re-reads from L2 instead of HBM;
* the K/V pre-pass of the 8-bit attention (``kernels.attention.quantize_kv``: statistics,
  then INT8 K and e4m3 V), on K and V as strided views of a fused q/k/v buffer;
* the q/k RMS-norm + rotary before it (``kernels.rope.qk_norm_rope``), against the same
  arithmetic as diffusers runs it, eagerly and ``torch.compile``-d (what a compiled block
  ran before wanquant's processor took it over);
* the block's residual + LayerNorm + modulation steps (``kernels.adaln.residual_norm``, not
  yet used by the block), against the same expressions eager and ``torch.compile``-d.

Every act_quant launch's output is checked against the default launch (e4m3 codes and row
scales bit for bit, the low-rank projection to 1e-6); the K/V codes against the PyTorch
reference (at most 1e-4 of them one rounding step apart: the means are summed in another
order); the q/k outputs against the PyTorch reference (at most 1e-3 of them one bf16 step
apart: the mean square is summed in another order). Floors use the copy bandwidth
measured in the same run. Medians of CUDA-event timings with the L2 flushed (``triton.testing.do_bench``).

    python -m benchmarks.prepass_speed --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common.meta import RESULTS_DIR, run_metadata, write_results
from wanquant.kernels import act_quant as A
from wanquant.kernels import adaln as N
from wanquant.kernels import attention as K
from wanquant.kernels import dispatch as D
from wanquant.kernels import rope as R

# (layer, K): the activation widths of a Wan block (qkv, o, cross q/o and FFN up read 5120)
ACT_SHAPES = {"qkv_o_ffnup": 5120, "ffn_down": 13824}
RANK = 32
ROPE_LAUNCHES = [(nw, rows) for nw in (4, 8, 16) for rows in (1, 2, 4, 8)]  # (num_warps, rows per program)
NORM_LAUNCHES = [(nw, rows) for nw in (8, 16) for rows in (1, 2, 4)]
HEADS, HEAD_DIM = 40, 128
# (block_m, block_k, num_warps, num_stages, programs per SM or None for one per block)
ACT_LAUNCHES = [(bm, bk, nw, 3, per_sm) for bm in (16, 32) for bk in (128, 256) for nw in (4, 8)
                for per_sm in (1, 2)] + [(64, 128, 8, 3, 1), (64, 128, 8, 3, 2)]


KERNELS = ("rope", "norm", "kv", "act")


def bench(fn, rep_ms: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=20, rep=rep_ms, return_mode="median"))


def copy_tbps(device: torch.device) -> float:
    a = torch.empty(1 << 29, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() / bench(lambda: b.copy_(a)) / 1e9


def act_rows(m: int, device: torch.device, tbps: float, sms: int, budget_s: float, t0: float,
             launches: list[tuple] = ACT_LAUNCHES) -> list[dict]:
    rows = []
    for layer, k in ACT_SHAPES.items():
        g = torch.Generator(device=device).manual_seed(k)
        x = (torch.randn(m, k, device=device, generator=g) * 2).to(torch.bfloat16)
        inv = 1.0 / (torch.rand(k, device=device, generator=g) + 0.5)
        l1 = (torch.randn(RANK, k, device=device, generator=g) * 0.05).to(torch.bfloat16)
        l1s = A.lowrank_weights(l1, inv)
        m_pad = A.pad_rows(m)
        floor_ms = (m * k * 3) / (tbps * 1e9)  # read bf16 once, write e4m3 once

        amax = A.row_absmax_reference(x, inv)

        def run(launch):
            bm, bk, bk1, nw, ns = D.fit_act_launch(launch[:4], A.padded_rank(RANK))
            progs = None if launch[4] is None else launch[4] * sms
            given = amax if len(launch) > 5 and launch[5] else None
            return lambda: A.act_quant(x, inv, l1s, 0.9, 0, nsplit=D.NSPLIT, m_pad=m_pad, block_m=bm, block_k=bk,
                                       block_k_lr=bk1, num_warps=nw, num_stages=ns, programs=progs, row_amax=given)

        default = (*D.act_launch_for(m, device), None)
        want = run(default)()
        # "+amax": one pass over x, the row maxima given (in a compiled block Inductor computes
        # them in the kernel that writes x); "amax alone": what they cost where nothing fuses them
        amax_alone = torch.compile(lambda: A.row_absmax_reference(x, inv))
        amax_ms = bench(amax_alone)
        rows.append({"kernel": "act_quant", "layer": layer, "M": m, "K": k, "launch": "row maxima alone (compiled)",
                     "ms": round(amax_ms, 4), "floor_ms": round(m * k * 2 / (tbps * 1e9), 4),
                     "floor_2read_ms": round(m * k * 2 / (tbps * 1e9), 4),
                     "check_ok": bool(torch.equal(amax_alone(), amax))})
        print(json.dumps(rows[-1]), flush=True)
        if layer == "ffn_down":  # the FFN's GELU applied on load (model/ffn_gelu.py)
            pre = x  # the pre-activation in its place
            bm, bk, bk1, nw, ns = D.fit_act_launch(default[:4], A.padded_rank(RANK))
            gelu_run = lambda: A.act_quant(pre, inv, l1s, 0.9, 0, nsplit=D.NSPLIT, m_pad=m_pad, block_m=bm,  # noqa: E731
                                           block_k=bk, block_k_lr=bk1, num_warps=nw, num_stages=ns, gelu_input=True)
            gelu_alone = torch.compile(lambda: torch.nn.functional.gelu(pre, approximate="tanh"))
            for name, fn, floor in (("GELU alone (compiled)", gelu_alone, m * k * 4 / (tbps * 1e9)),
                                    ("two passes, GELU applied on load", gelu_run, floor_ms)):
                rows.append({"kernel": "act_quant", "layer": layer, "M": m, "K": k, "launch": name,
                             "ms": round(bench(fn), 4), "floor_ms": round(floor, 4), "floor_2read_ms": round(floor, 4),
                             "check_ok": None})
                print(json.dumps(rows[-1]), flush=True)
        for launch in [default, (*default, True), *launches]:
            if time.time() - t0 > budget_s:
                break
            name = ("bm{}-bk{}-w{}-s{}".format(*launch[:4]) + ("" if launch[4] is None else f"-p{launch[4]}xSM")
                    + ("+amax" if len(launch) > 5 else ""))
            row = {"kernel": "act_quant", "layer": layer, "M": m, "K": k, "rank": RANK, "launch": name,
                   "default": launch is default, "floor_ms": round(floor_ms, 4),
                   "floor_2read_ms": round(floor_ms * 5 / 3, 4)}
            try:
                fn = run(launch)
                got = fn()
                row["check_ok"] = bool(torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
                                       and torch.equal(got.row_scale, want.row_scale)
                                       and (got.lowrank.float() - want.lowrank.float()).norm()
                                       <= 1e-6 * want.lowrank.float().norm())
                row["ms"] = round(bench(fn), 4)
                row["vs_floor"] = round(row["ms"] / floor_ms, 3)
            except Exception as e:  # a launch that does not fit (shared memory, registers)
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            print(json.dumps(row), flush=True)
            rows.append(row)
        del x
    return rows


def _baseline_and_ours(kernel: str, shape: dict, impls: dict, want, floor_ms: float,
                       steps_fn=R.rounding_steps, max_steps: int = 1, max_mismatch: float = 1e-3) -> list[dict]:
    """Time each of ``impls`` (name -> fn returning a tuple like ``want``); names starting
    with "wanquant" are checked against ``want``: ``steps_fn`` at most ``max_steps``, and
    nonzero in at most ``max_mismatch`` of the elements."""
    rows = []
    for name, fn in impls.items():
        ours = name.startswith("wanquant")
        row = {"kernel": kernel, **shape, "launch": name, "floor_ms": round(floor_ms, 4),
               "floor_2read_ms": round(floor_ms, 4)}
        try:
            got = fn()
            steps = torch.cat([steps_fn(a, b).flatten() for a, b in zip(got, want)])
            mismatch = (steps != 0).float().mean().item()
            # the baselines are not checked: Inductor may skip roundings between ops (its
            # compiled numbers differ from eager's by a few 16-bit steps)
            row["check_ok"] = bool(mismatch <= max_mismatch and steps.max().item() <= max_steps) if ours else None
            row["mismatch_fraction"] = mismatch
            row["ms"] = round(bench(fn), 4)
            row["vs_floor"] = round(row["ms"] / floor_ms, 3)
        except Exception as e:  # a launch that does not fit, a compile failure: recorded, the run goes on
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def norm_rows(s: int, device: torch.device, tbps: float) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(s + 2)
    c = HEADS * HEAD_DIM
    x = (torch.randn(1, s, c, device=device, generator=g) * 4).to(torch.bfloat16)
    y = torch.randn(1, s, c, device=device, generator=g).to(torch.bfloat16)
    gate, scale, shift = (torch.randn(3, 1, 1, c, device=device, generator=g) * 0.3).unbind(0)
    w, b = torch.rand(c, device=device, generator=g) + 0.5, torch.randn(c, device=device, generator=g) * 0.1
    steps = {"norm1 + modulation": (dict(x=x, scale=scale, shift=shift), 2),
             "gated residual + norm2": (dict(x=x, y=y, gate=gate, weight=w, bias=b), 4),
             "residual + norm3 + modulation": (dict(x=x, y=y, scale=scale, shift=shift), 4)}
    rows = []
    for step, (kw, tensors) in steps.items():
        floor_ms = tensors * s * c * 2 / (tbps * 1e9)
        want = N.residual_norm_reference(**kw)
        impls = {"diffusers eager": lambda kw=kw: N.residual_norm_reference(**kw),
                 "diffusers + torch.compile": torch.compile(lambda kw=kw: N.residual_norm_reference(**kw)),
                 "wanquant residual_norm (default)": lambda kw=kw: N.residual_norm(**kw)}
        for nw, r in NORM_LAUNCHES:
            impls[f"wanquant w{nw}-r{r}"] = lambda kw=kw, nw=nw, r=r: N.residual_norm(**kw, num_warps=nw,
                                                                                  rows_per_program=r)
        rows += _baseline_and_ours("residual_norm", {"S": s, "step": step}, impls, want, floor_ms)
    return rows


def kv_rows(s: int, device: torch.device, tbps: float) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(s)
    qkv = torch.randn(1, s, 3, HEADS, HEAD_DIM, device=device, generator=g).to(torch.bfloat16)
    k, v = qkv[:, :, 1], qkv[:, :, 2]
    n = s * HEADS * HEAD_DIM
    floor_ms = (2 * n * 2 + 2 * n) / (tbps * 1e9)  # read K and V (bf16) once, write INT8 K and e4m3 V
    want = K.quantize_kv_reference(k, v, v_perm=True)
    got = K.quantize_kv(k, v, v_perm=True)
    # the kernel sums the means in another order than PyTorch: a code or two may land on
    # the other side of a rounding tie (one step apart)
    diff = torch.cat([(got.k8.int() - want.k8.int()).flatten(),
                      (got.v8t.view(torch.uint8).int() - want.v8t.view(torch.uint8).int()).flatten()])
    mismatch = (diff != 0).float().mean().item()
    ok = mismatch <= 1e-4
    row = {"kernel": "quantize_kv", "S": s, "heads": HEADS, "head_dim": HEAD_DIM, "check_ok": bool(ok),
           "code_mismatch_fraction": mismatch, "ms": round(bench(lambda: K.quantize_kv(k, v, v_perm=True)), 4),
           "floor_ms": round(floor_ms, 4),
           "floor_2read_ms": round(floor_ms + 2 * n * 2 / (tbps * 1e9), 4)}
    row["vs_floor"] = round(row["ms"] / floor_ms, 3)
    print(json.dumps(row), flush=True)
    return [row]


def diffusers_qk(q, k, wq, wk, cos, sin, heads, eps):
    """Wan's self-attention steps as diffusers runs them: ``F.rms_norm`` (``nn.RMSNorm``), then
    its rotary on ``[B, T, heads, D]``."""
    def one(x, w):
        y = torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps).unflatten(2, (heads, -1))
        y1, y2 = y.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(y)
        out[..., 0::2] = y1 * cos[..., 0::2] - y2 * sin[..., 1::2]
        out[..., 1::2] = y1 * sin[..., 1::2] + y2 * cos[..., 0::2]
        return out
    return one(q, wq), one(k, wk)


def rope_rows(s: int, device: torch.device, tbps: float) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(s + 1)
    c = HEADS * HEAD_DIM
    qkv = (torch.randn(1, s, 3 * c, device=device, generator=g) * 3).to(torch.bfloat16)
    q, k = qkv[..., :c], qkv[..., c:2 * c]
    wq, wk = ((torch.rand(2, c, device=device, generator=g) + 0.5).to(torch.bfloat16)).unbind(0)
    angle = torch.arange(s, device=device, dtype=torch.float64)[:, None] * torch.rand(
        HEAD_DIM // 2, device=device, dtype=torch.float64, generator=g).repeat_interleave(2)[None]
    cos, sin = angle.cos()[None, :, None].float(), angle.sin()[None, :, None].float()  # float32, as diffusers'
    args = (q, k, wq, wk, cos, sin, HEADS, 1e-6)
    floor_ms = (2 * 2 * s * c * 2 + 2 * s * HEAD_DIM * 4) / (tbps * 1e9)  # q, k read + written; the tables
    want = R.qk_norm_rope_reference(*args)
    impls = {"diffusers eager": lambda: diffusers_qk(*args),
             "diffusers + torch.compile": torch.compile(lambda: diffusers_qk(*args)),
             "wanquant qk_norm_rope (default)": lambda: R.qk_norm_rope(*args)}
    for nw, rows in ROPE_LAUNCHES:
        impls[f"wanquant w{nw}-r{rows}"] = lambda nw=nw, rows=rows: R.qk_norm_rope(*args, num_warps=nw,
                                                                                   rows_per_program=rows)
    # per channel pair (see rope.pair_rounding_steps): the GPU's rsqrt and FMAs flip a few roundings
    return _baseline_and_ours("qk_norm_rope", {"S": s, "heads": HEADS, "head_dim": HEAD_DIM}, impls, want, floor_ms,
                              steps_fn=R.pair_rounding_steps, max_steps=2, max_mismatch=1e-2)


CHECK = {True: "ok", False: "FAIL", None: "baseline"}


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"- copy bandwidth: {meta['copy_TBps']:.2f} TB/s\n",
             "| kernel | shape | launch | ms | floor ms (1 read / 2 reads) | x floor | check |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"M={r['M']} K={r['K']}" if r["kernel"] == "act_quant" else f"S={r['S']}" + (
            f", {r['step']}" if "step" in r else "")
        launch = r.get("launch", "-") + (" (default)" if r.get("default") else "")
        ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "-")[:60]
        lines.append(f"| {r['kernel']} | {shape} | {launch} | {ms} | {r['floor_ms']:.3f} / {r['floor_2read_ms']:.3f} "
                     f"| {r.get('vs_floor', '-')} | {'error' if 'error' in r else CHECK[r.get('check_ok')]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--tokens", type=int, default=75600)
    ap.add_argument("--budget-s", type=float, default=200.0, help="later act_quant launches are skipped past it")
    ap.add_argument("--launches", nargs="*", help="act_quant launches to time besides the default, e.g. "
                    "bm16-bk128-w4-s3-p1xSM (default: a grid of block sizes, warps and programs per SM)")
    ap.add_argument("--kernels", nargs="*", default=list(KERNELS), choices=list(KERNELS),
                    help="which kernels' rows to measure (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prepass_speed needs a CUDA GPU")
    device = torch.device("cuda")
    t0 = time.time()
    meta = run_metadata()
    meta["copy_TBps"] = round(copy_tbps(device), 3)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rows = []
    if "rope" in args.kernels:
        rows += rope_rows(args.tokens, device, meta["copy_TBps"])
    if "norm" in args.kernels:
        rows += norm_rows(args.tokens, device, meta["copy_TBps"])
    if "kv" in args.kernels:
        rows += kv_rows(args.tokens, device, meta["copy_TBps"])
    if "act" in args.kernels:
        launches = ACT_LAUNCHES if args.launches is None else [(*l, p) for l, p in map(D.parse_act_launch, args.launches)]
        rows += act_rows(args.tokens, device, meta["copy_TBps"], sms, args.budget_s, t0, launches)
    write_results("prepass_speed", {**meta, "rows": rows}, markdown(meta, rows), Path(args.out))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
