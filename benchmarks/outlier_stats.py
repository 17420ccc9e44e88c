"""Activation statistics of the testbeds: are there massive, timestep-dependent channels?

    python -m benchmarks.outlier_stats --out runs/outlier_stats [--samples 3 --steps 20]

Runs the 16-bit pipeline of each testbed (``plain``: the trained one; ``outlier``: the same
with massive AdaLN channels transplanted, :mod:`wanquant.model.outliers`) on calibration
samples and records the input of every linear of every block, per expert and timestep bin:

- channel max/median absmax (absmax over tokens per channel; max and median over channels);
- kurtosis of the input's values (3 = Gaussian);
- the per-channel absmax profile's cosine distance between the expert's first and last bin,
  and how much the top channel's absmax changes between them;
- the top channels of each expert and how many the two experts share.

Writes ``benchmarks/results/outlier_stats.{json,md}``; :mod:`benchmarks.testbed_quality`
embeds the same summary in its results.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.common.meta import RESULTS_DIR, run_metadata, write_results

log = logging.getLogger("outlier_stats")
NAME = "outlier_stats"
# Relative position inside each expert's run -> bin (the paper's bins, as QuantConfig's).
BIN_EDGES = {"transformer": (0.33, 0.66), "transformer_2": (0.20, 0.70)}
# Timesteps each expert covers (Wan2.2 boundary 0.9 of 1000).
EXPERT_T = {"transformer": (1000.0, 900.0), "transformer_2": (900.0, 0.0)}
TOP_K = 4


# ------------------------------------------------------------------------ pure statistics


def kurtosis_from_moments(n: float, s1: float, s2: float, s3: float, s4: float) -> float:
    """Pearson kurtosis E[(x-mu)^4] / var^2 from the raw sums sum x^k (k = 1..4) of n values."""
    m1, m2, m3, m4 = s1 / n, s2 / n, s3 / n, s4 / n
    var = m2 - m1 * m1
    if var <= 0:
        return float("nan")
    c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4
    return float(c4 / var ** 2)


def max_median_ratio(absmax: np.ndarray) -> float:
    """Largest channel absmax over the median channel absmax."""
    med = float(np.median(absmax))
    return float(absmax.max() / med) if med > 0 else float("inf")


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - cos(a, b) of two profiles (0: same shape)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(1.0 - np.dot(a, b) / (na * nb))


def bin_of(t: float, expert: str) -> int:
    """Timestep bin of ``t`` in ``expert``'s run (0 = its noisiest steps)."""
    hi, lo = EXPERT_T[expert]
    r = (hi - t) / (hi - lo)
    return int(sum(r >= e for e in BIN_EDGES[expert]))


@dataclass
class Accum:
    """Running per-channel absmax and raw moments of one layer's input in one bin."""

    absmax: np.ndarray | None = None
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # n, sum x, x^2, x^3, x^4

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        am = x.abs().amax(0).numpy()
        self.absmax = am if self.absmax is None else np.maximum(self.absmax, am)
        self.sums[0] += x.numel()
        for k in range(1, 5):
            self.sums[k] += float((x ** k).sum())


# ------------------------------------------------------------------------------ collection


def collect(pipe, samples, settings, seed0: int = 1000) -> dict[tuple[str, str, int], Accum]:
    """Run ``pipe`` on ``samples`` and accumulate every block linear's input per (expert, layer, bin)."""
    from wanquant.model.pipeline import run_pipeline

    acc: dict[tuple[str, str, int], Accum] = {}
    current = {"bin": 0}
    handles = []
    for ename in ("transformer", "transformer_2"):
        expert = getattr(pipe, ename, None)
        if expert is None:
            continue

        def pre_expert(mod, args, kwargs, ename=ename):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            current["bin"] = bin_of(float(torch.as_tensor(t).flatten()[0]), ename)

        handles.append(expert.register_forward_pre_hook(pre_expert, with_kwargs=True))
        for lname, mod in expert.blocks.named_modules():
            if isinstance(mod, torch.nn.Linear):
                def pre(m, a, ename=ename, lname=lname):
                    acc.setdefault((ename, lname, current["bin"]), Accum()).add(a[0])
                handles.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            for i, s in enumerate(samples):
                run_pipeline(pipe, s.first_frame(), s.prompt, settings, seed=seed0 + i)
    finally:
        for h in handles:
            h.remove()
    return acc


def summarize(acc: dict[tuple[str, str, int], Accum]) -> dict:
    """Per-layer rows and per-expert summaries of :func:`collect`'s accumulators."""
    layers: dict[tuple[str, str], dict[int, Accum]] = {}
    for (e, lname, b), a in acc.items():
        layers.setdefault((e, lname), {})[b] = a
    rows = []
    tops: dict[str, dict[int, int]] = {}
    for (e, lname), bins in sorted(layers.items()):
        first, last = bins[min(bins)], bins[max(bins)]
        total = np.maximum.reduce([a.absmax for a in bins.values()])
        sums = np.sum([a.sums for a in bins.values()], axis=0)
        top = int(total.argmax())
        rows.append({"expert": e, "layer": lname, "max_over_median": max_median_ratio(total),
                     "max_over_median_per_bin": {b: max_median_ratio(a.absmax) for b, a in sorted(bins.items())},
                     "kurtosis": kurtosis_from_moments(*sums),
                     "profile_cos_dist_first_last": cosine_distance(first.absmax, last.absmax),
                     "top_channel": top,
                     "top_channel_last_over_first": float(last.absmax[top] / max(first.absmax[top], 1e-30)),
                     "top_channels": [int(c) for c in np.argsort(-total)[:TOP_K]]})
        for c in rows[-1]["top_channels"]:
            tops.setdefault(e, {})[c] = tops.setdefault(e, {}).get(c, 0) + 1
    experts = {}
    for e in sorted({r["expert"] for r in rows}):
        rs = [r for r in rows if r["expert"] == e]
        experts[e] = {
            "layers": len(rs),
            "max_over_median": {"max": max(r["max_over_median"] for r in rs),
                                "median": float(np.median([r["max_over_median"] for r in rs]))},
            "kurtosis": {"max": max(r["kurtosis"] for r in rs), "median": float(np.median([r["kurtosis"] for r in rs]))},
            "profile_cos_dist_first_last_max": max(r["profile_cos_dist_first_last"] for r in rs),
            "top_channel_last_over_first_range": [min(r["top_channel_last_over_first"] for r in rs),
                                                  max(r["top_channel_last_over_first"] for r in rs)],
            # Channels most often among a layer's top channels.
            "frequent_top_channels": [c for c, _ in sorted(tops[e].items(), key=lambda kv: -kv[1])[:TOP_K]],
        }
    names = list(experts)
    shared = (sorted(set(experts[names[0]]["frequent_top_channels"]) & set(experts[names[1]]["frequent_top_channels"]))
              if len(names) == 2 else [])
    return {"experts": experts, "shared_top_channels": shared, "layers": rows}


def testbed_stats(weights: Path | None, num_samples: int = 2, steps: int = 20, guidance: float = 4.0) -> dict:
    """:func:`summarize` of the testbed at ``weights`` (None: the committed one) on calib samples."""
    from wanquant.model.pipeline import GenerationSettings
    from wanquant.model.testbed import TestbedConfig, load_testbed_pipeline
    from wanquant.testbed.dataset import list_samples

    tb = TestbedConfig()
    gen = GenerationSettings(height=tb.height, width=tb.width, num_frames=tb.num_frames, num_inference_steps=steps,
                             guidance_scale=guidance, max_sequence_length=tb.max_sequence_length)
    pipe = load_testbed_pipeline(path=weights)
    samples = list_samples("calib", num_samples, num_frames=tb.num_frames, height=tb.height, width=tb.width)
    out = summarize(collect(pipe, samples, gen))
    out["settings"] = {"samples": num_samples, "steps": steps, "guidance_scale": guidance}
    return out


def markdown_summary(stats: dict[str, dict]) -> list[str]:
    """Side-by-side table of the per-expert summaries of several testbeds."""
    lines = ["| testbed | expert | layers | channel max/median absmax (max, median over layers) | kurtosis (max, "
             "median) | profile cos. distance first-last bin (max) | top channel last/first bin | frequent top "
             "channels | shared with the other expert |", "|---|---|---|---|---|---|---|---|---|"]
    for tb, s in stats.items():
        for e, x in s["experts"].items():
            lo, hi = x["top_channel_last_over_first_range"]
            lines.append(f"| {tb} | {e} | {x['layers']} | {x['max_over_median']['max']:.1f}, "
                         f"{x['max_over_median']['median']:.1f} | {x['kurtosis']['max']:.1f}, "
                         f"{x['kurtosis']['median']:.1f} | {x['profile_cos_dist_first_last_max']:.3f} | "
                         f"{lo:.2f}-{hi:.2f} | {x['frequent_top_channels']} | {s['shared_top_channels']} |")
    return lines


def markdown_layers(stats: dict[str, dict]) -> list[str]:
    """Per-layer rows of every testbed, side by side."""
    tbs = list(stats)
    head = "| expert | layer | " + " | ".join(f"{t}: max/med, kurt, cos dist, top ch" for t in tbs) + " |"
    lines = [head, "|---|---|" + "---|" * len(tbs)]
    keyed = {t: {(r["expert"], r["layer"]): r for r in stats[t]["layers"]} for t in tbs}
    for key in keyed[tbs[0]]:
        cells = []
        for t in tbs:
            r = keyed[t].get(key)
            cells.append("n/a" if r is None else f"{r['max_over_median']:.1f}, {r['kurtosis']:.1f}, "
                         f"{r['profile_cos_dist_first_last']:.3f}, {r['top_channel']}")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/outlier_stats"),
                   help="where the outlier testbed is written (OUT/testbed_outlier)")
    p.add_argument("--testbed", nargs="+", default=["plain", "outlier"], choices=("plain", "outlier"))
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    from benchmarks.testbed_quality import testbed_weights

    stats = {tb: testbed_stats(testbed_weights(tb, args.out, args.weights), args.samples, args.steps)
             for tb in args.testbed}
    payload = {**run_metadata(None), "testbeds": stats}
    md = "\n".join([*markdown_summary(stats), "", "Per layer:", "", *markdown_layers(stats)])
    if not args.no_results:
        write_results(NAME, payload, md, RESULTS_DIR)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
