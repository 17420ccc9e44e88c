"""The Python API; the CLI (:mod:`wanquant.cli`) is a thin layer over these functions.

Typical use::

    import wanquant.api as wq
    model = "path/to/Wan2.2-I2V-A14B-Diffusers"                 # or "testbed", the embedded model
    pipe = wq.load_base_pipeline(model, device="cuda")
    samples = wq.load_calibration("calib.jsonl")
    wq.quantize(pipe, samples, "wan22-w4a4")                    # calibrate, quantize, save
    pipe = wq.load_base_pipeline(model, device="cuda", with_experts=False)
    wq.load_quantized(pipe, "wan22-w4a4")                       # quantized experts in place
    frames = wq.generate(pipe, "cat.png", "a cat surfing", out="cat.mp4")

LoRAs (diffusers/PEFT, original Wan, ComfyUI or Kohya files) go into the 16-bit branch of
the W4A4 layers, per expert, switchable without reloading (also on a BF16 pipeline)::

    wq.load_lora(pipe, "lightning_high.safetensors", expert="transformer")    # high noise
    wq.load_lora(pipe, "lightning_low.safetensors", expert="transformer_2")   # low noise
    wq.load_lora(pipe, "style.safetensors", strength=0.8)                     # both experts
    wq.set_lora_strengths(pipe, {"style": 0.5}); wq.list_loras(pipe); wq.unload_loras(pipe, ["style"])

Speed on Hopper: 8-bit self-attention and compiled blocks (set last; the first step at a
video size compiles)::

    wq.set_attention(pipe, "int8"); wq.set_compile(pipe, True)

GPUs of 12-24 GB (measured at full A14B scale: 720p x 81 in 16 GB, 480p x 81 in 12 GB,
at most 4 % slower than resident, ~30 GB of host memory; benchmarks/results/memory.md):
load into host memory and let a memory policy place the parts (only the running expert
on the GPU with ``"low"``; ``"auto"`` picks from the free memory and logs why)::

    pipe = wq.load_base_pipeline(model, device="cpu", with_experts=False)
    wq.load_quantized(pipe, "wan22-w4a4", device="cpu")
    wq.set_memory_policy(pipe, "auto", device="cuda", settings=wq.GenerationSettings(720, 1280, 81))

Several GPUs (every rank of a torchrun job runs the same calls): ``dist =
init_distributed()`` first, then ``quantize(..., dist=dist)``, or, after
``load_quantized``, ``enable_context_parallel(pipe)`` before ``generate``.

``"testbed"`` names the embedded model (a diffusers directory inside the package) and
its calibration split; every other model is a local diffusers directory. Settings left
out (``quantize``/``generate`` without ``settings``) are the model's own
(:func:`default_settings`: the testbed's size and 10 steps, Wan2.2's 480x832x81 and 40
steps), remembered by the pipeline :func:`load_base_pipeline` returns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from PIL import Image

from wanquant import testbed
from wanquant.artifacts.checkpoint import CheckpointError, OutputBusyError, check_output_free, read_manifest
from wanquant.calibration.config import CalibrationRun
from wanquant.calibration.run import quantize_pipeline
from wanquant.calibration.samples import CalibSample, check_samples, load_manifest
from wanquant.method.config import PRESETS, QuantConfig, preset
from wanquant.distributed import DistContext, init_distributed
from wanquant.loading import expected_layers, layer_coverage, load_quantized
from wanquant.lora.apply import list_loras, load_lora, set_lora_strengths, unload_loras
from wanquant.lora.files import LoraError
from wanquant.media import open_image, write_frame_strip, write_video
from wanquant.model.attention import MODES as ATTENTION_MODES
from wanquant.model.attention import AttentionUnavailableError, set_pipeline_attention
from wanquant.model.attention import check_attention_mode as check_attention
from wanquant.model.compile import compile_blocks, is_compiled, uncompile_blocks
from wanquant.model.wan import experts_of
from wanquant.model.offload import POLICIES as MEMORY_POLICIES
from wanquant.model.offload import MemoryPlan, apply_memory_policy, memory_plan_of, plan_for, replan
from wanquant.model.parallel import check_context_parallel_shape, enable_context_parallel
from wanquant.model.pipeline import (
    GenerationSettings, PipelineSource, load_pipeline, pipeline_class, run_pipeline, show_progress, source_of,
)
from wanquant.validate import (
    InputError, check_backend, check_blocks_left, check_calibration_run, check_checkpoint_out, check_prompt,
    check_settings, check_video_out, positive_int,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LocalModel:
    """A model that ships with wanquant: where it is and how it likes to be run."""

    path: Path
    settings: GenerationSettings  # its sampling defaults (quantize and generate)


LOCAL_MODELS = {
    "testbed": LocalModel(testbed.WEIGHTS_DIR, GenerationSettings(**testbed.SAMPLING, num_inference_steps=10)),
}
# Every model's VAE runs in fp32 unless asked otherwise, as Wan's own examples run it: the
# VAE is small next to the experts and decodes visibly better in fp32.
VAE_DTYPE = torch.float32


def _local_model(model: str | Path) -> LocalModel | None:
    """The :data:`LOCAL_MODELS` entry for a name, or for a path to one of their directories."""
    if str(model) in LOCAL_MODELS:
        return LOCAL_MODELS[str(model)]
    resolved = Path(model).resolve()
    return next((m for m in LOCAL_MODELS.values() if m.path.resolve() == resolved), None)


def model_path(model: str | Path) -> Path:
    """The diffusers directory of a model name or path."""
    local = _local_model(model)
    return local.path if local else Path(model)


def load_base_pipeline(model: str | Path = "testbed", device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.bfloat16, with_experts: bool = True,
                       vae_dtype: torch.dtype | None = VAE_DTYPE, progress: bool | None = None):
    """A diffusers Wan pipeline from a local directory, or a model in :data:`LOCAL_MODELS`.

    ``with_experts=False`` does not read the 16-bit experts (use it before
    :func:`load_quantized`, which brings its own). The VAE runs in ``vae_dtype`` (fp32 by
    default, for every model; None: ``dtype``). The pipeline remembers the model's
    :func:`default_settings`, which :func:`quantize` and :func:`generate` use when given
    no settings (see :func:`pipeline_defaults`).
    """
    return load_pipeline(model_path(model), device, dtype, with_experts=with_experts, vae_dtype=vae_dtype,
                         defaults=default_settings(model), progress=progress)


def pipeline_defaults(pipe) -> GenerationSettings:
    """The settings :func:`quantize` and :func:`generate` use without ``settings``: those of
    the model :func:`load_base_pipeline` loaded (recorded on the pipeline as its
    ``wanquant_source``), or Wan2.2's for a pipeline built another way."""
    source = source_of(pipe)
    return dataclasses.replace(source.defaults) if source is not None else GenerationSettings()


def check_quantize_inputs(model: str | Path, out_dir: str | Path, config: QuantConfig | str = "wanquant",
                          settings: GenerationSettings | None = None, blocks_per_pass: int | None = None,
                          reservoir_tokens: int = 4096, shards: int | None = None, overwrite: bool = False,
                          cond_only: bool = False, schedule: str = "expert_major",
                          stats_memory_gb: float | None = None) -> None:
    """Every check of a quantize run that needs no loaded model: numbers, the model
    directory, blocks left to quantize, and an output that is writable, replaceable and
    not being written by another run. The CLI runs it before loading anything;
    :func:`quantize` repeats what applies once the pipeline is loaded."""
    cfg = preset(config) if isinstance(config, str) else config
    settings = check_settings(settings or default_settings(model))
    check_calibration_run(blocks_per_pass, reservoir_tokens, shards)
    _calibration_run(settings, blocks_per_pass, reservoir_tokens, False, shards, cond_only, schedule, stats_memory_gb)
    path = model_path(model)
    pipeline_class(path)  # a diffusers directory of a Wan pipeline
    for attr in ("transformer", "transformer_2"):
        expert = PipelineSource(path).expert_config(attr)
        if expert is not None:
            check_blocks_left(cfg.precision.skip_blocks, int(expert["num_layers"]))
    check_checkpoint_out(out_dir, overwrite)
    check_output_free(out_dir)


def check_generate_inputs(settings: GenerationSettings, prompt: str, image: str | Path | None = None,
                          out: str | Path | None = None, backend: str = "auto", device: str | torch.device = "cpu",
                          model: str | Path | None = None, quantized: str | Path | None = None) -> None:
    """Every check of a generation that needs no loaded model (the CLI runs it first):
    the output path first, then the image, the model directory and the checkpoint's
    manifest (its checksums are verified when it is loaded)."""
    check_settings(settings)
    check_prompt(prompt, "--prompt (prompt)")
    check_backend(backend, device)
    if out is not None:
        check_video_out(out)
    if image is not None:
        open_image(image, "--image")
    if model is not None:
        pipeline_class(model_path(model))
    if quantized is not None:
        read_manifest(quantized, verify=False)


def default_settings(model: str | Path = "testbed") -> GenerationSettings:
    """Sampling defaults of a model (steps too, for quantize and generate alike): its own
    for :data:`LOCAL_MODELS` (by name or path), Wan2.2's otherwise."""
    local = _local_model(model)
    return dataclasses.replace(local.settings) if local else GenerationSettings()


def load_calibration(source: str | Path, count: int | None = None) -> list[CalibSample]:
    """Calibration samples from a JSONL manifest, or ``testbed`` (its calibration split);
    ``count``: only the first ``count`` (every line is still checked)."""
    positive_int(count, "--num-samples (count)", allow_none=True)
    if str(source) == "testbed":
        from wanquant.testbed.dataset import list_samples

        return [CalibSample(s.first_frame(), s.prompt, 1000 + i, f"testbed-calib:{i}")
                for i, s in enumerate(list_samples("calib", count or 4))]
    samples = load_manifest(source)
    return samples[:count] if count else samples


def _calibration_run(settings, blocks_per_pass, reservoir_tokens, progress, shards, cond_only, schedule,
                     stats_memory_gb) -> CalibrationRun:
    try:
        return CalibrationRun(settings, blocks_per_pass, reservoir_tokens, progress=progress, shards=shards,
                              cond_only=cond_only, schedule=schedule, stats_memory_gb=stats_memory_gb)
    except ValueError as e:  # a bad option: one line, before any work
        raise InputError(str(e)) from None


def quantize(pipe, samples: list[CalibSample], out_dir: str | Path, config: QuantConfig | str = "wanquant",
             settings: GenerationSettings | None = None, blocks_per_pass: int | None = None,
             reservoir_tokens: int = 4096, overwrite: bool = False, restart: bool = False,
             progress: bool | None = None, shards: int | None = None, dist: DistContext | None = None,
             cond_only: bool = False, schedule: str = "expert_major", stats_memory_gb: float | None = None) -> Path:
    """Calibrate on ``samples``, quantize both experts and write the checkpoint to ``out_dir``.

    ``settings``: the calibration forwards' sampling settings (default: the model's,
    :func:`pipeline_defaults`); ``shards``: split the samples into this many shards merged
    in shard order (the same shards give the same checkpoint on any number of processes);
    ``cond_only``: statistics from the conditional forwards only, as the paper's code
    (half the statistics work under classifier-free guidance; another checkpoint);
    ``schedule``: ``"expert_major"`` (one trajectory pass, one expert's weights and
    statistics on the device at a time) or ``"interleaved"`` (both experts hooked at once;
    the same statistics, more memory); ``stats_memory_gb``: device memory for statistics,
    beyond which Hessians are kept in host memory (slower; default: what is free less 6 GB);
    ``dist``: this process's place in a torchrun job (:func:`init_distributed`);
    ``progress``: bars (None: when stderr is a terminal). Arguments and the output are
    checked before any work; the output is locked while the run writes it.
    """
    cfg = preset(config) if isinstance(config, str) else config
    settings = check_settings(settings or pipeline_defaults(pipe))
    check_calibration_run(blocks_per_pass, reservoir_tokens, shards)
    main = dist is None or dist.is_main
    run = _calibration_run(settings, blocks_per_pass, reservoir_tokens, show_progress(progress) and main, shards,
                           cond_only, schedule, stats_memory_gb)
    check_samples(samples)
    if main:
        check_checkpoint_out(out_dir, overwrite)
    return quantize_pipeline(pipe, samples, cfg, run, out_dir, overwrite=overwrite, restart=restart, dist=dist)


def generate(pipe, image: Image.Image | str | Path, prompt: str, settings: GenerationSettings | None = None,
             seed: int = 0, out: str | Path | None = None, progress: bool | None = None):
    """Generate a video; with ``out`` also write it (MP4, or another suffix of
    :data:`wanquant.media.VIDEO_SUFFIXES`) and a frame-strip PNG beside it.

    ``settings``: default the model's (:func:`pipeline_defaults`); ``progress``: a labelled
    denoising bar (None: when stderr is a terminal). Arguments, the image and ``out`` are
    checked before generating.
    """
    settings = check_settings(settings or pipeline_defaults(pipe))
    check_prompt(prompt)
    if out is not None:
        out = check_video_out(out)
    if not isinstance(image, Image.Image):
        image = open_image(image)
    replan(pipe, settings.height, settings.width, settings.num_frames)  # a memory policy made for another size
    frames = run_pipeline(pipe, image, prompt, settings, seed, progress=progress)
    if out is not None:
        write_video(frames, out)
        write_frame_strip(frames, out.with_suffix(".png"))
    return frames


def set_memory_policy(pipe, memory: str = "auto", device: str | torch.device | None = None,
                      settings: GenerationSettings | None = None, budget_gb: float | None = None,
                      chunk_tokens: int | None = None) -> MemoryPlan:
    """Decide what sits on the GPU while generating, place the pipeline's parts and install
    the hooks that move the rest (:mod:`wanquant.model.offload`); logs and returns the plan.

    ``memory``: ``"resident"`` (both experts on the device), ``"low"`` (only the running
    expert; the other waits in pinned host memory and comes in block by block while its
    first forward computes) or ``"auto"`` (resident if it fits the device's free memory for
    this video size, else low). Both stream the text encoder through the device while it
    encodes unless the budget holds it beside everything else, tile the VAE and chunk the
    expert blocks as the budget allows. ``settings``: the video size planned for (default
    the model's; :func:`generate` re-plans for another size); ``budget_gb``: bytes (1e9)
    for tensors instead of what the device has free; ``chunk_tokens``: a fixed chunk size.
    Call it last, after :func:`load_quantized`, LoRAs and :func:`set_attention`. When both
    experts would not fit the GPU, load with ``device="cpu"`` and let the policy place them.
    """
    if memory not in MEMORY_POLICIES:
        raise InputError(f"memory policy {memory!r}: choose one of {', '.join(MEMORY_POLICIES)}")
    positive_int(chunk_tokens, "chunk_tokens", allow_none=True)
    if budget_gb is not None and not budget_gb > 0:
        raise InputError(f"budget_gb must be positive, got {budget_gb}")
    settings = check_settings(settings or pipeline_defaults(pipe))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = plan_for(pipe, memory, device, settings.height, settings.width, settings.num_frames,
                    None if budget_gb is None else budget_gb * 1e9, chunk_tokens, settings.max_sequence_length)
    (log.info if plan.fits else log.warning)("%s", plan.describe())
    return apply_memory_policy(pipe, plan)


def set_attention(pipe, mode: str = "sdpa", device: str | torch.device | None = None) -> str:
    """Self-attention of every expert: ``"sdpa"`` (PyTorch SDPA, diffusers' default),
    ``"int8"`` (wanquant's 8-bit kernel: INT8 Q.K^T, FP8 P.V; CUDA sm_89+ with Triton,
    else :class:`AttentionUnavailableError`) or ``"auto"`` (int8 on a Hopper GPU, where it
    is measured, else sdpa; ``device``: where generation runs, default the current CUDA
    device). Cross-attention stays on SDPA. Logs and returns what was set (with why, for
    auto). Call it after :func:`load_quantized` (which replaces the experts).
    """
    description = set_pipeline_attention(pipe, mode, device)
    log.info("attention: %s", description)
    return description


def set_compile(pipe, enabled: bool = True, mode: str | None = None) -> str:
    """``torch.compile`` each transformer block of every expert (regional compilation: one
    compiled block serves all 40, :mod:`wanquant.model.compile`), or undo it
    (``enabled=False``). W4A4 layers and the 8-bit attention enter the graph as custom
    ops, so the elementwise work around them is fused. The first forward at each video
    size (and, for W4A4, each timestep bin) compiles; later ones reuse it. ``mode`` goes
    to ``torch.compile`` (None: its default). Call it last, after :func:`load_quantized`,
    LoRAs and :func:`set_attention`; not with a memory policy (:func:`set_memory_policy`)
    or context parallelism yet. Logs and returns what was set.
    """
    experts = experts_of(pipe)
    if not enabled:
        for e in experts:
            uncompile_blocks(e.module)
        description = "torch.compile: off"
    else:
        if memory_plan_of(pipe) is not None:
            raise InputError("compile with a memory policy is not supported yet: use one or the other")
        if any(getattr(getattr(a, "processor", None), "_parallel_config", None) is not None
               for e in experts for a in e.module.modules() if hasattr(a, "processor")):
            raise InputError("compile with context parallelism is not supported yet")
        counts = [(e.attr, compile_blocks(e.module, mode=mode)) for e in experts]
        where = ", ".join(f"{attr} ({n} blocks)" for attr, n in counts)
        description = (f"torch.compile: each block of {where}, mode {mode or 'default'}, static shapes "
                       "(the first step at a video size compiles)")
    log.info("%s", description)
    return description


def compile_enabled(pipe) -> bool:
    """Whether :func:`set_compile` compiled the pipeline's experts."""
    return any(is_compiled(e.module) for e in experts_of(pipe))


def inspect(qdir: str | Path, verify: bool = True) -> dict:
    """What a checkpoint holds: ``{"experts": {attr: coverage}, "layers": [row, ...]}``.

    Coverage per expert: role, ``quantized`` of ``expected`` layers (what its config and
    the precision policy call for), and the names ``missing``, ``unexpected`` or with a
    ``wrong_shape``; ``complete`` is False on any shortfall. One row per quantized layer:
    expert, name, shape, format, rank, clip table, errors.
    """
    manifest = read_manifest(qdir, verify=verify)
    cfg = QuantConfig.from_dict(manifest["config"])
    formats = cfg.describe_formats()
    experts, rows = {}, []
    for attr, info in manifest["experts"].items():
        config = json.loads((Path(qdir) / attr / "config.json").read_text())
        config.pop("quantization_config", None)
        cov = layer_coverage(info["layers"], expected_layers(config, cfg))
        cov["complete"] = not (cov["missing"] or cov["unexpected"] or cov["wrong_shape"])
        experts[attr] = {"role": info["role"], **cov}
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
    return {"experts": experts, "layers": rows}


__all__ = ["load_base_pipeline", "default_settings", "pipeline_defaults", "model_path", "load_calibration",
           "quantize", "load_quantized", "generate", "inspect", "check_quantize_inputs", "check_generate_inputs",
           "InputError", "OutputBusyError", "init_distributed", "enable_context_parallel", "check_context_parallel_shape",
           "GenerationSettings", "QuantConfig", "PRESETS", "preset", "CheckpointError", "LOCAL_MODELS",
           "load_lora", "set_lora_strengths", "unload_loras", "list_loras", "LoraError", "set_attention",
           "set_compile", "compile_enabled",
           "ATTENTION_MODES", "AttentionUnavailableError", "check_attention",
           "set_memory_policy", "memory_plan_of", "MemoryPlan", "MEMORY_POLICIES"]
