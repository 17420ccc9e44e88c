"""Quantized inference on several GPUs with diffusers' context parallelism (Ulysses / ring).

    torchrun --nproc_per_node 4 -m wanquant.cli generate --quantized q --ulysses-degree 4 ...

or from Python, in every rank of a torchrun job::

    dist = init_distributed("cuda")                     # cuda:LOCAL_RANK, NCCL
    pipe = load_base_pipeline(model, dist.device, with_experts=False)
    load_quantized(pipe, qdir, device=dist.device)      # 1. W4A4 experts in place
    enable_context_parallel(pipe, ulysses_degree=4)     # 2. then split the sequence
    frames = run_pipeline(pipe, ...)                    # same inputs and seed on every rank

Nothing here schedules work: diffusers (0.42.1: ``ContextParallelConfig``,
``ModelMixin.enable_parallelism`` and ``WanTransformer3DModel._cp_plan``) splits the
video tokens across ranks at ``blocks.0``, runs self-attention through an all-to-all
(Ulysses) or a ring of K/V exchanges, and gathers the tokens again after ``proj_out``.
Each rank runs the whole denoising loop on the same latents (same seed), so every rank
ends with the whole video.

Order matters. diffusers keeps its split/gather hooks on module instances (the root,
``rope``, ``blocks.0`` and ``proj_out``); replacing those modules afterwards drops them
silently. So install the W4A4 layers first (``load_quantized`` builds new experts), then
call :func:`enable_context_parallel` (it refuses an expert that already has its hooks;
:func:`check_context_parallel` says whether they are still there).

Why wanquant's runtime keeps working on a split sequence:
* W4A4 quantizes activations per token (groups along K), so a token's result does not
  depend on which rank holds it;
* the timestep-bin and context hook (:func:`wanquant.model.wan.attach_runtime`) is a
  ``torch`` forward pre-hook, which runs before diffusers' wrapped ``forward`` and so
  sees the whole ``timestep`` and ``encoder_hidden_states``: every rank picks the same
  bin and the same cond/uncond cache entry;
* cross-attention K/V read the text, which the Wan plan does not split (diffusers
  computes cross-attention locally: the rank's query tokens against all text tokens), so
  the per-video ``attn2.to_kv`` cache holds the whole text's K/V on every rank; it is
  keyed by the context tensor and the input shape, both the same as without CP.
This module refuses a custom plan that would split ``encoder_hidden_states``.

Attention backends: Ulysses runs with diffusers' default ``native`` backend (PyTorch
SDPA). Ring attention (``ring_degree > 1``, alone or with Ulysses) merges partial results
through their log-sum-exp, which ``native`` does not return; for it this module selects
``_native_flash`` (PyTorch's flash kernel, CUDA, bf16/fp16) unless ``attention_backend``
names another LSE-capable one (``_native_cudnn``, ``flash``, ``_flash_3_hub``, ``sage``...).
So ring attention needs GPUs; on the CPU only Ulysses runs.

CPU: diffusers 0.42.1 picks the rank's device as ``rank % torch.accelerator.device_count()``,
which fails without an accelerator. On a gloo group without one, :func:`enable_context_parallel`
presents a single accelerator while it builds the mesh (the mesh itself is on the CPU):
that is only for tests and dry runs; the numbers that matter come from GPUs.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from unittest import mock

import torch
import torch.distributed as tdist

from wanquant.model.pipeline import video_tokens
from wanquant.model.wan import experts_of, runtime_state
from wanquant.runtime.expert import quantized_layers

log = logging.getLogger(__name__)

# The module ids whose hooks carry the split and the gather in diffusers' Wan plan.
_HOOKED = ("", "rope", "blocks.0", "proj_out")


@dataclass(frozen=True)
class ContextParallelInfo:
    ulysses_degree: int
    ring_degree: int
    world_size: int
    device_type: str
    experts: tuple[str, ...]
    quantized_layers: int
    attention_backend: str


@contextlib.contextmanager
def _cpu_accelerator_shim(device_type: str):
    """diffusers divides by the accelerator count; without one (CPU/gloo) pretend there is one."""
    if device_type == "cpu" and torch.accelerator.device_count() == 0:
        with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
            yield
    else:
        yield


def _device_type() -> str:
    backend = str(tdist.get_backend()).lower()
    return "cuda" if backend == "nccl" else "cpu"


def check_context_parallel_shape(pipe, height: int, width: int, num_frames: int, world_size: int | None = None) -> int:
    """Raise a clear error when the video's tokens cannot be split evenly (diffusers asserts)."""
    world = world_size or (tdist.get_world_size() if tdist.is_initialized() else 1)
    n = video_tokens(pipe, height, width, num_frames)
    if n % world:
        raise ValueError(f"{height}x{width}x{num_frames} gives {n} tokens per forward, not divisible by {world} "
                         "context-parallel ranks; change the size or the number of GPUs")
    return n


def enable_context_parallel(pipe, ulysses_degree: int | None = None, ring_degree: int = 1,
                            mesh=None, plan: dict | None = None,
                            attention_backend: str | None = None) -> ContextParallelInfo:
    """Split every expert's sequence over the process group (Ulysses x ring = world size).

    Call in every rank after the quantized experts are in place (see the module doc).
    ``ulysses_degree`` defaults to the world size divided by ``ring_degree``. ``mesh``: an
    existing ``DeviceMesh`` with dims ("ring", "ulysses"); ``plan``: a custom
    ``_cp_plan`` (default: the model's); ``attention_backend``: a diffusers attention
    backend to set on the experts first (default: unchanged for Ulysses, ``_native_flash``
    when ``ring_degree > 1``).
    """
    if not (tdist.is_available() and tdist.is_initialized()):
        raise RuntimeError("context parallelism needs torch.distributed: start with torchrun and call "
                           "wanquant.distributed.init_distributed() first")
    from diffusers import ContextParallelConfig

    world = tdist.get_world_size()
    if ulysses_degree is None:
        if world % ring_degree:
            raise ValueError(f"ring_degree {ring_degree} does not divide the world size {world}")
        ulysses_degree = world // ring_degree
    if ulysses_degree * ring_degree != world:
        raise ValueError(f"ulysses_degree x ring_degree = {ulysses_degree} x {ring_degree} must equal the number "
                         f"of processes ({world})")
    device_type = _device_type()
    if ring_degree > 1 and attention_backend is None:
        if device_type != "cuda":
            raise ValueError("ring attention needs an attention backend that returns the log-sum-exp, and diffusers "
                             "has none on the CPU; use ulysses_degree (ring_degree=1) here, ring on GPUs")
        attention_backend = "_native_flash"
    experts = experts_of(pipe)
    n_quant = 0
    for e in experts:
        m = e.module
        if getattr(m, "_parallel_config", None) is not None:
            raise RuntimeError(f"{e.attr} already has parallelism enabled; enable it once, after loading the "
                               "quantized experts")
        heads = m.config.num_attention_heads
        if ulysses_degree > 1 and heads % ulysses_degree:
            raise ValueError(f"{e.attr} has {heads} attention heads, not divisible by ulysses_degree "
                             f"{ulysses_degree}; use ring_degree for the rest")
        layers = quantized_layers(m)
        if layers:
            if runtime_state(m) is None:
                raise RuntimeError(f"{e.attr} has W4A4 layers but no runtime state/hook; load it with "
                                   "load_quantized (or bind_expert) before enabling context parallelism")
            n_quant += len(layers)
        cp_plan = plan if plan is not None else m._cp_plan
        for key, entry in (cp_plan or {}).items():
            if isinstance(entry, dict) and "encoder_hidden_states" in entry:
                raise ValueError(f"the context-parallel plan splits encoder_hidden_states at {key!r}: the text must "
                                 "stay whole on every rank (cross-attention and the W4A4 k/v cache read all of it)")
    with _cpu_accelerator_shim(device_type):
        if mesh is None:
            mesh = torch.distributed.device_mesh.init_device_mesh(
                device_type, (ring_degree, ulysses_degree), mesh_dim_names=("ring", "ulysses"))
        for e in experts:
            if attention_backend is not None:
                e.module.set_attention_backend(attention_backend)
            cfg = ContextParallelConfig(ring_degree=ring_degree, ulysses_degree=ulysses_degree, mesh=mesh)
            e.module.enable_parallelism(config=cfg, cp_plan=plan)
            e.module._wanquant_cp = (ulysses_degree, ring_degree)
    info = ContextParallelInfo(ulysses_degree, ring_degree, world, device_type, tuple(e.attr for e in experts), n_quant,
                               attention_backend or "default")
    log.info("context parallel: %s", info)
    return info


def check_context_parallel(pipe) -> dict[str, bool]:
    """Per expert: are diffusers' split/gather hooks still on the modules that carry them?"""
    out = {}
    for e in experts_of(pipe):
        ok = getattr(e.module, "_parallel_config", None) is not None
        for mid in _HOOKED:
            mod = e.module.get_submodule(mid) if mid else e.module
            registry = getattr(mod, "_diffusers_hook", None)
            ok = ok and registry is not None and any(name.startswith("cp_") for name in registry.hooks)
        out[e.attr] = ok
    return out
