"""``wanquant demo``: the whole job, offline, on the embedded two-expert testbed model.

Calibrate on the testbed's calibration split, quantize both experts, save, reload the
checkpoint into a fresh pipeline, generate baseline and W4A4 videos side by side on the
evaluation split, and write a report (JSON + HTML with videos, error maps and per-layer
plots).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from wanquant import api
from wanquant.artifacts.checkpoint import read_manifest
from wanquant.evaluation.metrics import psnr
from wanquant.evaluation.report import clip_table_plot, error_map, layer_error_plot, write_report
from wanquant.media import write_frame_strip, write_video
from wanquant.testbed.dataset import list_samples, trajectory_error
from wanquant.validate import positive_int, writable_location

log = logging.getLogger(__name__)


def run_demo(out: Path, num_calib: int = 4, num_eval: int = 2, steps: int = 10, preset_name: str = "wanquant",
             device: str = "cpu") -> Path:
    positive_int(num_calib, "--num-calib (num_calib)")
    positive_int(num_eval, "--num-eval (num_eval)")
    positive_int(steps, "--steps (steps)")
    writable_location(out, "--out (out)")
    out.mkdir(parents=True, exist_ok=True)
    if not device.startswith("cuda"):
        # The testbed's tensors are tiny: one thread is fastest, and several threads
        # spin against each other (10x slower measured) on a busy 2-core machine.
        torch.set_num_threads(1)
    # CPUs run the baseline in fp32 (bf16 matmuls are slow there); GPUs in bf16.
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    base_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    settings = dataclasses.replace(api.default_settings("testbed"), num_inference_steps=steps, guidance_scale=4.0)
    pipe = api.load_base_pipeline("testbed", device, dtype)
    calib = api.load_calibration("testbed", num_calib)
    evals = list_samples("eval", num_eval)

    def generate_all(p) -> list:
        return [api.generate(p, s.first_frame(), s.prompt, settings, seed=i, progress=False)
                for i, s in enumerate(evals)]

    t0 = time.perf_counter()
    baseline = generate_all(pipe)
    t_base = time.perf_counter() - t0

    qdir = out / "quantized"
    t0 = time.perf_counter()
    api.quantize(pipe, calib, qdir, preset_name, settings, reservoir_tokens=2048, overwrite=True, restart=True)
    t_quant = time.perf_counter() - t0

    fresh = api.load_base_pipeline("testbed", device, dtype, with_experts=False)
    api.load_quantized(fresh, qdir, device=device)
    t0 = time.perf_counter()
    quant = generate_all(fresh)
    t_q = time.perf_counter() - t0

    rows = []
    for i, (s, fb, fq) in enumerate(zip(evals, baseline, quant)):
        name = f"eval{i}"
        files = {"baseline": f"{name}_{base_name}.mp4", "w4a4": f"{name}_w4a4.mp4"}
        write_video(fb, out / files["baseline"])
        write_video(fq, out / files["w4a4"])
        write_frame_strip(fb, out / f"{name}_{base_name}.png")
        write_frame_strip(fq, out / f"{name}_w4a4.png")
        error_map(fq, fb, out / f"{name}_error.png")
        rows.append({
            "name": name, "prompt": s.prompt,
            "metrics": {"psnr_w4a4_vs_baseline_db": psnr(fq, fb), "gt_psnr_baseline_db": psnr(fb, s.frames),
                        "gt_psnr_w4a4_db": psnr(fq, s.frames),
                        "traj_err_baseline_px": trajectory_error(fb, s)["traj_err_px"],
                        "traj_err_w4a4_px": trajectory_error(fq, s)["traj_err_px"]},
            "videos": {f"baseline ({base_name})": files["baseline"], "W4A4": files["w4a4"],
                       "ground truth": _gt_video(s, out, name)},
            "images": {"error map": f"{name}_error.png"},
            "strips": {f"frames (baseline, {base_name})": f"{name}_{base_name}.png",
                       "frames (W4A4)": f"{name}_w4a4.png"},
        })
    manifest = read_manifest(qdir)
    figures = [layer_error_plot(manifest, out / "layer_errors.png").name,
               clip_table_plot(manifest, out / "clip_tables.png").name]
    mean = lambda k: sum(r["metrics"][k] for r in rows) / len(rows)  # noqa: E731
    summary = {
        "model": "trained testbed",
        "device": device, "baseline": base_name, "preset": preset_name, "calibration samples": num_calib,
        "steps": steps, "psnr W4A4 vs baseline (dB, mean)": mean("psnr_w4a4_vs_baseline_db"),
        "ground-truth PSNR baseline / W4A4 (dB)": f"{mean('gt_psnr_baseline_db'):.2f} / {mean('gt_psnr_w4a4_db'):.2f}",
        "quantize seconds": round(t_quant, 1), "baseline gen seconds": round(t_base, 1),
        "W4A4 gen seconds": round(t_q, 1), "checkpoint": str(qdir),
    }
    return write_report(out, "wanquant demo: W4A4 vs baseline on the testbed", summary, rows, figures)


def _gt_video(sample, out: Path, name: str) -> str:
    path = f"{name}_ground_truth.mp4"
    write_video(sample.frames, out / path)
    return path
