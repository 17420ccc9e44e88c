"""GPU-memory savings of the runtime that do not change what a Wan expert computes.

What sets the peak of a Wan expert forward at 81 frames (DESIGN.md section 2) is not one
tensor but every token-wise intermediate at full length: the block's fp32 modulation
chain (``norm(x.float()) * (1 + scale) + shift``, two or three ``[S, 5120]`` fp32
tensors), the fused q/k/v output with its RMS-norm and rotary temporaries (the rotary
tables of diffusers are float64, so ``x * cos`` is float64), and the FFN's 13824-wide
intermediate (2.1 GB at 720p, twice while GELU runs). Only self-attention needs all
tokens at once, and only through its keys and values.

:func:`enable_token_chunking` therefore runs each transformer block as:

1. for each token chunk: modulation, q/k/v projection, q/k RMS-norm, rotary, written
   into three ``[B, S, heads, head_dim]`` buffers (the only full-length tensors);
2. for each token chunk: attention of the chunk's queries against all keys and values,
   output projection, residual, cross-attention (its text keys/values computed once per
   block), residual, FFN, residual; the block's output is written over the query buffer,
   whose chunk has just been consumed.

So a block holds its input plus three q/k/v-sized buffers (4 x ``S x dim`` bf16) plus
one chunk's temporaries, instead of about 10-11 x ``S x dim``. Token-wise ops give the
same values chunked or not; only GEMM blocking may round differently (tests check
allclose in fp32). It is mode-independent: BF16 experts and W4A4 experts are chunked
the same way. ``scope="ffn"`` chunks only each block's FFN (a smaller change).

The cross-attention keys/values of the text context are the same at every step; the
W4A4 layer can cache them per context (``W4A4Linear.cache_static_input``).
:func:`set_static_kv_cache` turns that cache off (it holds 0.42 GB per expert and
context at A14B size, to save about 2 TFLOP per forward, a few milliseconds on FP8
tensor cores) and :func:`release_static_caches` / :func:`install_cache_release` free
the caches of experts that will not run again in this video.

Names of the block's parts are constants here; which modules are the blocks comes from
:mod:`wanquant.model.wan`.
"""

from __future__ import annotations

import logging
import math
import types
from typing import Iterable, Literal

import torch
from torch import nn

from wanquant.model.wan import BLOCKS_ATTR

log = logging.getLogger(__name__)

# Paths inside one Wan transformer block (diffusers' `WanTransformerBlock`).
FFN_ATTR = "ffn"
SELF_ATTN_ATTR = "attn1"
CROSS_ATTN_ATTR = "attn2"
NORM_ATTRS = ("norm1", "norm2", "norm3")
MODULATION_ATTR = "scale_shift_table"
# The attention processor whose math the chunked block reproduces (checked by name, so
# other processors, e.g. a context-parallel one, keep the stock block forward).
_STOCK_PROCESSOR = "WanAttnProcessor"

Scope = Literal["block", "ffn"]
_ORIG = "_wanquant_orig_forward"
_CHUNK = "_wanquant_chunk_tokens"


# ---------------------------------------------------------------------------------------
# token chunks
def token_chunks(num_tokens: int, chunk_tokens: int) -> list[slice]:
    """Split ``range(num_tokens)`` into ``ceil(num_tokens / chunk_tokens)`` near-equal slices.

    Sizes are multiples of 128 where possible (GEMM tiles), the last one takes the rest.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    n = max(1, math.ceil(num_tokens / chunk_tokens))
    size = math.ceil(num_tokens / n)
    if chunk_tokens >= 128:
        size = min(chunk_tokens, math.ceil(size / 128) * 128)
    out, start = [], 0
    while start < num_tokens:
        stop = min(num_tokens, start + size)
        out.append(slice(start, stop))
        start = stop
    return out


def _blocks(transformer: nn.Module) -> nn.ModuleList:
    blocks = getattr(transformer, BLOCKS_ATTR, None)
    if blocks is None:
        raise TypeError(f"{type(transformer).__name__} has no `{BLOCKS_ATTR}`: not a Wan transformer")
    return blocks


# ---------------------------------------------------------------------------------------
# FFN-only chunking
def _chunked_ffn_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    orig = getattr(self, _ORIG)
    chunk = getattr(self, _CHUNK)
    if hidden_states.ndim != 3 or hidden_states.shape[1] <= chunk:
        return orig(hidden_states, *args, **kwargs)
    out = None
    for c in token_chunks(hidden_states.shape[1], chunk):
        y = orig(hidden_states[:, c], *args, **kwargs)
        if out is None:
            out = y.new_empty(hidden_states.shape[0], hidden_states.shape[1], y.shape[-1])
        out[:, c] = y
    return out


# ---------------------------------------------------------------------------------------
# whole-block chunking
def _qkv(attn: nn.Module, x: torch.Tensor):
    """Self-attention q, k, v of ``x`` (fused or separate projections)."""
    if getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None) is not None:
        return attn.to_qkv(x).chunk(3, dim=-1)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Wan's rotary embedding on ``x [B, T, H, D]`` with the same dtype promotions as diffusers,
    written into ``out`` (a slice of the full-length buffer) when given."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    if out is None:
        out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


def _stock_attention(attn: nn.Module) -> bool:
    proc = getattr(attn, "processor", None)
    return (type(proc).__name__ == _STOCK_PROCESSOR and getattr(proc, "_parallel_config", None) is None
            and getattr(attn, "add_k_proj", None) is None)


def _cross_kv(attn: nn.Module, context: torch.Tensor):
    """Keys and values of the text context, once per block forward (what the stock processor
    computes at every call)."""
    if getattr(attn, "fused_projections", False) and getattr(attn, "to_kv", None) is not None:
        k, v = attn.to_kv(context).chunk(2, dim=-1)
    else:
        k, v = attn.to_k(context), attn.to_v(context)
    k = attn.norm_k(k)
    return k.unflatten(2, (attn.heads, -1)), v.unflatten(2, (attn.heads, -1))


def _cross_attention(attn: nn.Module, x: torch.Tensor, kv, dispatch) -> torch.Tensor:
    q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
    o = dispatch(q, kv[0], kv[1], attn_mask=None, dropout_p=0.0, is_causal=False,
                 backend=getattr(attn.processor, "_attention_backend", None), parallel_config=None)
    o = o.flatten(2, 3).type_as(q)
    return attn.to_out[1](attn.to_out[0](o))


def _modulation(block: nn.Module, temb: torch.Tensor):
    table = getattr(block, MODULATION_ATTR)
    if temb.ndim == 4:  # per-token modulation (Wan2.2 TI2V): [B, S, 6, D]
        parts = (table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        return [p.squeeze(2) for p in parts]
    return list((table + temb.float()).chunk(6, dim=1))  # [B, 1, D] each


def _supports_block_chunking(block: nn.Module) -> tuple[bool, str]:
    for name in (SELF_ATTN_ATTR, CROSS_ATTN_ATTR, FFN_ATTR, MODULATION_ATTR, *NORM_ATTRS):
        if not hasattr(block, name):
            return False, f"block has no `{name}`"
    attn = getattr(block, SELF_ATTN_ATTR)
    proc = getattr(attn, "processor", None)
    if getattr(attn, "is_cross_attention", False):
        return False, "the block's self-attention is marked cross-attention"
    if type(proc).__name__ != _STOCK_PROCESSOR:
        return False, f"self-attention processor is {type(proc).__name__}, not {_STOCK_PROCESSOR}"
    if getattr(proc, "_parallel_config", None) is not None:
        return False, "context-parallel attention is configured"
    if getattr(attn, "add_k_proj", None) is not None:
        return False, "self-attention has added image key/value projections"
    return True, ""


def _chunked_block_forward(self: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                           temb: torch.Tensor, rotary_emb=None, *args, **kwargs) -> torch.Tensor:
    orig = getattr(self, _ORIG)
    chunk = getattr(self, _CHUNK)
    if args or kwargs or hidden_states.ndim != 3 or hidden_states.shape[1] <= chunk:
        return orig(hidden_states, encoder_hidden_states, temb, rotary_emb, *args, **kwargs)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    b, s, _ = hidden_states.shape
    dtype = hidden_states.dtype
    chunks = token_chunks(s, chunk)
    shift, scale, gate, c_shift, c_scale, c_gate = _modulation(self, temb)
    per_token = temb.ndim == 4

    def sl(t: torch.Tensor, c: slice) -> torch.Tensor:
        return t[:, c] if per_token else t

    attn = getattr(self, SELF_ATTN_ATTR)
    norm1, norm2, norm3 = (getattr(self, n) for n in NORM_ATTRS)
    heads = attn.heads

    # 1. q, k, v of every chunk into full-length buffers.
    q_buf = k_buf = v_buf = None
    for c in chunks:
        h = hidden_states[:, c]
        n = (norm1(h.float()) * (1 + sl(scale, c)) + sl(shift, c)).type_as(hidden_states)
        q, k, v = _qkv(attn, n)
        del n
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (heads, -1)) for t in (q, k, v))
        if q_buf is None:
            q_buf = q.new_empty(b, s, *q.shape[2:])
            k_buf = k.new_empty(b, s, *k.shape[2:])
            v_buf = v.new_empty(b, s, *v.shape[2:])
        if rotary_emb is not None:  # written straight into the buffers
            cos, sin = rotary_emb
            _rotary(q, cos[:, c], sin[:, c], out=q_buf[:, c])
            _rotary(k, cos[:, c], sin[:, c], out=k_buf[:, c])
        else:
            q_buf[:, c], k_buf[:, c] = q, k
        v_buf[:, c] = v
        del q, k, v

    # 2. per chunk: attention against all keys, then everything token-wise.
    alias = q_buf.dtype == dtype and q_buf.shape[2] * q_buf.shape[3] == hidden_states.shape[2]
    out = q_buf.view(b, s, -1) if alias else torch.empty_like(hidden_states, memory_format=torch.contiguous_format)
    backend = getattr(attn.processor, "_attention_backend", None)
    cross = getattr(self, CROSS_ATTN_ATTR)
    ffn = getattr(self, FFN_ATTR)
    # The text keys/values are the same for every chunk: computed once here, not per chunk.
    cross_kv = _cross_kv(cross, encoder_hidden_states) if _stock_attention(cross) else None
    for c in chunks:
        o = dispatch_attention_fn(q_buf[:, c], k_buf, v_buf, attn_mask=None, dropout_p=0.0, is_causal=False,
                                  backend=backend, parallel_config=None)
        o = o.flatten(2, 3).type_as(q_buf)
        o = attn.to_out[1](attn.to_out[0](o))
        h = (hidden_states[:, c].float() + o * sl(gate, c)).type_as(hidden_states)
        del o
        n = norm2(h.float()).type_as(hidden_states)
        if cross_kv is not None:
            h = h + _cross_attention(cross, n, cross_kv, dispatch_attention_fn)
        else:
            h = h + cross(n, encoder_hidden_states, None, None)
        n = (norm3(h.float()) * (1 + sl(c_scale, c)) + sl(c_shift, c)).type_as(hidden_states)
        f = ffn(n)
        del n
        # The query chunk was consumed above: its memory takes the block's output.
        out[:, c] = (h.float() + f.float() * sl(c_gate, c)).type_as(hidden_states)
        del f, h
    del k_buf, v_buf, cross_kv
    return out


def enable_token_chunking(transformer: nn.Module, chunk_tokens: int, *, scope: Scope = "block") -> None:
    """Process every block of ``transformer`` in chunks of at most ``chunk_tokens`` tokens.

    ``scope="block"`` (default): the whole block as the module docstring describes; blocks
    this cannot handle (another attention processor, context parallelism) fall back to
    ``"ffn"`` with a warning. ``scope="ffn"``: only the FFN. Calling again changes the
    chunk size or scope. Inputs of at most ``chunk_tokens`` tokens run unchunked.
    """
    if scope not in ("block", "ffn"):
        raise ValueError(f"scope must be 'block' or 'ffn', got {scope!r}")
    if int(chunk_tokens) <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    disable_token_chunking(transformer)
    fallbacks = set()
    for block in _blocks(transformer):
        use_block = scope == "block"
        if use_block:
            ok, why = _supports_block_chunking(block)
            if not ok:
                fallbacks.add(why)
                use_block = False
        target = block if use_block else getattr(block, FFN_ATTR)
        fn = _chunked_block_forward if use_block else _chunked_ffn_forward
        setattr(target, _ORIG, target.forward)
        setattr(target, _CHUNK, int(chunk_tokens))
        target.forward = types.MethodType(fn, target)
    for why in sorted(fallbacks):
        log.warning("token chunking: FFN only for some blocks (%s)", why)
    transformer._wanquant_token_chunking = (int(chunk_tokens), scope)


def disable_token_chunking(transformer: nn.Module) -> None:
    """Undo :func:`enable_token_chunking` (no-op where it was not enabled)."""
    for block in _blocks(transformer):
        for target in (block, getattr(block, FFN_ATTR, None)):
            if target is not None and _ORIG in target.__dict__:
                target.__dict__.pop("forward", None)
                delattr(target, _ORIG)
                delattr(target, _CHUNK)
    transformer.__dict__.pop("_wanquant_token_chunking", None)


def token_chunking_of(transformer: nn.Module) -> tuple[int, str] | None:
    """``(chunk_tokens, scope)`` if chunking is on, else None."""
    return getattr(transformer, "_wanquant_token_chunking", None)


# ---------------------------------------------------------------------------------------
# static (per-video) cross-attention key/value cache of W4A4 layers
def _static_layers(transformer: nn.Module):
    for m in transformer.modules():
        if hasattr(m, "cache_static_input") and hasattr(m, "state"):
            yield m


def set_static_kv_cache(transformer: nn.Module, enabled: bool) -> int:
    """Turn the per-context cache of the text-input layers on or off; returns how many layers.

    Only layers the adapter marked static (``attn2.to_kv``) are turned on again.
    """
    from wanquant.model.wan import layer_input_kind

    n = 0
    for name, m in transformer.named_modules():
        if not (hasattr(m, "cache_static_input") and hasattr(m, "state")):
            continue
        try:
            static = layer_input_kind(name) == "text"
        except KeyError:
            static = False
        if static:
            m.cache_static_input = bool(enabled)
            n += 1
    if not enabled:
        release_static_caches(transformer)
    return n


def _states(transformer: nn.Module):
    seen = {}
    for m in _static_layers(transformer):
        seen[id(m.state)] = m.state
    state = getattr(transformer, "_wanquant_state", None)
    if state is not None:
        seen[id(state)] = state
    return list(seen.values())


def static_cache_bytes(transformer: nn.Module) -> int:
    """Bytes held now by the expert's per-context key/value caches."""
    total, seen = 0, set()
    for state in _states(transformer):
        for _ctx, outputs in state._cache.values():
            for _shape, y in outputs.values():
                if id(y) not in seen:
                    seen.add(id(y))
                    total += y.numel() * y.element_size()
    return total


def release_static_caches(transformer: nn.Module) -> int:
    """Free the expert's per-context key/value caches; returns the bytes released."""
    freed = static_cache_bytes(transformer)
    for state in _states(transformer):
        state.clear_cache()
    return freed


def install_cache_release(experts: Iterable[nn.Module], before: Iterable[nn.Module] = ()) -> list:
    """Free idle experts' caches: when one expert starts a forward, the others' caches are
    released (Wan2.2 never returns to the high-noise expert within a video); when a module
    in ``before`` (e.g. the VAE decoder) starts, all experts' caches are released.
    Returns the hook handles."""
    experts = list(experts)

    def releaser(targets):
        def hook(module, args):  # returns None: the input is left alone
            for x in targets:
                release_static_caches(x)
        return hook

    handles = []
    for e in experts:
        handles.append(e.register_forward_pre_hook(releaser([o for o in experts if o is not e])))
    for mod in before:
        handles.append(mod.register_forward_pre_hook(releaser(experts)))
    return handles


# ---------------------------------------------------------------------------------------
# accounting
def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared storages counted once)."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def expert_memory_breakdown(transformer: nn.Module) -> dict[str, int]:
    """Bytes of one expert by kind: quantized layers (canonical buffers), the fast path's
    repacked extras, 16-bit blocks and the 16-bit rest, per-context caches."""
    quant, fast_extra, seen_q = [], 0, set()
    for m in transformer.modules():
        if hasattr(m, "qweight") and hasattr(m, "clip_table"):
            quant.extend(m.buffers(recurse=False))
            seen_q.add(id(m))
            fast = getattr(m, "_fast", None)
            if fast is not None:
                own = {t.untyped_storage().data_ptr() for t in m.buffers(recurse=False)}
                extra = [t for t in vars(fast).values() if isinstance(t, torch.Tensor)]
                fast_extra += tensor_bytes([t for t in extra if t.untyped_storage().data_ptr() not in own])
    q_ptrs = {t.untyped_storage().data_ptr() for t in quant}
    blocks = _blocks(transformer)
    block_16 = [t for t in [*blocks.parameters(), *blocks.buffers()] if t.untyped_storage().data_ptr() not in q_ptrs]
    block_ptrs = {t.untyped_storage().data_ptr() for t in block_16}
    rest = [t for t in [*transformer.parameters(), *transformer.buffers()]
            if t.untyped_storage().data_ptr() not in q_ptrs | block_ptrs]
    return {
        "quantized_layers": tensor_bytes(quant),
        "fast_path_extra": fast_extra,
        "blocks_16bit": tensor_bytes(block_16),
        "rest_16bit": tensor_bytes(rest),
        "static_kv_cache": static_cache_bytes(transformer),
    }
