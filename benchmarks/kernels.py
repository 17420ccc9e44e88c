"""Benchmark of the Hopper W4A4 layer against cuBLAS BF16 and the unpack-to-BF16 path.

For each Wan linear shape and token count M it times (median of CUDA-event timings,
warm-up, two rotating inputs):

* ``bf16``: ``F.linear(x, W_bf16, bias)`` (cuBLAS);
* ``w4a4``: the whole fast layer (:class:`wanquant.kernels.dispatch.FastW4A4`), with the
  variant chosen below, and its pieces (activation kernel, weight expansion, GEMM);
* ``unpack_bf16``: the paper's simulation path, the library's own
  :meth:`~wanquant.runtime.linear.W4A4Linear.forward_unpack_bf16` (dequantize the packed
  weight to bf16 each call, quantize-dequantize the activation in PyTorch, bf16 matmul);
* at the middle M it also sweeps activation-kernel and GEMM variants (Triton pointer/TMA
  tiles, cuBLAS ``_scaled_mm`` + ``addmm_``) and keeps the fastest for the other Ms.

Usage (on the GPU machine)::

    python -m benchmarks.kernels --out benchmarks/results            # full run
    python -m benchmarks.kernels --quick --out /tmp/kernels          # one shape, one M
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.common.meta import RESULTS_DIR, run_metadata
from wanquant.formats import MXFP4
from wanquant.kernels import act_quant as A
from wanquant.kernels import dispatch as D
from wanquant.kernels import gemm as G
from wanquant.method.params import QuantizedLinearParams
from wanquant.runtime.linear import W4A4Linear

SHAPES = {  # layer: (K, N)
    "qkv": (5120, 15360),
    "o": (5120, 5120),
    "ffn_up": (5120, 13824),
    "ffn_down": (13824, 5120),
}
MS = (8192, 32760, 75600)
SWEEP_M = 32760
RANK = 32

# Run 2 swept 6 activation and 8 GEMM variants (benchmarks/KERNEL_NOTES.md); the final
# run re-times the leaders.
ACT_VARIANTS = {  # name: (block_m, block_k, num_warps, num_stages); swept at every M
    "bm128-bk64-w8-s3": (128, 64, 8, 3),
    "bm64-bk128-w8-s3": (64, 128, 8, 3),
    "bm64-bk64-w4-s3": (64, 64, 4, 3),
    "bm32-bk64-w4-s3": (32, 64, 4, 3),
}
GEMM_VARIANTS = [
    G.GemmConfig(),
    G.GemmConfig(split_epilogue=False),
    G.GemmConfig(group_m=16),
]

LOG: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def bench(fn: Callable[[], object], rep_ms: int = 150) -> float:
    """Median milliseconds of ``fn`` (CUDA events via triton's do_bench, L2 flushed)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=30, rep=rep_ms, return_mode="median"))


def make_params(k: int, n: int, device: torch.device, seed: int = 0) -> QuantizedLinearParams:
    """Random packed MXFP4 layer (values do not change kernel time; random, never zeros)."""
    g = torch.Generator(device=device).manual_seed(seed)
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device, generator=g)
    wscales = torch.randint(117, 123, (n, k // 32), dtype=torch.uint8, device=device, generator=g)
    smooth = torch.rand(k, device=device, generator=g) * 1.5 + 0.5
    l1 = (torch.randn(RANK, k, device=device, generator=g) * 0.02).to(torch.bfloat16)
    l2 = (torch.randn(n, RANK, device=device, generator=g) * 0.02).to(torch.bfloat16)
    bias = (torch.randn(n, device=device, generator=g) * 0.1).to(torch.bfloat16)
    clip = torch.tensor([[0.9, 0.0]], device=device)
    return QuantizedLinearParams(qweight, wscales, smooth, l1, l2, bias, clip)


def make_inputs(m: int, k: int, device: torch.device, count: int = 2) -> list[torch.Tensor]:
    """``count`` bf16 activation sets with outlier channels (rotated between timed calls)."""
    out = []
    for i in range(count):
        g = torch.Generator(device=device).manual_seed(100 + i)
        x = torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16)
        x[:, :: max(1, k // 40)] *= 10.0
        out.append(x)
    return out


def rotating(fn: Callable[[torch.Tensor], object], xs: list[torch.Tensor]) -> Callable[[], object]:
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(xs)
        return fn(xs[state["i"]])

    return call


def reference_rows(x: torch.Tensor, p: QuantizedLinearParams, w_deq: torch.Tensor, clip: float, off: int) -> torch.Tensor:
    """fp64 reference forward for a few rows (GPU; fp32 quantization math, fp64 products).

    Not :func:`wanquant.method.layer.reference_forward`: the same quantization math, but
    its products accumulate in fp32, and the results (KERNEL_NOTES.md) are errors against fp64.
    """
    xs = x.float() * (1.0 / p.smooth)
    xq = MXFP4.fake_quantize(xs, clip, off).double()
    return xq @ w_deq.T + (xs.double() @ p.l1.double().T) @ p.l2.double().T + p.bias.double()


def try_time(name: str, fn: Callable[[], object], row: dict, rep_ms: int = 150) -> float | None:
    try:
        fn()
        torch.cuda.synchronize()
        ms = bench(fn, rep_ms)
        row[name] = round(ms, 4)
        return ms
    except Exception as e:  # a variant that fails to compile or run is recorded, not fatal
        row[name] = None
        log(f"  {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc(limit=2)
        return None


def ceilings(device: torch.device) -> dict:
    """Measured copy bandwidth and BF16 / FP8 matmul rates on this GPU."""
    out = {}
    a = torch.empty(2**30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    out["copy_TBps"] = round(2 * a.numel() / ms / 1e9, 3)
    del a, b
    n = 8192
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = bench(lambda: x @ y.T)
    out["bf16_8192_TFLOPs"] = round(2 * n**3 / ms / 1e9, 1)
    x8, y8 = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn)
    sa, sb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
    for fast in (True, False):
        ms = bench(lambda: torch._scaled_mm(x8, y8.t(), sa, sb, out_dtype=torch.bfloat16, use_fast_accum=fast))
        out[f"fp8_rowwise_8192_TFLOPs_fastacc{int(fast)}"] = round(2 * n**3 / ms / 1e9, 1)
    return out


def bench_shape(layer: str, m: int, device: torch.device, choice: dict, sweep: bool) -> dict:
    k, n = SHAPES[layer]
    flops = 2.0 * m * n * k
    row: dict = {"layer": layer, "M": m, "K": k, "N": n}
    p = make_params(k, n, device)
    clip, off = 0.9, 0
    xs = make_inputs(m, k, device)
    w_deq = p.dequantized_weight(MXFP4)  # fp32, exact
    w_bf16 = w_deq.to(torch.bfloat16)

    bf16 = try_time("bf16_ms", rotating(lambda x: F.linear(x, w_bf16, p.bias), xs), row)
    del w_bf16

    fast_t = D.FastW4A4.prepare(p, MXFP4, device, backend="triton")
    fast_c = D.FastW4A4.prepare(p, MXFP4, device, backend="cublas")
    row["w4a4_memory_bytes"] = fast_t.memory_bytes()
    row["bf16_weight_bytes"] = n * k * 2

    # ---- pieces; sweep variants at the middle M ----
    act_names = list(ACT_VARIANTS)  # cheap: swept at every M (the grid size matters)
    act_times = {}
    for name in act_names:
        bm, bk, nw, ns = ACT_VARIANTS[name]
        fn = rotating(lambda x, bm=bm, bk=bk, nw=nw, ns=ns: A.act_quant(
            x, fast_t.inv_smooth, fast_t.l1s, clip, off, nsplit=D.NSPLIT, m_pad=A.pad_rows(m),
            block_m=bm, block_k=bk, num_warps=nw, num_stages=ns), xs)
        act_times[name] = try_time(f"act[{name}]_ms", fn, row)
    best_act = min((v, kk) for kk, v in act_times.items() if v is not None)[1]
    choice["act"][layer] = best_act
    bm, bk, nw, ns = ACT_VARIANTS[best_act]
    for f in (fast_t, fast_c):
        f.act_launch = (bm, bk, nw, ns)
    row["act_dispatch_choice"] = "bm{}-bk{}-w{}-s{}".format(*D.act_launch_for(m, device))
    row["act_variant"] = best_act
    row["act_ms"] = act_times[best_act]
    # the same kernel without the low-rank dot: what the fused projection costs
    try_time("act_nolowrank_ms", rotating(lambda x: A.act_quant(
        x, fast_t.inv_smooth, None, clip, off, m_pad=A.pad_rows(m), block_m=bm, block_k=bk, num_warps=nw,
        num_stages=ns), xs), row)
    act_bytes = m * k * 2 + m * k  # read x once, write e4m3 once (the floor)
    row["act_floor_ms"] = round(act_bytes / (choice["copy_TBps"] * 1e9), 4)
    row["act_2read_floor_ms"] = round((act_bytes + m * k * 2) / (choice["copy_TBps"] * 1e9), 4)

    row["expand_ms"] = try_time("expand_ms", lambda: fast_t.expand_weight(), row)
    row["expand_floor_ms"] = round(n * k * (1.5 + 1 / 32) / (choice["copy_TBps"] * 1e9), 4)
    aq_t = fast_t.quantize_input(xs[0], clip, off)
    aq_c = fast_c.quantize_input(xs[0], clip, off)
    w8 = fast_t.expand_weight().clone()
    out = torch.empty(aq_t.q.shape[0], n, dtype=torch.bfloat16, device=device)

    cfgs = GEMM_VARIANTS if sweep else [choice["gemm"][layer]]
    gemm_times = {}
    for cfg in cfgs:
        fast_t.gemm_config = cfg
        gemm_times[cfg] = try_time(f"gemm_triton[{cfg.describe()}]_ms", lambda: fast_t.gemm(aq_t, w8, out=out), row)
    ok = {c: v for c, v in gemm_times.items() if v is not None}
    best_cfg = min(ok, key=ok.get) if ok else G.DEFAULT_CONFIG
    choice["gemm"][layer] = best_cfg
    fast_t.gemm_config = best_cfg
    row["gemm_triton_variant"] = best_cfg.describe()
    row["gemm_triton_ms"] = gemm_times.get(best_cfg)
    if row["gemm_triton_ms"]:
        row["gemm_triton_TFLOPs"] = round(flops / row["gemm_triton_ms"] / 1e9, 1)

    # bf16-only low-rank activations (no lo half): half the init dot, smem for a 4th stage
    r_pad = fast_t.l1s.shape[1] // 2
    lr1, l21 = aq_t.lowrank[:, :r_pad].contiguous(), fast_t.l2cat[:, :r_pad].contiguous()
    try_time("gemm_triton_lr1_s4_ms", lambda: G.gemm_triton(
        aq_t.q, aq_t.row_scale, w8, fast_t.w_row_scale, lr1, l21, fast_t.bias, out=out,
        config=G.GemmConfig(num_stages=4)), row)
    for fast_acc in (True, False):
        try_time(f"scaled_mm_fastacc{int(fast_acc)}_ms", lambda fa=fast_acc: torch._scaled_mm(
            aq_c.q, w8.t(), aq_c.row_scale.view(-1, 1), fast_c.w_row_scale.view(1, -1), bias=p.bias,
            out_dtype=torch.bfloat16, use_fast_accum=fa, out=out), row)
    try_time("lowrank_addmm_ms", lambda: out.addmm_(aq_c.lowrank, fast_c.l2cat.t()), row)
    row["gemm_cublas_ms"] = try_time("gemm_cublas_ms", lambda: fast_c.gemm(aq_c, w8, out=out), row)
    if row.get("scaled_mm_fastacc1_ms"):
        row["scaled_mm_TFLOPs"] = round(flops / row["scaled_mm_fastacc1_ms"] / 1e9, 1)
    del aq_t, aq_c, w8, out

    # ---- whole layers ----
    w_t = try_time("w4a4_triton_ms", rotating(lambda x: fast_t(x, clip, off), xs), row)
    w_c = try_time("w4a4_cublas_ms", rotating(lambda x: fast_c(x, clip, off), xs), row)
    best = min((v, name) for name, v in (("triton", w_t), ("cublas", w_c)) if v is not None)
    row["w4a4_backend"] = best[1]
    row["w4a4_ms"] = round(best[0], 4)
    if bf16:
        row["speedup_vs_bf16"] = round(bf16 / best[0], 3)
        row["bf16_TFLOPs"] = round(flops / bf16 / 1e9, 1)
    row["w4a4_TFLOPs"] = round(flops / best[0] / 1e9, 1)
    try:
        unpack = W4A4Linear.from_params(p, MXFP4, MXFP4)
        up = try_time("unpack_bf16_ms", rotating(lambda x: unpack.forward_unpack_bf16(x, clip, off), xs), row,
                      rep_ms=100)
        if up:
            row["speedup_vs_unpack"] = round(up / best[0], 3)
    except torch.OutOfMemoryError:
        row["unpack_bf16_ms"] = None
    unpack = None
    torch.cuda.empty_cache()

    # ---- error vs the fp64 reference on the first rows ----
    rows = min(m, 256)
    ref = reference_rows(xs[0][:rows], p, w_deq.double(), clip, off)
    for name, f in (("triton", fast_t), ("cublas", fast_c)):
        y = f(xs[0], clip, off)[:rows].double()
        row[f"max_rel_err_{name}"] = float(((y - ref).abs().max() / ref.abs().max()).item())
        row[f"rel_fro_err_{name}"] = float(((y - ref).norm() / ref.norm()).item())
    row["max_rel_err"] = row[f"max_rel_err_{row['w4a4_backend']}"]
    del xs, w_deq, fast_t, fast_c
    torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| layer | M | K | N | bf16 ms | W4A4 ms | backend | speedup | unpack-bf16 ms | act ms (floor 1 read / 2 reads) "
            "| expand ms | GEMM ms (triton / cuBLAS+addmm) | max rel err |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def f(key, fmt="{:.3f}"):
            v = r.get(key)
            return "-" if v is None else fmt.format(v)

        lines.append(
            f"| {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {f('bf16_ms')} | {f('w4a4_ms')} | "
            f"{r.get('w4a4_backend', '-')} | {f('speedup_vs_bf16', '{:.2f}x')} | {f('unpack_bf16_ms')} | "
            f"{f('act_ms')} ({f('act_floor_ms')} / {f('act_2read_floor_ms')}) | {f('expand_ms')} | {f('gemm_triton_ms')} / {f('gemm_cublas_ms')} | "
            f"{f('max_rel_err', '{:.2e}')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--quick", action="store_true", help="one shape at M=8192, no sweep")
    ap.add_argument("--layers", default=",".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--commit", default=None, help="git commit of the tree (where the run has no .git)")
    args = ap.parse_args()
    device = torch.device("cuda")
    t0 = time.time()
    meta = run_metadata()
    import triton

    if args.commit:
        meta["commit"] = args.commit
    meta.update(torch=torch.__version__, triton=triton.__version__,
                scaled_mm_bias=G.scaled_mm_supports_bias(device))
    ceil = ceilings(device)
    log(f"meta {meta}\nceilings {ceil}")
    choice = {"act": {}, "gemm": {}, "copy_TBps": ceil["copy_TBps"]}
    layers = args.layers.split(",")
    ms = [int(v) for v in args.ms.split(",")]
    if args.quick:
        layers, ms = layers[:1], [8192]
    order = [SWEEP_M] + [v for v in ms if v != SWEEP_M] if SWEEP_M in ms else ms
    rows = []
    out_dir = Path(args.out)
    for m in order:
        for layer in layers:
            sweep = m == order[0]
            log(f"== {layer} M={m} (sweep={sweep}) t={time.time() - t0:.0f}s")
            row = bench_shape(layer, m, device, choice, sweep)
            rows.append(row)
            log("   " + json.dumps({k: v for k, v in row.items() if not k.startswith(("act[", "gemm_triton["))}))
            payload = {**meta, "ceilings": ceil, "rows": sorted(rows, key=lambda r: (list(SHAPES).index(r["layer"]), r["M"]))}
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "kernels.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(payload["rows"])
    header = "\n".join(f"- {k}: `{meta[k]}`" for k in ("device", "date", "commit", "command"))
    (out_dir / "kernels.md").write_text(f"# kernels\n\n{header}\n- ceilings: `{ceil}`\n\n{table}\n")
    (out_dir / "kernels.log").write_text("\n".join(LOG) + "\n")
    log(table)
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
