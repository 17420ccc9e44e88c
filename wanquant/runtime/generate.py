"""Running a Wan image-to-video pipeline with explicit, recorded settings; writing videos."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass
class GenerationSettings:
    """What a generation (or a calibration run) asks of the pipeline."""

    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 40
    guidance_scale: float = 3.5
    guidance_scale_2: float | None = None
    negative_prompt: str = ""
    max_sequence_length: int = 512

    def to_dict(self) -> dict:
        return asdict(self)


def encode_prompts(pipe, prompt: str, negative_prompt: str, settings: GenerationSettings, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings in the experts' dtype, so the pipeline passes these exact tensors on."""
    cfg = settings.guidance_scale > 1.0
    pos, neg = pipe.encode_prompt(prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=cfg,
                                  max_sequence_length=settings.max_sequence_length, device=device)
    expert = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    dtype = next(p.dtype for p in expert.parameters() if p.is_floating_point())
    return pos.to(dtype), (neg.to(dtype) if neg is not None else None)


def takes_image(pipe) -> bool:
    """Image-to-video pipelines take ``image``; text-to-video ones (WanPipeline) do not."""
    return "image" in inspect.signature(type(pipe).__call__).parameters


def run_pipeline(pipe, image: Image.Image | None, prompt: str, settings: GenerationSettings, seed: int,
                 output_type: str = "np", prompt_embeds=None, negative_prompt_embeds=None, progress: bool = False):
    """One generation; returns the pipeline's frames (``np``: [F, H, W, 3] floats in [0, 1])."""
    device = pipe._execution_device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if prompt_embeds is None:
        prompt_embeds, negative_prompt_embeds = encode_prompts(pipe, prompt, settings.negative_prompt, settings, device)
    pipe.set_progress_bar_config(disable=not progress)
    kwargs = dict(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        height=settings.height, width=settings.width, num_frames=settings.num_frames,
        num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
        generator=generator, output_type=output_type,
    )
    if takes_image(pipe):
        if image is None:
            raise ValueError(f"{type(pipe).__name__} is image-to-video: give it a first frame")
        kwargs["image"] = image
    if getattr(pipe.config, "boundary_ratio", None) is not None:
        kwargs["guidance_scale_2"] = settings.guidance_scale_2
    with torch.inference_mode():
        out = pipe(**kwargs)
    frames = out.frames[0]
    return frames


def to_uint8(frames) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return arr


def write_video(frames, path: str | Path, fps: int = 16) -> Path:
    """Write frames [F, H, W, 3] as MP4 (H.264 through the ffmpeg imageio-ffmpeg bundles)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(frames)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    # macro_block_size=1 keeps odd testbed sizes; yuv420p keeps browsers able to play it.
    with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1, quality=8,
                            pixelformat="yuv420p") as w:
        for f in arr:
            w.append_data(f)
    tmp.replace(path)
    return path


def write_frame_strip(frames, path: str | Path, max_frames: int = 8) -> Path:
    """A PNG of evenly spaced frames side by side."""
    arr = to_uint8(frames)
    idx = np.linspace(0, len(arr) - 1, num=min(max_frames, len(arr))).round().astype(int)
    strip = np.concatenate([arr[i] for i in idx], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).save(path)
    return path
