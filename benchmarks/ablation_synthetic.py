"""Synthetic ablation of the per-layer method (CPU, a few minutes).

One linear (K = N = 1024 by default) seen by two experts with three timestep bins
each. Weights: Gaussian plus a low-rank part with a decaying spectrum and uneven column
norms; expert 1's weights are expert 0's plus a 30 % perturbation (a fine-tuned copy).
Activations: Student-t (3-6 dof) with log-normal channel scales (sigma 0.8), a few shared latent
factors (correlated channels), and 8 outlier channels 20-50x larger. Overall scale,
outlier magnitude and tail weight drift over the bins, differently per expert.
Calibrate on one draw, evaluate the relative output error ``|y_q - y|^2 / |y|^2`` on a
fresh draw, averaged over the 6 (expert, bin) pairs.

    python -m benchmarks.ablation_synthetic [--k 1024] [--tokens 2048] [--threads 1]
    python -m benchmarks.ablation_synthetic --k 128 --tokens 256 --no-extras --results-dir /tmp/abl   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks.common.meta import run_metadata, write_results
from wanquant.formats import make_format
from wanquant.method.config import ClipConfig, GPTQConfig, LowRankConfig, QuantConfig, SmoothConfig
from wanquant.method.layer import output_error, quantize_layer
from wanquant.numerics.stats import LayerStatsAccumulator

BINS = 3
# Per expert and bin: (overall scale, outlier magnitude, Student-t dof).
DRIFT = {0: [(1.0, 20.0, 6.0), (1.6, 32.0, 4.0), (2.5, 50.0, 3.0)],
         1: [(3.0, 50.0, 3.0), (2.0, 35.0, 4.0), (1.2, 22.0, 6.0)]}


def make_problem(k: int, n: int, seed: int) -> dict:
    """Weights per expert and the fixed parts of the activation model."""
    g = torch.Generator().manual_seed(seed)
    col = torch.exp(0.4 * torch.randn(k, generator=g))
    spec = 3.0 * 0.9 ** torch.arange(32.0)
    low = (torch.randn(n, 32, generator=g) * spec) @ torch.randn(32, k, generator=g) / k**0.5
    w0 = (torch.randn(n, k, generator=g) * col + low) / k**0.5
    w1 = w0 + 0.3 * torch.randn(n, k, generator=g) / k**0.5
    return {
        "w": [w0, w1], "bias": torch.randn(n, generator=g) * 0.1,
        "chan": torch.exp(0.8 * torch.randn(k, generator=g)),
        "factors": torch.randn(8, k, generator=g) * 0.7,
        "outliers": [torch.randperm(k, generator=g)[:8], torch.randperm(k, generator=g)[:8]],
    }


def draw(prob: dict, expert: int, b: int, tokens: int, g: torch.Generator) -> torch.Tensor:
    scale, mag, dof = DRIFT[expert][b]
    k = prob["chan"].shape[0]
    t = _student_t(dof, (tokens, k), g)
    x = t * prob["chan"] + torch.randn(tokens, 8, generator=g) @ prob["factors"]
    x[:, prob["outliers"][expert]] *= mag
    return x * scale


def _student_t(dof: float, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Seeded Student-t samples with integer ``dof``: normal / sqrt(chi2 / dof)."""
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((*shape, int(dof)), generator=g).square().sum(-1)
    return z / (chi2 / dof).sqrt()


def calibrate(prob: dict, tokens: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for e in range(2):
        acc = LayerStatsAccumulator(prob["chan"].shape[0], BINS, reservoir_capacity=min(tokens, 1024), seed=seed + e)
        for b in range(BINS):
            acc.update(draw(prob, e, b, tokens, g), b)
        out.append(acc.finalize())
    return out


def ladder(base: QuantConfig) -> list[tuple[str, QuantConfig]]:
    """The paper's ablation order, each step adding one component to the previous."""
    steps = []
    c = copy.deepcopy(base)
    c.smooth.enabled, c.lowrank.rank, c.gptq.enabled, c.clip.enabled = False, 0, False, False
    steps.append(("rtn", copy.deepcopy(c)))
    c.smooth.enabled = True
    steps.append(("smooth", copy.deepcopy(c)))
    c.lowrank.rank = base.lowrank.rank
    steps.append(("svdquant", copy.deepcopy(c)))
    c.gptq.enabled = True
    steps.append(("gptq", copy.deepcopy(c)))
    c.clip.enabled, c.clip.per_bin = True, False
    steps.append(("global_clip", copy.deepcopy(c)))
    c.clip.per_bin = True
    steps.append(("per_bin_clip", copy.deepcopy(c)))
    return steps


def evaluate(prob: dict, stats: list, evals: list, cfg: QuantConfig) -> tuple[float, list[float], dict]:
    errs, alphas = [], {}
    for e in range(2):
        p = quantize_layer(prob["w"][e], prob["bias"], stats[e], cfg, BINS, name=f"expert{e}")
        alphas[e] = {"alpha": p.report["smooth"]["alpha"], "clip": p.clip_table.tolist()}
        errs += [output_error(p, prob["w"][e], evals[e][b], b, cfg) for b in range(BINS)]
    return sum(errs) / len(errs), errs, alphas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per (expert, bin) per draw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-extras", action="store_true", help="main ladder only")
    ap.add_argument("--results-dir", default=None, help="where the result files go (default: benchmarks/results)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = run_metadata()
    prob = make_problem(args.k, args.k, args.seed)
    stats = calibrate(prob, args.tokens, args.seed + 1)
    g = torch.Generator().manual_seed(args.seed + 2)  # fresh draw for evaluation
    evals = [[draw(prob, e, b, args.tokens, g) for b in range(BINS)] for e in range(2)]
    base = QuantConfig(clip=ClipConfig(max_tokens=1024))
    variants = [("mxfp4 (w ocp_floor, a ocp_floor)", base)]
    safe_ceil = make_format("mxfp4", scale_rule="safe_ceil")
    if not args.no_extras:
        variants += [
            ("mxfp4 (w safe_ceil, a ocp_floor)", _with(base, weight_format=safe_ceil)),
            ("mxfp4 (w safe_ceil, a safe_ceil)", _with(base, weight_format=safe_ceil, act_format=safe_ceil)),
            ("int4 g64", _with(base, weight_format=make_format("int4", 64), act_format=make_format("int4", 64))),
        ]
    sections, rows = [], []
    for label, vcfg in variants:
        sec = []
        for method, cfg in ladder(vcfg):
            t = time.perf_counter()
            mean, per, extra = evaluate(prob, stats, evals, cfg)
            sec.append({"method": method, "rel_err": mean, "per_expert_bin": per, "chosen": extra,
                        "seconds": time.perf_counter() - t})
            print(f"{label:34s} {method:14s} {mean:.6f}  ({time.perf_counter() - t:.1f} s)", flush=True)
        sections.append({"variant": label, "rows": sec})
        if not rows:
            rows = [{"method": r["method"], "rel_err": r["rel_err"]} for r in sec]
    options = []
    if not args.no_extras:
        full = ladder(base)[-1][1]
        for label, cfg in [("lowrank randomized", _sub(full, lowrank=LowRankConfig(method="randomized"))),
                           ("lowrank activation_aware", _sub(full, lowrank=LowRankConfig(method="activation_aware"))),
                           ("gptq act_order", _sub(full, gptq=GPTQConfig(act_order=True))),
                           ("alpha 0.5 only (paper)", _sub(full, smooth=SmoothConfig(alpha_grid=[0.5])))]:
            mean, per, _ = evaluate(prob, stats, evals, cfg)
            options.append({"option": label, "rel_err": mean})
            print(f"{'per_bin_clip + ' + label:49s} {mean:.6f}", flush=True)
    payload = {**meta, "rows": rows, "variants": sections, "options": options,
               "setup": {"k": args.k, "n": args.k, "tokens_per_bin": args.tokens, "bins_per_expert": BINS,
                         "experts": 2, "drift": DRIFT, "seed": args.seed}}
    write_results("ablation_synthetic", payload, _markdown(sections, options), args.results_dir)


def _with(cfg: QuantConfig, **kw) -> QuantConfig:
    c = copy.deepcopy(cfg)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _sub(cfg: QuantConfig, **kw) -> QuantConfig:
    c = copy.deepcopy(cfg)
    for k, v in kw.items():
        old = getattr(c, k)
        for f, val in vars(v).items():  # keep the ladder's enabled flags, change only what differs from default
            if val != getattr(type(v)(), f):
                setattr(old, f, val)
    return c


def _markdown(sections: list, options: list) -> str:
    names = [s["variant"] for s in sections]
    lines = ["Relative output error on a fresh draw, mean over 2 experts x 3 bins (lower is better).", "",
             "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, r in enumerate(sections[0]["rows"]):
        lines.append(f"| {r['method']} | " + " | ".join(f"{s['rows'][i]['rel_err']:.5f}" for s in sections) + " |")
    if options:
        lines += ["", "Options on top of the full default pipeline (mxfp4, w/a ocp_floor):", "",
                  "| option | rel_err |", "|---|---|"] + [f"| {o['option']} | {o['rel_err']:.5f} |" for o in options]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
