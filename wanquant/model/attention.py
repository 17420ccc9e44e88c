"""Which attention Wan's self-attention runs: PyTorch SDPA or wanquant's 8-bit kernel.

Part of the model adapter (the only place that imports diffusers). diffusers 0.42.1 runs
every attention through ``dispatch_attention_fn(..., backend=processor._attention_backend)``,
where the backend is a member of its ``AttentionBackendName`` enum looked up in
``_AttentionBackendRegistry``. This module adds two members and registers a function for
each:

* ``wanquant_int8``: :func:`wanquant.kernels.attention.attention_int8` (Triton, CUDA
  GPUs with FP8 tensor cores, sm_89+); on other tensors it raises, it does not silently
  fall back;
* ``wanquant_int8_reference``: the same math in PyTorch
  (:func:`~wanquant.kernels.attention.attention_int8_reference`), any device; slow, for
  CPU tests and numerics studies.

:func:`set_self_attention` sets the backend on the self-attention (``attn1``) of each
block only; cross-attention (``attn2``: 512 text tokens, plus image tokens in Wan2.1
I2V) keeps whatever it had (SDPA by default). The stock ``WanAttnProcessor`` stays in
place, so wanquant's token-chunked block (:mod:`wanquant.model.block`) still applies; it
asks :func:`chunk_attention` for a per-chunk attention function, which quantizes the
keys and values once per block instead of once per query chunk.

Under ``torch.compile`` (:mod:`wanquant.model.compile`) both backends call the custom op
``wanquant::attention_int8`` (:mod:`wanquant.kernels.ops`), one opaque graph node, so a
compiled block has no graph break there.

Calls the kernel does not cover (an attention mask, causal, dropout, grouped-query
heads, an unsupported head_dim) run diffusers' native SDPA, with a warning once per
reason. Context parallelism is refused: its attention goes through diffusers' templated
all-to-all / ring functions, which call their own backends.

Extending a Python ``Enum`` after its creation has no public API before Python 3.13;
:func:`_enum_member` does what ``Enum`` does for its own members (the value map and the
member list), and the module checks the lookup works before using it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from wanquant.kernels import attention as K
from wanquant.kernels import ops
from wanquant.model.wan import blocks_of, experts_of

log = logging.getLogger(__name__)

SELF_ATTN_ATTR = "attn1"  # as wanquant.model.block.SELF_ATTN_ATTR (no import: block imports this module)
AUTO = "auto"  # int8 on Hopper (measured faster than cuDNN within the quality bar), else sdpa
MODES = (AUTO, "sdpa", "int8")  # what users pick (CLI --attention)
REFERENCE_MODE = "int8_reference"  # the PyTorch reference of "int8" (tests, CPU)
ALL_MODES = (*MODES, REFERENCE_MODE)
_BACKENDS = {"int8": ("WANQUANT_INT8", "wanquant_int8"),
             REFERENCE_MODE: ("WANQUANT_INT8_REFERENCE", "wanquant_int8_reference")}
_PREV = "_wanquant_prev_attention_backend"  # the backend a processor had before int8 was set
_warned: set[str] = set()


class AttentionUnavailableError(ValueError):
    """The requested attention cannot run here (e.g. int8 without a CUDA GPU with FP8)."""


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("wanquant int8 attention: %s; this call runs PyTorch SDPA instead", reason)


def _enum_member(enum_cls, name: str, value: str):
    """The member of ``enum_cls`` with ``value``, added if missing (see the module docstring)."""
    try:
        return enum_cls(value)
    except ValueError:
        pass
    member = str.__new__(enum_cls, value)  # AttentionBackendName is a (str, Enum)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13
        enum_cls._add_member_(name, member)
    else:
        enum_cls._member_map_[name] = member
        enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    if enum_cls(value) is not member:
        raise RuntimeError(f"could not add {value!r} to {enum_cls.__name__}")
    return member


def _sdpa_fallback(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _parallel_config):
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                 scale=scale, enable_gqa=enable_gqa, backend=AttentionBackendName.NATIVE,
                                 parallel_config=_parallel_config)


def int8_unsupported(query, key, value, attn_mask, dropout_p, is_causal) -> str | None:
    """Why the 8-bit kernel cannot serve this call (None: it can)."""
    if attn_mask is not None:
        return "an attention mask is given"
    if is_causal:
        return "causal attention"
    if dropout_p:
        return "dropout"
    if query.ndim != 4 or key.shape[2] != query.shape[2] or value.shape[2] != query.shape[2]:
        return "query and key/value head counts differ"
    d = query.shape[-1]
    if d < 32 or d > 256 or d & (d - 1) or value.shape[-1] != d:
        return f"head_dim {d} (needs a power of two in [32, 256], equal for q, k, v)"
    return None


def _unsupported_call(query, key, value, attn_mask, dropout_p, is_causal, parallel_config) -> str | None:
    """Why the 8-bit kernel cannot take this call (SDPA then does), or None; refuses CP."""
    if parallel_config is not None:
        raise AttentionUnavailableError("wanquant int8 attention does not support context parallelism yet")
    why = int8_unsupported(query, key, value, attn_mask, dropout_p, is_causal)
    if why:
        _warn_once(why)
    return why


def _int8_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                  _parallel_config=None) -> torch.Tensor:
    """diffusers backend ``wanquant_int8``: inputs and output ``[B, S, H, D]``."""
    if _unsupported_call(query, key, value, attn_mask, dropout_p, is_causal, _parallel_config):
        return _sdpa_fallback(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _parallel_config)
    if torch.compiler.is_compiling():  # one custom-op node (wanquant.kernels.ops); it checks the device itself
        return ops.attention_int8(query, key, value, scale, False)
    ok, reason = K.int8_attention_status(query.device)
    if not ok:
        raise AttentionUnavailableError(f"wanquant int8 attention cannot run: {reason}")
    return K.attention_int8(query, key, value, scale=scale, layout="bshd", config=K.env_config())


def _int8_reference_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                            dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                            enable_gqa: bool = False, _parallel_config=None) -> torch.Tensor:
    """diffusers backend ``wanquant_int8_reference``: the PyTorch definition, any device."""
    if _unsupported_call(query, key, value, attn_mask, dropout_p, is_causal, _parallel_config):
        return _sdpa_fallback(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _parallel_config)
    if torch.compiler.is_compiling():
        return ops.attention_int8(query, key, value, scale, True)
    return K.attention_int8_reference(query, key, value, scale=scale, layout="bshd", config=K.env_config())


_FUNCTIONS = {"int8": _int8_backend, REFERENCE_MODE: _int8_reference_backend}


def backend_for(mode: str):
    """The diffusers ``AttentionBackendName`` of an int8 mode, registered on first use."""
    from diffusers.models import attention_dispatch as ad

    name, value = _BACKENDS[mode]
    member = _enum_member(ad.AttentionBackendName, name, value)
    registry = ad._AttentionBackendRegistry
    if member not in registry._backends:
        registry.register(member, constraints=[], supports_context_parallel=False)(_FUNCTIONS[mode])
    return member


def mode_of_backend(backend) -> str:
    """The mode (``"sdpa"``, ``"int8"``, ``"int8_reference"``) a processor's backend stands for."""
    value = getattr(backend, "value", backend)
    for mode, (_, v) in _BACKENDS.items():
        if value == v:
            return mode
    return "sdpa"


def int8_available() -> tuple[bool, str]:
    """Whether ``int8`` attention can run on this machine, and why (not)."""
    return K.int8_attention_status()


def _self_attentions(transformer: nn.Module) -> list[nn.Module]:
    return [getattr(block, SELF_ATTN_ATTR) for block in blocks_of(transformer)]


def resolve_mode(mode: str, device: torch.device | str) -> tuple[str, str]:
    """The mode ``mode`` stands for on ``device``, and why: ``auto`` is ``int8`` on Hopper
    (sm_90, where benchmarks/results/attention.md measures it against SDPA cuDNN and the
    testbed shows its quality), ``sdpa`` elsewhere (sm_89 runs int8 too, unmeasured)."""
    if mode != AUTO:
        return mode, "as asked"
    dev = torch.device(device)
    if dev.type != "cuda":
        return "sdpa", f"auto: {dev.type} device"
    ok, why = K.int8_attention_status(dev)
    if not ok:
        return "sdpa", f"auto: {why}"
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(index)[0] != 9:
        return "sdpa", f"auto: {why} is not Hopper (int8 attention is measured on sm_90 only)"
    return "int8", f"auto: {why}"


def check_attention_mode(mode: str) -> None:
    """Raise if ``mode`` is unknown or cannot run on this machine (before loading a model;
    ``auto`` always can)."""
    if mode not in ALL_MODES:
        raise ValueError(f"attention mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "int8":
        ok, reason = int8_available()
        if not ok:
            raise AttentionUnavailableError(
                f"int8 attention needs a CUDA GPU with FP8 tensor cores (sm_89+, e.g. H100) and Triton: {reason}. "
                "Use attention 'sdpa'.")


def set_self_attention(transformer: nn.Module, mode: str) -> int:
    """Run the self-attention of every block of ``transformer`` with ``mode``; returns how many.

    The 8-bit modes also swap diffusers' stock processor for
    :class:`~wanquant.model.processor.FusedRopeAttnProcessor` (the q/k norm and rotary in
    one kernel); ``"sdpa"`` swaps it back.

    ``"sdpa"`` restores what the module had before int8 was set (diffusers' default,
    PyTorch SDPA, unless a backend had been chosen). ``"int8"`` needs a CUDA GPU with FP8
    tensor cores and Triton (:class:`AttentionUnavailableError` otherwise); ``"int8_reference"``
    runs anywhere.
    """
    check_attention_mode(mode)
    if mode == AUTO:
        raise ValueError("attention 'auto' depends on the device: resolve it with resolve_mode(mode, device) first")
    attns = _self_attentions(transformer)
    for attn in attns:
        proc = attn.processor
        if mode != "sdpa" and getattr(proc, "_parallel_config", None) is not None:
            raise AttentionUnavailableError("int8 attention does not support context parallelism yet; "
                                            "use attention 'sdpa' with several GPUs")
        if not hasattr(proc, "_attention_backend"):
            raise TypeError(f"{type(proc).__name__} does not go through diffusers' attention dispatcher")
    from wanquant.model.processor import with_fused_rope, without_fused_rope

    for attn in attns:
        proc = attn.processor
        current = proc._attention_backend
        if mode == "sdpa":
            if mode_of_backend(current) != "sdpa":
                proc._attention_backend = proc.__dict__.pop(_PREV, None)
            attn.set_processor(without_fused_rope(proc))
            continue
        if mode_of_backend(current) == "sdpa":
            proc.__dict__[_PREV] = current
        proc._attention_backend = backend_for(mode)
        attn.set_processor(with_fused_rope(proc))
    return len(attns)


def set_query_fusion(transformer: nn.Module, on: bool) -> None:
    """Whether the 8-bit self-attention takes its INT8 queries from the rotary kernel or
    quantizes the rotary's 16-bit queries itself (the default). The same numbers in the
    interpreter; on an H100 not bit-identical at head dim 128, and no faster (see
    :class:`~wanquant.model.processor.FusedRopeAttnProcessor`)."""
    from wanquant.model.processor import FusedRopeAttnProcessor

    for attn in _self_attentions(transformer):
        if isinstance(attn.processor, FusedRopeAttnProcessor):
            attn.processor.fuse_int8_queries = on


def self_attention_mode(transformer: nn.Module) -> str:
    """``"sdpa"``, ``"int8"``, ``"int8_reference"``, or ``"mixed"`` if blocks differ."""
    modes = {mode_of_backend(getattr(a.processor, "_attention_backend", None)) for a in _self_attentions(transformer)}
    return modes.pop() if len(modes) == 1 else "mixed"


def set_pipeline_attention(pipe, mode: str, device: torch.device | str | None = None) -> str:
    """:func:`set_self_attention` on every expert of a Wan pipeline; returns a description.
    ``auto`` is resolved for ``device`` (default: the current CUDA device if there is one)."""
    check_attention_mode(mode)
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    mode, why = resolve_mode(mode, device)
    counts = [(e.attr, set_self_attention(e.module, mode)) for e in experts_of(pipe)]
    where = ", ".join(f"{attr} ({n} blocks)" for attr, n in counts)
    chosen = "" if why == "as asked" else f" [{why}]"
    if mode == "sdpa":
        return f"self-attention: PyTorch SDPA on {where}{chosen}"
    detail = int8_available()[1] if mode == "int8" else "PyTorch reference"
    return (f"self-attention: 8-bit (INT8 Q.K^T, FP8 P.V; {detail}), q/k norm + rotary fused, on {where}; "
            f"cross-attention unchanged (SDPA){chosen}")


def chunk_attention(attn: nn.Module, key: torch.Tensor, value: torch.Tensor
                    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For the token-chunked block: ``fn(query_chunk) -> out`` sharing one quantization of
    ``key``/``value`` ``[B, S, H, D]`` across chunks; None when ``attn`` is not on an int8
    backend (or the call is one the kernel does not cover): dispatch as usual then."""
    mode = mode_of_backend(getattr(attn.processor, "_attention_backend", None))
    if mode == "sdpa" or int8_unsupported(key, key, value, None, 0.0, False):
        return None
    if torch.compiler.is_compiling():  # per chunk through the custom op (K/V quantized per chunk)
        reference = mode == REFERENCE_MODE
        return lambda q: ops.attention_int8(q, key, value, None, reference)
    if mode == "int8":
        ok, reason = K.int8_attention_status(key.device)
        if not ok:
            raise AttentionUnavailableError(f"wanquant int8 attention cannot run: {reason}")
        config = K.env_config()
        kv = K.quantize_kv(key, value, v_perm=config.v_perm)
        return lambda q: K.attention_prepared(q, kv, config=config)
    kv = K.quantize_kv_reference(key, value)
    return lambda q: K.attention_prepared_reference(q, kv)
