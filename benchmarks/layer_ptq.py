"""Speed of the per-layer PTQ pipeline at Wan2.2 A14B shapes (GPU).

Times :func:`wanquant.method.layer.quantize_layer` (smoothing search, SVD, GPTQ,
clip search, final evaluation) on synthetic statistics: a Hessian from random
correlated tokens and 3 bins of token reservoirs. Estimates one expert's 40 blocks:

* separate q/k/v: 8 x (5120 x 5120) + FFN up (N=13824, K=5120) + FFN down (N=5120, K=13824)
  = 10 linears a block, 400 an expert;
* fused self-attention q/k/v (one N=15360 call sharing smooth and L1):
  1 x qkv + 5 x (5120 x 5120) + up + down = 8 calls a block (still the same 400 weights).

    python -m benchmarks.layer_ptq [--out-dir DIR] [--commit HASH]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common.meta import run_metadata, write_results
from benchmarks.common.meters import cuda_sync
from wanquant.method.config import QuantConfig
from wanquant.method.layer import quantize_layer
from wanquant.numerics.lowrank import lowrank_split
from wanquant.numerics.stats import LayerStats

SHAPES = {"5120x5120": (5120, 5120), "N13824xK5120 (ffn up)": (13824, 5120),
          "N5120xK13824 (ffn down)": (5120, 13824), "N15360xK5120 (fused qkv)": (15360, 5120)}
BLOCKS = 40


def synthetic_stats(k: int, bins: int, res_tokens: int, h_tokens: int, dev: torch.device, seed: int) -> LayerStats:
    """Correlated heavy-ish tokens: channel scales, 16 shared factors, a few outlier channels."""
    g = torch.Generator(device=dev).manual_seed(seed)
    chan = torch.exp(0.8 * torch.randn(k, device=dev, generator=g))
    fac = torch.randn(16, k, device=dev, generator=g) * 0.5
    out = torch.randperm(k, device=dev, generator=g)[:16]

    def tokens(t: int) -> torch.Tensor:
        x = torch.randn(t, k, device=dev, generator=g) * chan + torch.randn(t, 16, device=dev, generator=g) @ fac
        x[:, out] *= 30.0
        return x

    h = torch.zeros(k, k, device=dev)
    amax = torch.zeros(k, device=dev)
    for i in range(0, h_tokens, 4096):
        x = tokens(min(4096, h_tokens - i))
        h.addmm_(x.T, x)
        amax = torch.maximum(amax, x.abs().amax(0))
    res = {b: tokens(res_tokens) for b in range(bins)}
    for r in res.values():
        amax = torch.maximum(amax, r.abs().amax(0))
    return LayerStats(amax, None, h, h_tokens, res, {b: res_tokens for b in res})


def time_layer(n: int, k: int, cfg: QuantConfig, args, dev: torch.device) -> dict:
    stats = synthetic_stats(k, 3, args.reservoir, args.hessian_tokens, dev, seed=k + n)
    w = (torch.randn(n, k, device=dev) / k**0.5).bfloat16()
    b = torch.randn(n, device=dev).bfloat16()
    cuda_sync(dev)
    t = time.perf_counter()
    p = quantize_layer(w, b, stats, cfg, 3, name=f"{n}x{k}")
    cuda_sync(dev)
    seconds = time.perf_counter() - t
    # The SVD alternative: how long the randomized split takes on the same matrix.
    ws = w.float() * p.smooth
    cuda_sync(dev)
    t = time.perf_counter()
    lowrank_split(ws, cfg.lowrank.rank, "randomized", None, cfg.lowrank.randomized_oversample, cfg.lowrank.randomized_iters)
    cuda_sync(dev)
    rnd = time.perf_counter() - t
    return {"seconds": seconds, "stages": p.report["seconds"], "randomized_lowrank_seconds": rnd,
            "final_rel_err": p.report["final"]["rel_err"], "alpha": p.report["smooth"]["alpha"],
            "gptq_damp": p.report["gptq"]["damp"], "gptq_fallback": p.report["gptq"]["fallback"]}


def svd_probe(n: int, k: int, rank: int, dev: torch.device) -> dict[str, float]:
    """Seconds of ways to get the top-``rank`` singular triplets of one [n, k] matrix."""
    w = torch.randn(n, k, device=dev) / k**0.5
    out = {}

    def clock(name: str, fn) -> None:
        cuda_sync(dev)
        t = time.perf_counter()
        fn()
        cuda_sync(dev)
        out[name] = time.perf_counter() - t

    clock("linalg.svd", lambda: torch.linalg.svd(w, full_matrices=False))
    small = w if n <= k else w.T  # the Gram matrix of the smaller side
    clock("gram_eigh_fp32", lambda: torch.linalg.eigh(small @ small.T))
    clock("gram_eigh_fp64", lambda: torch.linalg.eigh(small.double() @ small.double().T))
    clock("randomized", lambda: lowrank_split(w, rank, "randomized"))
    return out


def estimate(t: dict[str, float]) -> dict[str, float]:
    sq, up, down, qkv = (t.get(s) for s in SHAPES)
    out = {}
    if None not in (sq, up, down):
        out["separate_qkv"] = BLOCKS * (8 * sq + up + down)
        if qkv is not None:
            out["fused_qkv"] = BLOCKS * (qkv + 5 * sq + up + down)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--commit", default=None, help="record this commit (the device copy has no git)")
    ap.add_argument("--reservoir", type=int, default=2048, help="tokens per bin")
    ap.add_argument("--hessian-tokens", type=int, default=16384)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--no-probe", action="store_true", help="skip the SVD alternatives probe")
    ap.add_argument("--shrink", type=int, default=1, help="divide every dimension (CPU smoke tests only)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = run_metadata()
    if args.commit:
        meta["commit"] = args.commit
    cfg = QuantConfig()
    time_layer(512, 1024, cfg, args, dev)  # warm-up: cuBLAS/cuSOLVER handles, allocator
    layers, totals, totals_rnd, probe = [], {}, {}, {}
    for name in args.shapes:
        n, k = (d // args.shrink for d in SHAPES[name])
        r = time_layer(n, k, cfg, args, dev)
        totals[name] = r["seconds"]
        totals_rnd[name] = r["seconds"] - r["stages"]["lowrank"] + r["randomized_lowrank_seconds"]
        layers.append({"shape": name, "n": n, "k": k, **r})
        print(f"{name:28s} {r['seconds']:7.2f} s  stages {r['stages']}  randomized SVD {r['randomized_lowrank_seconds']:.2f} s",
              flush=True)
        _write(meta, layers, totals, totals_rnd, probe, cfg, args)
        del r
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    if not args.no_probe:
        for name in ("N13824xK5120 (ffn up)", "5120x5120"):
            n, k = (d // args.shrink for d in SHAPES[name])
            probe[name] = svd_probe(n, k, cfg.lowrank.rank, dev)
            print(f"svd probe {name}: {probe[name]}", flush=True)
            _write(meta, layers, totals, totals_rnd, probe, cfg, args)


def _write(meta, layers, totals, totals_rnd, probe, cfg, args) -> None:
    est, est_rnd = estimate(totals), estimate(totals_rnd)
    payload = {**meta, "layers": layers, "expert_seconds_estimate": est,
               "expert_seconds_estimate_randomized_svd": est_rnd, "svd_probe_seconds": probe,
               "config": {"rank": cfg.lowrank.rank, "lowrank_method": cfg.lowrank.method,
                          "alpha_grid": cfg.smooth.alpha_grid, "clip_grid": [cfg.clip.clip_ratios, cfg.clip.exp_offsets],
                          "max_tokens": cfg.clip.max_tokens, "reservoir_tokens_per_bin": args.reservoir, "bins": 3}}
    stages = ["smooth", "lowrank", "gptq", "clip", "eval"]
    md = ["| shape | total s | " + " | ".join(stages) + " | randomized SVD s |", "|---|---|" + "---|" * (len(stages) + 1)]
    for r in layers:
        md.append(f"| {r['shape']} | {r['seconds']:.2f} | " + " | ".join(f"{r['stages'][s]:.2f}" for s in stages)
                  + f" | {r['randomized_lowrank_seconds']:.2f} |")
    md += ["", "One expert (40 blocks, 400 linears), minutes:", "", "| layout | exact SVD (config) | randomized SVD |",
           "|---|---|---|"]
    md += [f"| {k} | {v / 60:.1f} | {est_rnd.get(k, float('nan')) / 60:.1f} |" for k, v in est.items()]
    if probe:
        md += ["", "Top-r SVD alternatives on one matrix, seconds:", "", "| shape | " + " | ".join(next(iter(probe.values())))
               + " |", "|---|" + "---|" * len(next(iter(probe.values())))]
        md += [f"| {k} | " + " | ".join(f"{v:.2f}" for v in p.values()) + " |" for k, p in probe.items()]
    write_results("layer_ptq", payload, "\n".join(md), args.out_dir)


if __name__ == "__main__":
    main()
