"""GPU end-to-end check: quantize the testbed on the GPU, then generate with every backend.

Confirms on a real GPU what the CPU tests confirm with the reference path: calibration and
per-layer quantization run on CUDA, the checkpoint reloads, and the fast (FP8) backend
reproduces the reference backend's video within rounding. Writes
``benchmarks/results/gpu_e2e.{json,md}``.

    python -m benchmarks.gpu_e2e [--steps 10] [--out runs/gpu_e2e]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common.meta import run_metadata, write_results
from wanquant.calibration.run import CalibrationRun, quantize_pipeline
from wanquant.calibration.samples import CalibSample
from wanquant.evaluation.metrics import psnr
from wanquant.loading import load_quantized
from wanquant.method.config import preset
from wanquant.model.pipeline import GenerationSettings, run_pipeline
from wanquant.runtime.expert import set_backend
from wanquant.runtime.linear import W4A4Linear


def testbed_pipeline(device: str, dtype: torch.dtype):
    """(pipeline, trained?): the trained testbed; an untrained one, with a warning, without its weights."""
    from wanquant.model.testbed import build_testbed_pipeline, load_testbed_pipeline

    try:
        return load_testbed_pipeline(device=device, dtype=dtype), True
    except FileNotFoundError as e:
        warnings.warn(f"{e} Using an untrained testbed: its videos show noise.", stacklevel=2)
        return build_testbed_pipeline(seed=0).to(device, dtype), False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--num-calib", type=int, default=4)
    ap.add_argument("--num-eval", type=int, default=2)
    ap.add_argument("--out", default="runs/gpu_e2e")
    args = ap.parse_args()
    from wanquant.model.testbed import TestbedConfig
    from wanquant.testbed.dataset import list_samples

    device, dtype = "cuda", torch.bfloat16
    tb = TestbedConfig()
    settings = GenerationSettings(height=tb.height, width=tb.width, num_frames=tb.num_frames,
                                  num_inference_steps=args.steps, guidance_scale=4.0,
                                  max_sequence_length=tb.max_sequence_length)
    pipe, trained = testbed_pipeline(device, dtype)
    calib = [CalibSample(s.first_frame(), s.prompt, 1000 + i, f"calib:{i}")
             for i, s in enumerate(list_samples("calib", args.num_calib))]
    evals = list_samples("eval", args.num_eval)
    base = [run_pipeline(pipe, s.first_frame(), s.prompt, settings, seed=i) for i, s in enumerate(evals)]
    qdir = Path(args.out) / "quantized"
    t0 = time.perf_counter()
    quantize_pipeline(pipe, calib, preset("wanquant"), CalibrationRun(settings, progress=False), qdir,
                      overwrite=True, restart=True)
    t_quant = time.perf_counter() - t0
    fresh, _ = testbed_pipeline(device, dtype)
    fresh.register_modules(transformer=None, transformer_2=None)
    load_quantized(fresh, qdir, device=device)
    rows, videos = [], {}
    for backend in ("reference", "unpack_bf16", "fast"):
        for expert in (fresh.transformer, fresh.transformer_2):
            set_backend(expert, backend)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        videos[backend] = [run_pipeline(fresh, s.first_frame(), s.prompt, settings, seed=i)
                           for i, s in enumerate(evals)]
        torch.cuda.synchronize()
        layer = next(m for m in fresh.transformer.modules() if isinstance(m, W4A4Linear))
        rows.append({
            "backend": backend, "chosen": layer.backend_reason, "seconds": time.perf_counter() - t0,
            "lowrank_buffers_on": str(layer.l1.device),
            "expert_gpu_bytes": sum(t.numel() * t.element_size() for t in
                                    list(fresh.transformer.parameters()) + list(fresh.transformer.buffers())
                                    if t.device.type == "cuda"),
            "psnr_vs_baseline_db": float(np.mean([psnr(q, b) for q, b in zip(videos[backend], base)])),
            "psnr_vs_reference_db": float(np.mean([psnr(q, r) for q, r in zip(videos[backend], videos["reference"])])),
            "max_abs_diff_vs_reference": float(max(np.abs(q - r).max() for q, r in
                                                   zip(videos[backend], videos["reference"]))),
        })
    # After the fast path moved L1/L2 to the host, the reference backend must still reproduce itself.
    for expert in (fresh.transformer, fresh.transformer_2):
        set_backend(expert, "reference")
    again = [run_pipeline(fresh, s.first_frame(), s.prompt, settings, seed=i) for i, s in enumerate(evals)]
    reference_repeatable = all(np.array_equal(a, b) for a, b in zip(again, videos["reference"]))
    payload = {**run_metadata(), "reference_after_fast_identical": reference_repeatable, "model": "trained testbed" if trained else "untrained testbed",
               "steps": args.steps, "quantize_seconds": t_quant, "rows": rows}
    table = ["| backend | psnr vs baseline (dB) | psnr vs reference (dB) | max abs diff vs reference | s | L1/L2 on |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['backend']} | {r['psnr_vs_baseline_db']:.2f} | {r['psnr_vs_reference_db']:.2f} | "
              f"{r['max_abs_diff_vs_reference']:.4f} | {r['seconds']:.1f} | {r['lowrank_buffers_on']} |" for r in rows]
    write_results("gpu_e2e", payload, "\n".join(table))
    print("\n".join(table))
    print("reference backend after the fast path (L1/L2 on host) reproduces itself:", reference_repeatable)


if __name__ == "__main__":
    main()
