"""Memory policies of a Wan pipeline: what sits on the accelerator when, and the hooks that move it.

Part of the model adapter: it knows what an expert is, when each one runs and what the
text encoder and the VAE are; the moving itself is :mod:`wanquant.runtime.offload`.

Policies (:data:`POLICIES`):

* ``resident``: both experts and the VAE stay on the device;
* ``low``: only the running expert is on the device. Each expert is one group for its
  16-bit rest (embedders, output projection, modulation) plus one group per block, all
  in pinned host memory. When an expert starts a forward, the other expert and the VAE
  are evicted, the allocator's cache is handed back, and the copies of all its kept
  blocks are queued on a side stream at once (a block copies in milliseconds and computes
  in tens of them); each block's W4A4 layers build their fast-path operands as soon as
  its copy lands. All of it is allocated before the first activation, so what the expert
  keeps is not scattered between a forward's transient tensors (see
  :meth:`_PolicyState.bring_in`); after that it stays resident. Wan2.2 switches
  expert once per video (high noise for ``t >= boundary``, then low noise), so this
  happens at the boundary step, right after the high-noise expert's last step, and again
  when the next video starts. When the budget cannot hold a whole expert beside its
  activations, the plan keeps the first ``kept_blocks`` blocks and streams the others
  through the device at every forward (each copied in one ahead, evicted after use).
  The fast path's repacked operands of a W4A4 layer are rebuilt on arrival and dropped
  on eviction (``W4A4Linear.release_device_state``): transient, not moved;
* ``auto``: the first of these that fits :func:`device_budget` for the video's size, by
  the table in :func:`plan_memory`.

In both policies the text encoder is either kept on the device (only where the budget
holds it beside everything else) or streamed: its blocks pass through the device one at
a time while it encodes (embedding tables are looked up in host memory), so after
encoding nothing of it is on the device. The VAE is tiled and on the device only while
it encodes or decodes (and between videos): out while an expert runs. Token chunking
of the expert blocks (:mod:`wanquant.model.block`) gets the largest chunk the budget
allows. Applying a policy first moves everything of the previous one back to its host
copy and drops the fast path's operands, so no arrangement outlives its policy.

Host memory: the groups hold the only host copy of what they move (pinned in place, exact
size). Building a group frees its sources as it goes (the heap is trimmed after each), and
hands back the pages of sources a loader memory-mapped from their file: transformers maps
safetensors, and the embedding table left in host memory keeps the map open, so without
this UMT5-XXL's blocks (9.3 GB, read once by the copy) would stay resident beside their
pinned copy (reproduced on a CPU at small scale; it matches the 9003b3d run's host peaks).
The table itself is resident only where prompts read it.

Apply with :func:`apply_memory_policy` (the API's ``wanquant.api.set_memory_policy``);
the pipeline keeps its :class:`MemoryPlan` (:func:`memory_plan_of`).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from wanquant.model.block import (
    disable_token_chunking,
    enable_token_chunking,
    token_chunks,
)
from wanquant.model.wan import blocks_of, experts_of, set_static_kv_cache
from wanquant.runtime.expert import quantized_layers
from wanquant.runtime.memory import release_static_caches
from wanquant.runtime.offload import (
    GroupSequence,
    TensorGroup,
    Transfer,
    module_slots,
    move_to,
    run_on_host,
    trim_host_heap,
)

log = logging.getLogger(__name__)

POLICIES = ("auto", "resident", "low")
# Modules of a Wan expert that run once at the start of each forward: in ``low`` they come in
# for that moment only (copied during the gap between forwards) and leave before the blocks
# run, so the blocks' activation peak does not hold them (0.52 GB per A14B expert, mostly
# the 5120 -> 6 x 5120 timestep projection).
PER_FORWARD_ATTRS = ("condition_embedder",)
GB = 1e9
STATE_ATTR = "_wanquant_memory"

# --------------------------------------------------------------------------------------
# what a video needs (fitted to benchmarks/results/full_scale.json: A14B, W4A4, 81 frames)
# Activations of one expert forward with chunked blocks: what lives at full length through a
# block (its input, the q/k/v buffers, rotary tables) plus one chunk's temporaries, in bytes
# per token and per unit of model width; 2.09 GB at 480p and 3.99 (measured 4.01) at 720p
# with chunks of 8192 tokens, 4.42 (4.44) with 16384. Unchunked (stock block): 3.73 / 8.60 GB.
FULL_BYTES_PER_TOKEN_DIM = 8.8
CHUNK_BYTES_PER_TOKEN_DIM = 11.1
UNCHUNKED_BYTES_PER_TOKEN_DIM = 22.3
ACTIVATION_FIXED_BYTES = 0.15 * GB
# Tiled VAE decoding with the pipeline's post-processing: 2.05 GB at 480x832x81, 4.18 at 720p.
DECODE_FIXED_BYTES = 0.42 * GB
DECODE_BYTES_PER_PIXEL = 50.4
# Chunk sizes tried, fastest first (None: unchunked); explicit ones may be any positive size.
CHUNK_CHOICES: tuple[int | None, ...] = (None, 16384, 8192, 4096, 2048)
DEFAULT_CHUNK = 8192
# The caching allocator reserves more than it hands out (block rounding, fragmentation).
RESERVED_FACTOR = 1.03
RESERVED_SLACK = 0.1 * GB
# Under an allocator cap (set_per_process_memory_fraction) the CUDA context and libraries
# still need memory outside it: a 12 GB card leaves about 11 GB to tensors.
CONTEXT_RESERVE = 1.0 * GB
# Room ``low`` keeps on top of its estimate (allocator rounding, the copy in flight, the
# model's error). Its first full-scale runs ran out of memory because the prompt embeddings'
# autograd graph kept every streamed text-encoder block on the GPU (fixed: encode_prompts
# runs without gradients); the per-stage census of benchmarks/memory.py then found the
# parts as this model counts them (expert 8.01 GB + 0.56 GB fast-path operands, VAE 0.51,
# scratch 0.08, activations 2.15 GB at 480p).
LOW_SLACK = 0.8 * GB
# What the caching allocator holds beyond the live tensors in ``low``, in chunks' worth of
# activation temporaries (CHUNK_BYTES_PER_TOKEN_DIM x dim x chunk): transient tensors of
# a chunk leave holes that only same-sized ones fill. Measured on an H100 (memory run of
# 9003b3d, expandable segments): reserved - allocated = 2.64 GB at 720p with chunks of
# 16384 (1.03 x allocated + 0.1 GB explains 0.48 of it: 2.3 chunks' worth beyond), 1.04 GB
# at 480p with 8192 (1.4 chunks beyond). That run let the arriving expert's blocks and
# fast-path operands be allocated between activations; they now arrive before them
# (:meth:`_PolicyState.bring_in`), so 2 chunks is meant as an upper bound.
LOW_FRAGMENT_CHUNKS = 2.0
# Streamed blocks on the device at once: the one computing and the one being copied in.
STREAM_WINDOW = 2


def activation_bytes(tokens: int, chunk: int | None, dim: int) -> int:
    """Peak activation bytes of one expert forward of ``tokens`` tokens at model width ``dim``."""
    if chunk is None or tokens <= chunk:
        return int(ACTIVATION_FIXED_BYTES + UNCHUNKED_BYTES_PER_TOKEN_DIM * dim * tokens)
    size = max(s.stop - s.start for s in token_chunks(tokens, chunk))
    full = FULL_BYTES_PER_TOKEN_DIM * dim * tokens
    return int(ACTIVATION_FIXED_BYTES + full + CHUNK_BYTES_PER_TOKEN_DIM * dim * size)


def fragment_bytes(tokens: int, chunk: int | None, dim: int) -> int:
    """Room ``low`` keeps for the allocator's holes: :data:`LOW_FRAGMENT_CHUNKS` chunks' temporaries."""
    size = tokens if chunk is None else min(tokens, max(s.stop - s.start for s in token_chunks(tokens, chunk)))
    return int(LOW_FRAGMENT_CHUNKS * CHUNK_BYTES_PER_TOKEN_DIM * dim * size)


def decode_bytes(pixels: int) -> int:
    """Device bytes of tiled VAE decoding of ``pixels`` (frames x height x width)."""
    return int(DECODE_FIXED_BYTES + DECODE_BYTES_PER_PIXEL * pixels)


def reserved_for(allocated: float) -> float:
    """What the caching allocator reserves to hand out ``allocated`` bytes (an estimate)."""
    return allocated * RESERVED_FACTOR + RESERVED_SLACK


@dataclass(frozen=True)
class Footprint:
    """Device bytes of the pipeline's parts, as they would be resident (see :func:`measure_footprint`)."""

    expert: int  # the larger expert, with the fast path's repacked operands
    experts: int  # number of experts
    text_encoder: int  # whole, as it would sit on the device
    text_encoder_streamed: int  # peak while streamed: two blocks and the rest
    vae: int
    scratch: int  # the fast path's shared FP8 weight buffer
    dim: int  # model width (activations scale with it)
    kv_cache: int = 0  # every expert's cached text keys/values, cond and uncond
    per_forward: int = 0  # of ``expert``: embedders ``low`` holds only at the start of a forward
    blocks: int = 0  # transformer blocks of the larger expert
    block: int = 0  # the largest block on the device as it streams (its L1/L2 and fast-path operands too)

    @property
    def rest(self) -> int:
        """Of ``expert``: what is neither a block nor a per-forward embedder (``low`` keeps it)."""
        return max(0, self.expert - self.per_forward - self.blocks * self.block)


@dataclass(frozen=True)
class VideoSize:
    tokens: int  # per expert forward
    pixels: int  # frames x height x width
    label: str = ""
    text_tokens: int = 512  # the prompt embeddings' length (max_sequence_length)


@dataclass
class MemoryPlan:
    """What a policy puts where, and why."""

    requested: str
    policy: str  # "resident" or "low"
    device: str
    text_encoder: str  # "device" or "stream"
    chunk_tokens: int | None
    budget_bytes: int | None
    need_bytes: int
    fits: bool
    reason: str
    video: VideoSize = field(default_factory=lambda: VideoSize(0, 0))
    budget_source: str = ""
    chunk_requested: int | None = None
    # The per-context text key/value cache saves ~0.1 % of a forward (the chunked block
    # computes them once per forward anyway) for 0.84 GB per A14B expert: only with room to spare.
    kv_cache: bool = False  # an explicit chunk size, kept when the plan is redone
    # ``low``: blocks of the running expert that stay on the device once in (None: all); the
    # others stream through it at every forward, copied in one ahead of use.
    kept_blocks: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        chunks = "unchunked" if self.chunk_tokens is None else f"token chunks of {self.chunk_tokens}"
        head = (f"memory={self.requested}: {self.policy} ({chunks}, text encoder {self.text_encoder}, "
                f"text k/v cache {'on' if self.kv_cache else 'off'}")
        if self.policy == "low" and self.kept_blocks is not None:
            head += f", {self.kept_blocks} blocks kept, the rest streamed"
        return head + f", ~{self.need_bytes / GB:.1f} GB needed) - {self.reason}"


def low_bytes(fp: Footprint, video: VideoSize, chunk: int | None, kept: int | None = None) -> int:
    """Peak device bytes of ``low`` with ``kept`` blocks kept (None: all) and the rest streamed.

    The VAE is out while an expert runs, the experts are out while the VAE runs; the
    embedders come in at the start of a forward, before the activations grow. The
    denoising peak includes :func:`fragment_bytes` (the allocator's holes between chunks).
    """
    act = activation_bytes(video.tokens, chunk, fp.dim) + fragment_bytes(video.tokens, chunk, fp.dim)
    streamed = 0 if kept is None else max(0, fp.blocks - kept)
    on = fp.expert - fp.per_forward if streamed == 0 else fp.rest + (fp.blocks - streamed) * fp.block
    window = min(STREAM_WINDOW, streamed) * fp.block
    denoise = on + window + fp.scratch + act
    start = on + fp.per_forward + (fp.block if streamed else 0)
    return int(max(denoise, start, fp.vae + decode_bytes(video.pixels), fp.vae + fp.text_encoder_streamed)
               + LOW_SLACK)


def _needs(fp: Footprint, video: VideoSize, chunk: int | None) -> dict[str, int]:
    """Peak device bytes of each arrangement at this chunk size (``low`` with every block kept)."""
    act = activation_bytes(video.tokens, chunk, fp.dim)
    dec = decode_bytes(video.pixels)
    experts = fp.expert * fp.experts + fp.scratch
    # Both policies hold the VAE only while it encodes or decodes (the experts stay in ``resident``).
    return {
        "resident": experts + max(act, fp.vae + dec, fp.text_encoder_streamed),
        "resident_te_device": experts + fp.text_encoder + fp.kv_cache + max(act, fp.vae + dec),
        "low": low_bytes(fp, video, chunk),
    }


def _largest_chunk(fp: Footprint, video: VideoSize, key: str, budget: float,
                   choices=CHUNK_CHOICES) -> tuple[int | None, int] | None:
    for chunk in choices:
        need = _needs(fp, video, chunk)[key]
        if reserved_for(need) <= budget:
            return chunk, need
    return None


def _low_fit(fp: Footprint, video: VideoSize, budget: float,
             choices=CHUNK_CHOICES) -> tuple[int | None, int | None, int] | None:
    """``(chunk, kept blocks or None for all, need)`` of ``low``: every block kept with the
    largest chunk that allows it; else as many blocks kept as fit, with chunks of at most
    :data:`DEFAULT_CHUNK` (streaming a block costs less than halving the chunks)."""
    fit = _largest_chunk(fp, video, "low", budget, choices)
    if fit is not None:
        return fit[0], None, fit[1]
    if not fp.blocks:
        return None
    for chunk in [c for c in choices if c is not None and c <= DEFAULT_CHUNK] or list(choices):
        for kept in range(fp.blocks - 1, -1, -1):
            need = low_bytes(fp, video, chunk, kept)
            if reserved_for(need) <= budget:
                return chunk, kept, need
    return None


def plan_memory(requested: str, fp: Footprint, video: VideoSize, device: str, budget: float | None,
                chunk_tokens: int | None = None, budget_source: str = "") -> MemoryPlan:
    """The policy, text-encoder placement and chunk size for one video size (pure: the auto table).

    ``auto``: resident with the text encoder on the device if that fits with chunks of at
    least :data:`DEFAULT_CHUNK`; else resident with the text encoder streamed if chunks of
    at least 4096 fit; else ``low`` with the largest chunk that fits (the smallest, with a
    warning, when none does). An explicit policy gets the largest chunk that fits it.
    ``budget`` None (no accelerator): ``resident`` for ``auto``, chunks of
    ``chunk_tokens`` or :data:`DEFAULT_CHUNK`, text encoder on the device.
    """
    if requested not in POLICIES:
        raise ValueError(f"memory policy {requested!r}: choose one of {', '.join(POLICIES)}")
    choices = CHUNK_CHOICES if chunk_tokens is None else (chunk_tokens,)
    where = f"{video.label} ({video.tokens:,} tokens per forward)" if video.label else f"{video.tokens:,} tokens"
    if budget is None:
        policy = "resident" if requested == "auto" else requested
        chunk = chunk_tokens or DEFAULT_CHUNK
        te = "device" if policy == "resident" else "stream"
        need = _needs(fp, video, chunk)["resident_te_device" if te == "device" else policy]
        return MemoryPlan(requested, policy, device, te, chunk, None, need, True,
                          f"{device} has no memory budget to plan against", video, budget_source,
                          kv_cache=policy == "resident")
    gb = budget / GB
    low_fit = _low_fit(fp, video, budget, choices)
    res_fit = _largest_chunk(fp, video, "resident", budget, choices)
    te_fit = _largest_chunk(fp, video, "resident_te_device", budget, choices)
    sizes = (f"{gb:.1f} GB for tensors{f' ({budget_source})' if budget_source else ''}; {where}: both experts "
             f"resident need ~{reserved_for(_needs(fp, video, DEFAULT_CHUNK)['resident']) / GB:.1f} GB, "
             f"one at a time ~{reserved_for(_needs(fp, video, DEFAULT_CHUNK)['low']) / GB:.1f} GB "
             f"(chunks of {DEFAULT_CHUNK})")

    def big(fit, least):  # a fit with chunks of at least `least` tokens (or unchunked)
        return fit is not None and (fit[0] is None or fit[0] >= least or chunk_tokens is not None)

    if requested == "auto":
        if big(te_fit, DEFAULT_CHUNK):
            return MemoryPlan(requested, "resident", device, "device", te_fit[0], budget, te_fit[1], True,
                              f"{sizes}: everything fits", video, budget_source, kv_cache=True)
        if big(res_fit, 4096):
            return MemoryPlan(requested, "resident", device, "stream", res_fit[0], budget, res_fit[1], True,
                              f"{sizes}: both experts fit, the text encoder streams", video, budget_source)
        if low_fit is not None:
            return MemoryPlan(requested, "low", device, "stream", low_fit[0], budget, low_fit[2], True,
                              f"{sizes}: one expert at a time", video, budget_source, kept_blocks=low_fit[1])
        return _overflow(requested, "low", fp, video, device, budget, choices, sizes, budget_source)
    if requested == "resident":
        if big(te_fit, DEFAULT_CHUNK):
            return MemoryPlan(requested, "resident", device, "device", te_fit[0], budget, te_fit[1], True,
                              f"{sizes}: the text encoder fits too", video, budget_source, kv_cache=True)
        if res_fit is not None:
            return MemoryPlan(requested, "resident", device, "stream", res_fit[0], budget, res_fit[1], True,
                              f"{sizes}: requested", video, budget_source)
        return _overflow(requested, "resident", fp, video, device, budget, choices, sizes, budget_source)
    if low_fit is not None:
        return MemoryPlan(requested, "low", device, "stream", low_fit[0], budget, low_fit[2], True,
                          f"{sizes}: requested", video, budget_source, kept_blocks=low_fit[1])
    return _overflow(requested, "low", fp, video, device, budget, choices, sizes, budget_source)


def _overflow(requested, policy, fp, video, device, budget, choices, sizes, budget_source) -> MemoryPlan:
    chunk = choices[-1]
    kept = 0 if policy == "low" and fp.blocks else None  # everything streamed: the least it can do
    need = low_bytes(fp, video, chunk, kept) if policy == "low" else _needs(fp, video, chunk)[policy]
    return MemoryPlan(requested, policy, device, "stream", chunk, budget, need, False,
                      f"{sizes}: does not fit even with chunks of {chunk} (~{reserved_for(need) / GB:.1f} GB); "
                      "it may run out of memory: use a smaller video or a GPU with more memory", video, budget_source,
                      kept_blocks=kept)


# --------------------------------------------------------------------------------------
# measuring the pipeline and the device
def _runs_fast(layer, device: torch.device) -> bool:
    """Whether a W4A4 layer takes the fast path on ``device`` (then it holds repacked operands)."""
    if getattr(layer, "backend", None) not in ("auto", "fast"):
        return False
    from wanquant.kernels.dispatch import fast_path_status

    return fast_path_status(device, layer.wfmt, layer.afmt)[0]


def _fast_extra_bytes(layer, device: torch.device) -> int:
    """The fast path's repacked operands of one W4A4 layer on ``device`` (0 where it does not run)."""
    if not _runs_fast(layer, device):
        return 0
    from wanquant.kernels.dispatch import FastW4A4

    return FastW4A4.extra_bytes(layer.out_features, layer.in_features, layer.rank + layer.lora_rank)


def _lowrank_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.l1, layer.l2))


def _slot_bytes(slots) -> int:
    seen, total = set(), 0
    for s in slots:
        t = s.get()
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _device_bytes(modules: list[nn.Module], device: torch.device, exclude=(), streamed: bool = False) -> int:
    """Bytes of ``modules`` resident on ``device``: what moves plus what the fast path rebuilds.
    Kept layers leave their canonical L1/L2 in host memory where the fast path runs (it holds
    its own operands); ``streamed`` layers carry them (rebuilt from them at every arrival)."""
    slots = module_slots(modules, device, exclude=exclude)
    total = _slot_bytes(slots)
    moved = {(id(s.module), s.name) for s in slots}
    skip = {id(m) for e in exclude for m in e.modules()}
    for root in modules:
        for m in quantized_layers(root).values():
            if id(m) in skip:
                continue
            fast = _fast_extra_bytes(m, device)
            total += fast
            in_slots = (id(m), "l1") in moved
            if fast and in_slots and not streamed:
                total -= _lowrank_bytes(m)
            elif fast and streamed and not in_slots:
                total += _lowrank_bytes(m)
    return total


def expert_device_bytes(expert: nn.Module, device: torch.device) -> int:
    """Bytes of an expert resident on ``device``: what moves plus what the fast path rebuilds."""
    return _device_bytes([expert], torch.device(device))


def _text_encoder_parts(te: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """``(blocks, host-run embeddings)`` of a text encoder: T5/UMT5 ``encoder.block`` and every
    embedding table outside the blocks (looked up for a few hundred tokens per prompt)."""
    encoder = getattr(te, "encoder", None)
    blocks = list(getattr(encoder, "block", None) or [])
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    embeddings = [m for m in te.modules() if isinstance(m, nn.Embedding) and id(m) not in in_blocks]
    return blocks, embeddings


def kv_cache_bytes(expert: nn.Module, text_tokens: int) -> int:
    """Bytes of an expert's cached text keys/values (bf16) for two contexts (cond, uncond)."""
    from wanquant.model.wan import layer_input_kind

    layers = [m for n, m in quantized_layers(expert).items() if layer_input_kind(n) == "text"]
    return sum(2 * text_tokens * m.out_features * 2 for m in layers)


def measure_footprint(pipe, device: torch.device | str, text_tokens: int = 512) -> Footprint:
    device = torch.device(device)
    experts = [e.module for e in experts_of(pipe)]
    layers = [m for e in experts for m in quantized_layers(e).values()]
    scratch = max((m.out_features * m.in_features for m in layers if _fast_extra_bytes(m, device)), default=0)
    te = getattr(pipe, "text_encoder", None)
    te_whole = te_streamed = 0
    if te is not None:
        blocks, embeddings = _text_encoder_parts(te)
        te_whole = _slot_bytes(module_slots([te], device))
        rest = _slot_bytes(module_slots([te], device, exclude=[*blocks, *embeddings]))
        biggest = max((_slot_bytes(module_slots([b], device)) for b in blocks), default=0)
        # one block in use and the next coming in (never more than the whole encoder)
        te_streamed = min(te_whole, rest + 2 * biggest) if blocks else te_whole
    vae = getattr(pipe, "vae", None)
    dim = max((int(getattr(e.config, "num_attention_heads", 1) * getattr(e.config, "attention_head_dim", 1))
               for e in experts), default=0)
    sizes = [expert_device_bytes(e, device) for e in experts]
    biggest = experts[sizes.index(max(sizes))]
    per_forward = _device_bytes(_per_forward_modules(biggest), device)
    blocks = list(blocks_of(biggest))
    block = max((_device_bytes([b], device, streamed=True) for b in blocks), default=0)
    return Footprint(expert=max(sizes), experts=len(experts), per_forward=per_forward,
                     text_encoder=te_whole, text_encoder_streamed=te_streamed,
                     vae=_slot_bytes(module_slots([vae], device)) if vae is not None else 0,
                     scratch=scratch, dim=dim, kv_cache=sum(kv_cache_bytes(e, text_tokens) for e in experts),
                     blocks=len(blocks), block=block)


def device_budget(device: torch.device | str) -> tuple[float | None, str]:
    """Bytes this process can give to tensors on ``device``, and where the figure comes from.

    Free memory plus what this process's allocator already holds (the pipeline's parts
    there are re-placed by the plan), capped by ``set_per_process_memory_fraction`` minus
    :data:`CONTEXT_RESERVE` when a fraction below 1 is set. None off CUDA.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"{device.type} device"
    if device.index is None:  # the allocator-fraction functions want an index
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    ours = torch.cuda.memory_reserved(device)
    budget = float(free + ours)
    source = (f"{free / GB:.1f} GB free on {torch.cuda.get_device_name(device)} + {ours / GB:.1f} GB held by "
              "this process")
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = float(get_fraction(device)) if get_fraction is not None else 1.0
    if fraction < 1.0:
        cap = total * fraction - CONTEXT_RESERVE
        if cap < budget:
            budget = cap
            source = (f"allocator capped at {total * fraction / GB:.1f} GB, less {CONTEXT_RESERVE / GB:.1f} GB "
                      "for the CUDA context")
    return budget, source


# --------------------------------------------------------------------------------------
# applying a plan
class _ExecutionDevice:
    """Declares where a module computes while its weights sit in host memory: the
    ``_hf_hook.execution_device`` that diffusers reads (``_execution_device``,
    ``get_module_execution_device``) to place inputs, as for accelerate's offloading."""

    @staticmethod
    def attach(module: nn.Module, device: torch.device) -> None:
        from accelerate.hooks import ModelHook, add_hook_to_module

        hook = ModelHook()
        hook.execution_device = device
        add_hook_to_module(module, hook)

    @staticmethod
    def detach(module: nn.Module) -> None:
        from accelerate.hooks import remove_hook_from_module

        if hasattr(module, "_hf_hook"):
            remove_hook_from_module(module)


@dataclass
class _PolicyState:
    """What :func:`apply_memory_policy` installed on a pipeline."""

    plan: MemoryPlan
    device: torch.device
    transfer: Transfer
    experts: dict[str, GroupSequence] = field(default_factory=dict)  # low: attr -> groups
    per_forward: dict[str, GroupSequence] = field(default_factory=dict)  # low: attr -> embedders
    expert_modules: dict[str, nn.Module] = field(default_factory=dict)
    # low: per expert, its kept blocks' groups with their quantized layers (see bring_in)
    kept_layers: dict[str, list[tuple[TensorGroup, list[nn.Module]]]] = field(default_factory=dict)
    text_encoder: GroupSequence | None = None
    vae: TensorGroup | None = None
    handles: list = field(default_factory=list)
    declared: list[nn.Module] = field(default_factory=list)

    # -- what the hooks do ----------------------------------------------------------------
    def evict_expert(self, attr: str) -> None:
        seq, per_forward = self.experts[attr], self.per_forward[attr]
        if seq.any_resident() or per_forward.any_resident():
            release_static_caches(self.expert_modules[attr])
            seq.evict()
            per_forward.evict()

    def before_expert(self, attr: str) -> None:
        """An expert starts a forward: the other expert and the VAE out, its groups in."""
        arriving = not self.experts[attr].groups[0].resident
        for other in self.experts:
            if other != attr:
                self.evict_expert(other)
        if self.vae is not None:
            self.vae.evict()
        if arriving:
            self.bring_in(attr)
        self.per_forward[attr].start()
        self.experts[attr].before(0)

    def bring_in(self, attr: str) -> None:
        """The expert arrives (once per video and expert): the allocator's cache is handed
        back, every kept group is allocated and its copy queued on the side stream, and
        each kept block's W4A4 layers build their fast-path operands as soon as its copy
        is done. All of it before the first activation: memory the expert keeps is laid out
        in one run instead of between a forward's transient tensors, where each piece
        splits a hole that the next same-sized activation then cannot use (the likely cause
        of the 2.6 GB reserved beyond allocated at 720p when blocks came in one ahead of use
        and built their operands in their first call). Streamed blocks still come in one
        ahead and leave after use (the same sizes each time)."""
        _release_device_memory(self.device, collect=False)
        seq = self.experts[attr]
        for group, keep in zip(seq.groups, seq.keep):
            if keep:
                group.onload(self.transfer)
        for group, layers in self.kept_layers.get(attr, []):
            group.wait()
            for m in layers:
                m.prepare_for_compile(self.device)  # chooses the backend, builds the fast path's operands

    def before_vae(self) -> None:
        """The VAE encodes or decodes: in ``low`` every expert out (the video's last step is
        done), the VAE in."""
        for attr in self.experts:
            self.evict_expert(attr)
        self.vae.onload(self.transfer)
        self.vae.wait()

    def evict_all(self) -> None:
        """Every group of this policy out of the device (before another policy is placed)."""
        for attr in self.experts:
            self.evict_expert(attr)
        for group in ([self.text_encoder] if self.text_encoder is not None else []):
            group.evict()
        if self.vae is not None:
            self.vae.evict()

    def residency(self) -> dict[str, bool]:
        """Group name -> resident now (what tests and the benchmark's census read)."""
        seqs = [*self.experts.values(), *self.per_forward.values()]
        if self.text_encoder is not None:
            seqs.append(self.text_encoder)
        out = {g.name: g.resident for seq in seqs for g in seq.groups}
        if self.vae is not None:
            out[self.vae.name] = self.vae.resident
        return out


def memory_plan_of(pipe) -> MemoryPlan | None:
    """The plan :func:`apply_memory_policy` applied to ``pipe``, if any."""
    state = getattr(pipe, STATE_ATTR, None)
    return state.plan if state is not None else None


def memory_state_of(pipe) -> _PolicyState | None:
    return getattr(pipe, STATE_ATTR, None)


def clear_memory_policy(pipe) -> None:
    """Remove the policy's hooks; tensors stay where they are (host or device)."""
    state = getattr(pipe, STATE_ATTR, None)
    if state is None:
        return
    for h in state.handles:
        h.remove()
    for m in state.declared:
        _ExecutionDevice.detach(m)
    delattr(pipe, STATE_ATTR)


def _stream_text_encoder(state: _PolicyState, te: nn.Module, previous: GroupSequence | None = None) -> None:
    """Text encoder in pinned host memory, its blocks through the device one ahead while it encodes.

    ``previous``: the groups of an earlier policy streaming it to the same device, reused
    (re-pinning 11 GB of UMT5-XXL would cost seconds and a second host copy meanwhile).
    """
    device = state.device
    blocks, embeddings = _text_encoder_parts(te)
    for emb in embeddings:
        state.handles += run_on_host(emb, device)
    if previous is not None and previous.groups[0].device == device and len(previous.groups) == len(blocks) + 1:
        groups = previous.groups
    else:
        rest = TensorGroup("text_encoder.rest", module_slots([te], device, exclude=[*blocks, *embeddings]), device)
        groups = [rest] + [TensorGroup(f"text_encoder.block.{i}", module_slots([b], device), device)
                           for i, b in enumerate(blocks)]
    seq = GroupSequence("text_encoder", groups, state.transfer, keep=False)
    # Hook order: the whole encoder needs its rest (final norm) from its first to last line.
    state.handles += seq.hook([te, *blocks])
    state.text_encoder = seq
    _ExecutionDevice.attach(te, device)
    state.declared.append(te)


def _per_forward_modules(expert: nn.Module) -> list[nn.Module]:
    return [m for m in (getattr(expert, a, None) for a in PER_FORWARD_ATTRS) if m is not None]


def _offload_expert(state: _PolicyState, attr: str, expert: nn.Module, kept: int | None = None) -> None:
    """The expert's groups (its rest, then one per block: the first ``kept`` (None: all)
    kept once in, the others streamed at every forward) and its per-forward embedders (in
    for the start of each forward only), with the hooks that move them."""
    device = state.device
    blocks = list(blocks_of(expert))
    kept = len(blocks) if kept is None else max(0, min(len(blocks), kept))
    for i, b in enumerate(blocks):
        # A streamed layer rebuilds its fast-path operands at every arrival: from its
        # canonical L1/L2 moved with the block (pinned, asynchronous), not from pageable
        # host memory (a synchronous copy per layer would stall the queue).
        for m in quantized_layers(b).values():
            m.lowrank_to_host = i < kept
    per_forward = _per_forward_modules(expert)
    rest = TensorGroup(f"{attr}.rest", module_slots([expert], device, exclude=[blocks_of(expert), *per_forward]),
                       device)
    groups = [rest] + [TensorGroup(f"{attr}.blocks.{i}", module_slots([b], device), device)
                       for i, b in enumerate(blocks)]
    seq = GroupSequence(attr, groups, state.transfer, keep=[True] + [i < kept for i in range(len(blocks))])
    state.kept_layers[attr] = [(groups[i + 1], list(quantized_layers(b).values())) for i, b in enumerate(blocks[:kept])]
    embedder_groups = [TensorGroup(f"{attr}.{type(m).__name__}", module_slots([m], device), device)
                       for m in per_forward]
    embedders = GroupSequence(f"{attr}.per_forward", embedder_groups, state.transfer, keep=False, lookahead=0)
    state.experts[attr], state.per_forward[attr], state.expert_modules[attr] = seq, embedders, expert

    def before(module, args):
        state.before_expert(attr)

    def after(module, args, output):
        embedders.start()  # for the next forward (the other CFG branch, the next step)

    state.handles.append(expert.register_forward_pre_hook(before))
    state.handles += embedders.hook(per_forward)
    for i, b in enumerate(blocks):
        state.handles.append(b.register_forward_pre_hook(_before_group(seq, i + 1)))
        if not seq.keep[i + 1]:
            state.handles.append(b.register_forward_hook(_after_group(seq, i + 1)))
    state.handles.append(expert.register_forward_hook(after))


def _before_group(seq: GroupSequence, i: int):
    def hook(module, args):
        seq.before(i)
    return hook


def _after_group(seq: GroupSequence, i: int):
    def hook(module, args, output):
        seq.after(i)
    return hook


def _offload_vae(state: _PolicyState, vae: nn.Module, experts: list[nn.Module]) -> None:
    """The VAE in pinned host memory, on the device while it encodes or decodes (and between
    videos: the next one starts by encoding), out when an expert starts."""
    state.vae = TensorGroup("vae", module_slots([vae], state.device), state.device)

    def before(module, args):
        state.before_vae()

    def vae_out(module, args):
        state.vae.evict()

    # encode/decode are not forward: hook the parts they run (encoder, quant convs, decoder).
    for child in vae.children():
        if any(True for _ in child.parameters()):
            state.handles.append(child.register_forward_pre_hook(before))
    if state.plan.policy != "low":  # low's expert hooks evict it themselves
        state.handles += [e.register_forward_pre_hook(vae_out) for e in experts]
    _ExecutionDevice.attach(vae, state.device)
    state.declared.append(vae)
    state.vae.onload(state.transfer)
    state.vae.wait()


def _release_device_memory(device: torch.device, collect: bool = True) -> None:
    """Collect what the previous arrangement left unreferenced and hand the allocator's
    cached blocks back, so that the next arrangement is placed into free memory."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def apply_memory_policy(pipe, plan: MemoryPlan) -> MemoryPlan:
    """Place the pipeline's parts and install the hooks of ``plan`` (replacing an earlier policy)."""
    old = memory_state_of(pipe)
    if old is not None:
        old.evict_all()  # every group back to its host copy: the modules point there now
    clear_memory_policy(pipe)
    device = torch.device(plan.device)
    state = _PolicyState(plan, device, Transfer(device))
    experts = experts_of(pipe)
    te, vae = getattr(pipe, "text_encoder", None), getattr(pipe, "vae", None)
    for part in (te, vae, *(e.module for e in experts)):
        if part is not None:
            # Inference only: a parameter that requires grad lets any forward run outside
            # no_grad keep the weights it read alive in its graph (streamed ones on the device).
            part.requires_grad_(False)
    for e in experts:
        for m in quantized_layers(e.module).values():
            m.release_device_state()  # repacked operands are rebuilt where the layer runs next
            m.lowrank_to_host = True
            for n in ("l1", "l2"):  # no view into an old group's buffer (it would keep it alive)
                b = m._buffers.get(n)
                if b is not None and b.untyped_storage().nbytes() > b.numel() * b.element_size():
                    m._buffers[n] = b.clone()
        release_static_caches(e.module)
    # Off the device first, then onto it: the device never holds both arrangements.
    if te is not None and plan.text_encoder == "stream":
        _stream_text_encoder(state, te, old.text_encoder if old is not None else None)
    del old
    if plan.policy == "low":
        for e in experts:
            _offload_expert(state, e.attr, e.module, plan.kept_blocks)
    _release_device_memory(device)
    if plan.policy != "low":
        for e in experts:
            move_to(e.module, device)
    if vae is not None:
        _offload_vae(state, vae, [e.module for e in experts])
    if te is not None and plan.text_encoder == "device":
        te.to(device)
    for e in experts:
        set_static_kv_cache(e.module, plan.kv_cache)
        if plan.chunk_tokens is None:
            disable_token_chunking(e.module)
        else:
            enable_token_chunking(e.module, plan.chunk_tokens)
    if vae is not None and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    setattr(pipe, STATE_ATTR, state)
    trim_host_heap()  # the host tensors the groups were copied from are gone
    return plan


def video_size(pipe, height: int, width: int, num_frames: int, text_tokens: int = 512) -> VideoSize:
    from wanquant.model.pipeline import video_tokens

    return VideoSize(video_tokens(pipe, height, width, num_frames), height * width * num_frames,
                     f"{height}x{width}x{num_frames}", text_tokens)


def plan_for(pipe, requested: str, device: torch.device | str, height: int, width: int, num_frames: int,
             budget_bytes: float | None = None, chunk_tokens: int | None = None,
             text_tokens: int = 512) -> MemoryPlan:
    """:func:`plan_memory` for this pipeline on ``device`` (budget: :func:`device_budget` unless given)."""
    device = torch.device(device)
    source = "given"
    if budget_bytes is None:
        budget_bytes, source = device_budget(device)
    plan = plan_memory(requested, measure_footprint(pipe, device, text_tokens),
                       video_size(pipe, height, width, num_frames, text_tokens), str(device), budget_bytes,
                       chunk_tokens, source)
    plan.chunk_requested = chunk_tokens
    return plan


def replan(pipe, height: int, width: int, num_frames: int) -> MemoryPlan | None:
    """Re-apply the pipeline's policy for a video of another size (None: no policy set)."""
    plan = memory_plan_of(pipe)
    if plan is None:
        return None
    size = video_size(pipe, height, width, num_frames)
    if (size.tokens, size.pixels) == (plan.video.tokens, plan.video.pixels):
        return plan
    budget = plan.budget_bytes if plan.budget_source == "given" else None
    new = plan_for(pipe, plan.requested, plan.device, height, width, num_frames, budget, plan.chunk_requested,
                   plan.video.text_tokens)
    log.info("%s", new.describe())
    return apply_memory_policy(pipe, new)


__all__ = ["POLICIES", "MemoryPlan", "Footprint", "VideoSize", "plan_memory", "plan_for", "apply_memory_policy",
           "clear_memory_policy", "memory_plan_of", "measure_footprint", "device_budget", "activation_bytes",
           "decode_bytes", "replan", "video_size"]
