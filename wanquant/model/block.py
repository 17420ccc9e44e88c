"""Token chunking of Wan transformer blocks: the same computation, a lower activation peak.

Part of the model adapter: it re-implements diffusers' ``WanTransformerBlock.forward``
(0.42.1) token chunk by token chunk, so it lives beside the layer table.

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
"""

from __future__ import annotations

import logging
import math
import types
from typing import Literal

import torch
from torch import nn

from wanquant.model.wan import blocks_of

log = logging.getLogger(__name__)

# Paths inside one Wan transformer block (diffusers' `WanTransformerBlock`).
FFN_ATTR = "ffn"
SELF_ATTN_ATTR = "attn1"
CROSS_ATTN_ATTR = "attn2"
NORM_ATTRS = ("norm1", "norm2", "norm3")
MODULATION_ATTR = "scale_shift_table"

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


def _is_stock_processor(proc) -> bool:
    from wanquant.model.processor import is_wan_processor

    # Exactly the stock class (or wanquant's, whose unfused calls are the stock code): a
    # subclass (e.g. a context-parallel one) may compute otherwise.
    return is_wan_processor(proc)


def _stock_attention(attn: nn.Module) -> bool:
    proc = getattr(attn, "processor", None)
    return (_is_stock_processor(proc) and getattr(proc, "_parallel_config", None) is None
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
    if not _is_stock_processor(proc):
        return False, f"self-attention processor is {type(proc).__name__}, not diffusers' WanAttnProcessor"
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

    from wanquant.model.attention import chunk_attention

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
    # wanquant's 8-bit attention quantizes the keys/values once here, not once per chunk.
    attend = chunk_attention(attn, k_buf, v_buf)
    for c in chunks:
        if attend is not None:
            o = attend(q_buf[:, c])
        else:
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
    del k_buf, v_buf, cross_kv, attend
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
    for block in blocks_of(transformer):
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
    for block in blocks_of(transformer):
        for target in (block, getattr(block, FFN_ATTR, None)):
            if target is not None and _ORIG in target.__dict__:
                target.__dict__.pop("forward", None)
                delattr(target, _ORIG)
                delattr(target, _CHUNK)
    transformer.__dict__.pop("_wanquant_token_chunking", None)


def token_chunking_of(transformer: nn.Module) -> tuple[int, str] | None:
    """``(chunk_tokens, scope)`` if chunking is on, else None."""
    return getattr(transformer, "_wanquant_token_chunking", None)
