"""Wan pipelines in diffusers: loading one from a directory, encoding prompts, one generation.

Part of the model adapter (:mod:`wanquant.model`): the only place that calls a diffusers
pipeline. :class:`GenerationSettings` records what a generation (or a calibration run)
asks of it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

# The pipeline classes wanquant runs; image-to-video ones take a first frame.
IMAGE_TO_VIDEO = ("WanImageToVideoPipeline",)
TEXT_TO_VIDEO = ("WanPipeline",)
# Frame height and width must be multiples of this: the VAE downsamples 8x, then the
# experts cut 2x2 patches.
SIZE_MULTIPLE = 16
# The attribute under which load_pipeline records a pipeline's PipelineSource.
SOURCE_ATTR = "wanquant_source"


class _TorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' notice that CLIPImageProcessor falls back to its PIL backend.

    Importing diffusers' Wan pipelines imports CLIPImageProcessor; without torchvision
    (wanquant needs none) transformers warns about it on every command. Only that one
    message is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())


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


@dataclass(frozen=True)
class PipelineSource:
    """Where a pipeline was loaded from, and the sampling defaults of that model.

    :func:`load_pipeline` stores it on the pipeline as ``pipe.wanquant_source``
    (:data:`SOURCE_ATTR`); read it with :func:`source_of`.
    """

    path: Path
    defaults: GenerationSettings = field(default_factory=GenerationSettings)

    def expert_config(self, attr: str) -> dict | None:
        """The 16-bit expert's config.json in the model directory (None if it has none)."""
        f = self.path / attr / "config.json"
        return json.loads(f.read_text()) if f.is_file() else None


def source_of(pipe) -> PipelineSource | None:
    """The :class:`PipelineSource` :func:`load_pipeline` recorded, or None for a pipeline built otherwise."""
    return getattr(pipe, SOURCE_ATTR, None)


def show_progress(requested: bool | None = None) -> bool:
    """Whether to draw progress bars: ``None`` means when stderr is a terminal (or a notebook)."""
    if requested is not None:
        return requested
    return sys.stderr.isatty() or "ipykernel" in sys.modules


@contextlib.contextmanager
def _library_progress_bars(enabled: bool):
    """diffusers' and transformers' loading bars on or off for the duration (restored after)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    for lib in (dlog, tlog):
        lib.enable_progress_bar() if enabled else lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in zip((dlog, tlog), before):
            lib.enable_progress_bar() if was else lib.disable_progress_bar()


def pipeline_class(path: str | Path) -> type:
    """The Wan pipeline class named in a diffusers directory's ``model_index.json``."""
    import diffusers

    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json); "
                                "download the model first (wanquant never downloads at run time)")
    name = json.loads(index_file.read_text()).get("_class_name")
    if name not in IMAGE_TO_VIDEO + TEXT_TO_VIDEO:
        raise ValueError(f"{path} holds a {name!r}; wanquant runs {', '.join(IMAGE_TO_VIDEO + TEXT_TO_VIDEO)}")
    return getattr(diffusers, name)


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                  with_experts: bool = True, vae_dtype: torch.dtype | None = None,
                  defaults: GenerationSettings | None = None, progress: bool | None = None):
    """A Wan pipeline from a local diffusers directory, never from the network.

    ``with_experts=False`` does not read the 16-bit experts at all (the pipeline class's
    own ``from_pretrained`` honours ``transformer=None``; the generic
    ``DiffusionPipeline.from_pretrained`` would load them anyway). ``vae_dtype``: the VAE's
    dtype when it differs from ``dtype``. The pipeline records its :class:`PipelineSource`
    (this path and ``defaults``, Wan2.2's when None); ``progress``: see :func:`show_progress`.
    """
    cls = pipeline_class(path)
    dtypes = dtype if vae_dtype is None else {"default": dtype, "vae": vae_dtype}
    skip = {} if with_experts else {"transformer": None, "transformer_2": None}
    with _library_progress_bars(show_progress(progress)):
        pipe = cls.from_pretrained(str(path), dtype=dtypes, local_files_only=True, **skip)
    setattr(pipe, SOURCE_ATTR, PipelineSource(Path(path), defaults or GenerationSettings()))
    return pipe.to(device)


def is_image_to_video(pipe) -> bool:
    return type(pipe).__name__ in IMAGE_TO_VIDEO


def encode_prompts(pipe, prompt: str, negative_prompt: str, settings: GenerationSettings,
                   device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings in the experts' dtype, so the pipeline passes these exact tensors on.

    Without gradients: the text encoder's parameters require them as loaded, and an
    autograd graph behind the embeddings would keep every weight the encoder used alive
    as long as the embeddings live (the whole video), on the GPU where the encoder was
    streamed through it (measured: 29 GB for two prompts of UMT5-XXL, benchmarks/memory.py).
    """
    cfg = settings.guidance_scale > 1.0
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=cfg,
                                      max_sequence_length=settings.max_sequence_length, device=device)
    expert = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    dtype = next(p.dtype for p in expert.parameters() if p.is_floating_point())
    return pos.to(dtype), (neg.to(dtype) if neg is not None else None)


def run_pipeline(pipe, image: Image.Image | None, prompt: str, settings: GenerationSettings, seed: int,
                 output_type: str = "np", prompt_embeds=None, negative_prompt_embeds=None,
                 progress: bool | None = False):
    """One generation; returns the pipeline's frames (``np``: [F, H, W, 3] floats in [0, 1]).

    ``progress``: a labelled denoising bar (None: when stderr is a terminal)."""
    device = pipe._execution_device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if prompt_embeds is None:
        prompt_embeds, negative_prompt_embeds = encode_prompts(pipe, prompt, settings.negative_prompt, settings, device)
    pipe.set_progress_bar_config(desc="denoising steps", disable=not show_progress(progress))
    kwargs = dict(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        height=settings.height, width=settings.width, num_frames=settings.num_frames,
        num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
        generator=generator, output_type=output_type,
    )
    if is_image_to_video(pipe):
        if image is None:
            raise ValueError(f"{type(pipe).__name__} is image-to-video: give it a first frame")
        kwargs["image"] = image
    if getattr(pipe.config, "boundary_ratio", None) is not None:
        kwargs["guidance_scale_2"] = settings.guidance_scale_2
    with torch.inference_mode():
        out = pipe(**kwargs)
    return out.frames[0]


def denoising_timesteps(pipe, settings: GenerationSettings) -> list[float]:
    """The timesteps a generation with ``settings`` denoises (the scheduler's, set on a copy)."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(settings.num_inference_steps, device="cpu")
    return [float(t) for t in scheduler.timesteps]


def guidance_branches(settings: GenerationSettings) -> int:
    """Expert forwards per denoising step: cond and uncond under classifier-free guidance
    (diffusers' Wan pipelines decide it from ``guidance_scale`` alone, for both experts)."""
    return 2 if settings.guidance_scale > 1.0 else 1


def video_tokens(pipe, height: int, width: int, num_frames: int) -> int:
    """Tokens of one transformer forward for a video of this size."""
    expert = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.transformer_2
    p_t, p_h, p_w = expert.config.patch_size
    st, ss = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    frames = (num_frames - 1) // st + 1
    return (frames // p_t) * (height // ss // p_h) * (width // ss // p_w)
