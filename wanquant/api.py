"""The Python API; the CLI (:mod:`wanquant.cli`) is a thin layer over these functions.

Typical use::

    import wanquant
    pipe = wanquant.load_base_pipeline("path/to/Wan2.2-I2V-A14B-Diffusers", device="cuda")
    samples = wanquant.load_calibration("calib.jsonl")
    wanquant.quantize(pipe, samples, "wan22-w4a4")              # calibrate, quantize, save
    pipe = wanquant.load_base_pipeline(path, device="cuda", with_experts=False)
    wanquant.load_quantized(pipe, "wan22-w4a4")                 # quantized experts in place
    frames = wanquant.generate(pipe, image, "a cat surfing", out="cat.mp4")
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from wanquant.artifacts.checkpoint import read_manifest
from wanquant.calibration.run import CalibrationRun, quantize_pipeline
from wanquant.calibration.samples import CalibSample, load_manifest
from wanquant.config import QuantConfig, preset
from wanquant.runtime.generate import GenerationSettings, run_pipeline, write_frame_strip, write_video
from wanquant.runtime.load import load_quantized

log = logging.getLogger(__name__)
TESTBED = "testbed"


def load_base_pipeline(model: str | Path = TESTBED, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.bfloat16, with_experts: bool = True):
    """A diffusers Wan pipeline from a local directory, or the embedded testbed model.

    ``with_experts=False`` skips loading the 16-bit experts (use it before
    :func:`load_quantized`, which brings its own).
    """
    if str(model) == TESTBED:
        from wanquant.testbed.build import load_testbed_pipeline

        pipe = load_testbed_pipeline(device=device, dtype=dtype)
        if not with_experts:
            pipe.register_modules(transformer=None, transformer_2=None)
        return pipe
    from diffusers import DiffusionPipeline

    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json); "
                                "download the model first (wanquant never downloads at run time) or use 'testbed'")
    skip = {} if with_experts else {"transformer": None, "transformer_2": None}
    pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, **skip)
    return pipe.to(device)


def load_calibration(source: str | Path, count: int | None = None) -> list[CalibSample]:
    """Calibration samples from a JSONL manifest, or ``testbed`` (its calibration split)."""
    if str(source) == TESTBED:
        from wanquant.testbed.dataset import list_samples

        return [CalibSample(s.first_frame(), s.prompt, 1000 + i, f"testbed-calib:{i}")
                for i, s in enumerate(list_samples("calib", count or 4))]
    samples = load_manifest(source)
    return samples[:count] if count else samples


def quantize(pipe, samples: list[CalibSample], out_dir: str | Path, config: QuantConfig | str = "wanquant",
             settings: GenerationSettings | None = None, blocks_per_pass: int | None = None,
             reservoir_tokens: int = 4096, overwrite: bool = False, restart: bool = False,
             progress: bool = True) -> Path:
    """Calibrate on ``samples``, quantize both experts and write the checkpoint to ``out_dir``."""
    cfg = preset(config) if isinstance(config, str) else config
    run = CalibrationRun(settings or GenerationSettings(), blocks_per_pass, reservoir_tokens, progress=progress)
    return quantize_pipeline(pipe, samples, cfg, run, out_dir, overwrite=overwrite, restart=restart)


def generate(pipe, image: Image.Image | str | Path, prompt: str, settings: GenerationSettings | None = None,
             seed: int = 0, out: str | Path | None = None, progress: bool = True):
    """Generate a video; with ``out`` also write it as MP4 and a frame-strip PNG beside it."""
    if not isinstance(image, Image.Image):
        from wanquant.calibration.samples import open_image

        image = open_image(image)
    frames = run_pipeline(pipe, image, prompt, settings or GenerationSettings(), seed, progress=progress)
    if out is not None:
        out = Path(out)
        write_video(frames, out)
        write_frame_strip(frames, out.with_suffix(".png"))
    return frames


def inspect(qdir: str | Path, verify: bool = True) -> list[dict]:
    """One row per quantized layer: expert, name, shape, format, rank, clip table, errors."""
    manifest = read_manifest(qdir, verify=verify)
    cfg = manifest["config"]
    rows = []
    for attr, info in manifest["experts"].items():
        for name, layer in info["layers"].items():
            rep = layer.get("report", {})
            rows.append({
                "expert": attr, "role": info["role"], "layer": name, "shape": layer["shape"],
                "format": f"W:{cfg['weight_format']} A:{cfg['act_format']} g{cfg['group_size']}",
                "rank": layer["rank"], "alpha": rep.get("smooth", {}).get("alpha"), "clip": layer.get("clip_table"),
                "rel_err": rep.get("final", {}).get("rel_err"),
                "rel_err_per_bin": rep.get("final", {}).get("rel_err_per_bin"),
                "gptq_fallback": rep.get("gptq", {}).get("fallback"),
            })
    return rows


__all__ = ["load_base_pipeline", "load_calibration", "quantize", "load_quantized", "generate", "inspect",
           "GenerationSettings", "QuantConfig", "preset"]
