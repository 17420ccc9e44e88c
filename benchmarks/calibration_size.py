"""How much calibration the testbed needs (issue 12): PSNR vs 16-bit by samples x steps.

For every pair (calibration samples N, calibration steps S) of the grid, the testbed is
quantized with the ``wanquant`` preset on the first N samples of its calibration split,
each run for S denoising steps, and the W4A4 model generates the evaluation split at a
fixed number of steps; each video is compared with the 16-bit model's video of the same
seed. Rows report the mean PSNR and, against the largest setting of the grid, the mean
paired per-video difference with its standard error: what a user gives up by cutting.

    python -m benchmarks.calibration_size --out benchmarks/results            # full grid
    python -m benchmarks.calibration_size --samples 2 4 --calib-steps 10 --num-eval 2 --out /tmp/cs

Checkpoints and videos are cached in ``--work`` (a re-run resumes where it stopped).
Writes ``OUT/calibration_size.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from benchmarks.common.meta import RESULTS_DIR, run_metadata, write_results
from benchmarks.quality.combine import se


def grid(samples: list[int], steps: list[int]) -> list[tuple[int, int]]:
    """The (samples, steps) pairs, the largest calibration last (the reference of the deltas)."""
    return sorted({(n, s) for n in samples for s in steps}, key=lambda p: (p[0] * p[1], p))


def paired_delta(values: list[float], reference: list[float]) -> tuple[float, float | None]:
    """Mean of the per-video differences ``values - reference`` and its standard error."""
    d = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return float(d.mean()), se(d)


def _videos(pipe, samples, settings, cache: Path) -> list[np.ndarray]:
    import wanquant.api as wq
    from wanquant.evaluation.metrics import as_uint8

    out = []
    for i, s in enumerate(samples):
        path = cache / f"video{i}.npy"
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            np.save(path, as_uint8(wq.generate(pipe, s.first_frame(), s.prompt, settings, seed=i)))
        out.append(np.load(path))
    return out


def run(samples_grid: list[int], steps_grid: list[int], num_eval: int, eval_steps: int, work: Path,
        log=print) -> dict:
    import wanquant.api as wq
    from wanquant.evaluation.metrics import psnr
    from wanquant.testbed.dataset import list_samples

    defaults = wq.default_settings("testbed")
    eval_settings = dataclasses.replace(defaults, num_inference_steps=eval_steps)
    evals = list_samples("eval", num_eval)
    reference = _videos(wq.load_base_pipeline("testbed"), evals, eval_settings, work / "bf16")
    log(f"16-bit videos: {num_eval} at {eval_steps} steps")
    rows = []
    for n, s in grid(samples_grid, steps_grid):
        ckpt = work / f"n{n}_s{s}"
        seconds = None
        if not (ckpt / "manifest.json").exists():
            t0 = time.perf_counter()
            wq.quantize(wq.load_base_pipeline("testbed"), wq.load_calibration("testbed", count=n), ckpt,
                        settings=dataclasses.replace(defaults, num_inference_steps=s), overwrite=True)
            seconds = time.perf_counter() - t0
        pipe = wq.load_base_pipeline("testbed", with_experts=False)
        wq.load_quantized(pipe, ckpt)
        videos = _videos(pipe, evals, eval_settings, work / f"videos_n{n}_s{s}")
        per_video = [float(psnr(v, r)) for v, r in zip(videos, reference)]
        rows.append({"samples": n, "steps": s, "psnr_vs_16bit": float(np.mean(per_video)),
                     "per_video_db": per_video, "calibration_s": seconds})
        log(f"samples {n}, steps {s}: {rows[-1]['psnr_vs_16bit']:.2f} dB")
    ref = rows[-1]
    for r in rows:
        r["delta_vs_largest"], r["delta_se"] = paired_delta(r["per_video_db"], ref["per_video_db"])
    return {"settings": {"preset": "wanquant", "eval_videos": num_eval, "eval_steps": eval_steps,
                         "largest": {"samples": ref["samples"], "steps": ref["steps"]}}, "rows": rows}


def markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = [f"Testbed, `wanquant` preset; {s['eval_videos']} evaluation videos at {s['eval_steps']} steps; "
             f"delta = mean paired per-video PSNR difference against the largest calibration "
             f"({s['largest']['samples']} samples x {s['largest']['steps']} steps), +- its SE.", "",
             "| samples | steps | PSNR vs 16-bit (dB) | delta vs largest (dB) | calibration s |", "|---|---|---|---|---|"]
    for r in payload["rows"]:
        se_txt = f" +- {r['delta_se']:.2f}" if r["delta_se"] is not None else ""
        cal = f"{r['calibration_s']:.0f}" if r["calibration_s"] is not None else "cached"
        lines.append(f"| {r['samples']} | {r['steps']} | {r['psnr_vs_16bit']:.2f} | {r['delta_vs_largest']:+.2f}"
                     f"{se_txt} | {cal} |")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for n in sorted({r["samples"] for r in payload["rows"]}):
        pts = sorted((r["steps"], r["psnr_vs_16bit"]) for r in payload["rows"] if r["samples"] == n)
        ax.plot(*zip(*pts), marker="o", label=f"{n} samples")
    ax.set_xlabel("calibration steps")
    ax.set_ylabel("PSNR vs 16-bit (dB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--calib-steps", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--num-eval", type=int, default=8)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--work", type=Path, default=Path("runs/calibration_size"), help="checkpoints and videos (cache)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if min(args.samples + args.calib_steps) < 1 or args.num_eval < 2 or args.eval_steps < 1:
        p.error("samples and steps must be >= 1, --num-eval >= 2 (a standard error needs two videos)")
    payload = {**run_metadata(), **run(args.samples, args.calib_steps, args.num_eval, args.eval_steps, args.work)}
    write_results("calibration_size", payload, markdown(payload), args.out)
    plot(payload, args.out / "calibration_size.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
