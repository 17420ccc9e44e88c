"""The Python API; the CLI (:mod:`wanquant.cli`) is a thin layer over these functions.

Typical use::

    import wanquant.api as wq
    pipe = wq.load_base_pipeline("path/to/Wan2.2-I2V-A14B-Diffusers", device="cuda")
    samples = wq.load_calibration("calib.jsonl")
    wq.quantize(pipe, samples, "wan22-w4a4")                    # calibrate, quantize, save
    pipe = wq.load_base_pipeline(path, device="cuda", with_experts=False)
    wq.load_quantized(pipe, "wan22-w4a4")                       # quantized experts in place
    frames = wq.generate(pipe, "cat.png", "a cat surfing", out="cat.mp4")

Several GPUs (every rank of a torchrun job runs the same calls): ``dist =
init_distributed()`` first, then ``quantize(..., dist=dist)``, or, after
``load_quantized``, ``enable_context_parallel(pipe)`` before ``generate``.

``"testbed"`` names the embedded model (a diffusers directory inside the package) and
its calibration split; every other model is a local diffusers directory.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from PIL import Image

from wanquant import testbed
from wanquant.artifacts.checkpoint import CheckpointError, read_manifest
from wanquant.calibration.config import CalibrationRun
from wanquant.calibration.run import quantize_pipeline
from wanquant.calibration.samples import CalibSample, load_manifest
from wanquant.method.config import PRESETS, QuantConfig, preset
from wanquant.distributed import DistContext, init_distributed
from wanquant.loading import load_quantized
from wanquant.media import open_image, write_frame_strip, write_video
from wanquant.model.parallel import check_context_parallel_shape, enable_context_parallel
from wanquant.model.pipeline import GenerationSettings, load_pipeline, run_pipeline

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LocalModel:
    """A model that ships with wanquant: where it is and how it likes to be run."""

    path: Path
    settings: GenerationSettings  # its sampling defaults
    vae_dtype: torch.dtype | None = None  # None: the pipeline's dtype


LOCAL_MODELS = {
    "testbed": LocalModel(testbed.WEIGHTS_DIR, GenerationSettings(**testbed.SAMPLING), vae_dtype=torch.float32),
}


def load_base_pipeline(model: str | Path = "testbed", device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.bfloat16, with_experts: bool = True):
    """A diffusers Wan pipeline from a local directory, or a model in :data:`LOCAL_MODELS`.

    ``with_experts=False`` does not read the 16-bit experts (use it before
    :func:`load_quantized`, which brings its own).
    """
    local = LOCAL_MODELS.get(str(model))
    path = local.path if local else Path(model)
    return load_pipeline(path, device, dtype, with_experts=with_experts, vae_dtype=local.vae_dtype if local else None)


def default_settings(model: str | Path = "testbed") -> GenerationSettings:
    """Sampling defaults of a model: its own for :data:`LOCAL_MODELS`, Wan2.2's otherwise."""
    local = LOCAL_MODELS.get(str(model))
    return dataclasses.replace(local.settings) if local else GenerationSettings()


def load_calibration(source: str | Path, count: int | None = None) -> list[CalibSample]:
    """Calibration samples from a JSONL manifest, or ``testbed`` (its calibration split)."""
    if str(source) == "testbed":
        from wanquant.testbed.dataset import list_samples

        return [CalibSample(s.first_frame(), s.prompt, 1000 + i, f"testbed-calib:{i}")
                for i, s in enumerate(list_samples("calib", count or 4))]
    samples = load_manifest(source)
    return samples[:count] if count else samples


def quantize(pipe, samples: list[CalibSample], out_dir: str | Path, config: QuantConfig | str = "wanquant",
             settings: GenerationSettings | None = None, blocks_per_pass: int | None = None,
             reservoir_tokens: int = 4096, overwrite: bool = False, restart: bool = False,
             progress: bool = True, shards: int | None = None, dist: DistContext | None = None) -> Path:
    """Calibrate on ``samples``, quantize both experts and write the checkpoint to ``out_dir``.

    ``shards``: split the samples into this many shards merged in shard order (the same
    shards give the same checkpoint on any number of processes); ``dist``: this process's
    place in a torchrun job (:func:`init_distributed`).
    """
    cfg = preset(config) if isinstance(config, str) else config
    run = CalibrationRun(settings or GenerationSettings(), blocks_per_pass, reservoir_tokens,
                         progress=progress and (dist is None or dist.is_main), shards=shards)
    return quantize_pipeline(pipe, samples, cfg, run, out_dir, overwrite=overwrite, restart=restart, dist=dist)


def generate(pipe, image: Image.Image | str | Path, prompt: str, settings: GenerationSettings | None = None,
             seed: int = 0, out: str | Path | None = None, progress: bool = True):
    """Generate a video; with ``out`` also write it as MP4 and a frame-strip PNG beside it."""
    if not isinstance(image, Image.Image):
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
    formats = QuantConfig.from_dict(manifest["config"]).describe_formats()
    rows = []
    for attr, info in manifest["experts"].items():
        for name, layer in info["layers"].items():
            rep = layer.get("report", {})
            rows.append({
                "expert": attr, "role": info["role"], "layer": name, "shape": layer["shape"],
                "format": formats,
                "rank": layer["rank"], "alpha": rep.get("smooth", {}).get("alpha"), "clip": layer.get("clip_table"),
                "rel_err": rep.get("final", {}).get("rel_err"),
                "rel_err_per_bin": rep.get("final", {}).get("rel_err_per_bin"),
                "gptq_fallback": rep.get("gptq", {}).get("fallback"),
            })
    return rows


__all__ = ["load_base_pipeline", "default_settings", "load_calibration", "quantize", "load_quantized", "generate",
           "inspect", "init_distributed", "enable_context_parallel", "check_context_parallel_shape",
           "GenerationSettings", "QuantConfig", "PRESETS", "preset", "CheckpointError", "LOCAL_MODELS"]
