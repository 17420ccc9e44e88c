"""The self-attention processor of wanquant's fast path: diffusers' ``WanAttnProcessor``
with the q/k RMS-norm and rotary done by one kernel.

Stock diffusers runs ``norm_q``/``norm_k`` (``torch.nn.RMSNorm`` over all heads) and then
its rotary on de-interleaved channel pairs: eagerly that is a dozen elementwise kernels
with float32 temporaries, compiled it is one Inductor reduction that reads the pairs with
strided scalar loads (3.2 ms per block at 720p on an H200, 4x its memory floor).
:class:`FusedRopeAttnProcessor` replaces both with the custom op
``wanquant::qk_norm_rope`` (:mod:`wanquant.kernels.rope`; one opaque node under
``torch.compile``), and is otherwise the stock processor: any call it does not cover
(cross-attention, no rotary, added image projections, context parallelism, a norm that is
not an affine ``RMSNorm``, 16-bit rotary tables) runs the stock code. On CPU the op runs the PyTorch reference,
which is diffusers' arithmetic.

:func:`wanquant.model.attention.set_self_attention` installs it with the 8-bit attention
and puts the stock processor back for SDPA.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from wanquant.kernels import ops
from wanquant.kernels.rope import TABLE_DTYPES


def _rms_eps(norm: torch.nn.Module, dtype: torch.dtype) -> float | None:
    """The eps of an affine ``torch.nn.RMSNorm`` over the last dim (as ``F.rms_norm`` uses it), else None."""
    if type(norm) is not torch.nn.RMSNorm or norm.weight is None or len(norm.normalized_shape) != 1:
        return None
    return float(norm.eps) if norm.eps is not None else float(torch.finfo(dtype).eps)


def fusable(attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states, rotary_emb,
            parallel_config) -> float | None:
    """The norms' eps if :class:`FusedRopeAttnProcessor` may fuse this call, else None."""
    if encoder_hidden_states is not None or rotary_emb is None or parallel_config is not None:
        return None
    if getattr(attn, "add_k_proj", None) is not None or hidden_states.ndim != 3:
        return None
    if hidden_states.dtype not in (torch.bfloat16, torch.float16):
        return None
    eps_q, eps_k = _rms_eps(attn.norm_q, hidden_states.dtype), _rms_eps(attn.norm_k, hidden_states.dtype)
    if eps_q is None or eps_q != eps_k:
        return None
    cos, sin = rotary_emb
    d = attn.inner_dim // attn.heads
    if cos.dtype not in TABLE_DTYPES or sin.dtype != cos.dtype or d & (d - 1) or cos.shape[-1] != d:
        return None
    return eps_q


class FusedRopeAttnProcessor(WanAttnProcessor):
    """``WanAttnProcessor`` whose self-attention runs ``wanquant::qk_norm_rope``, or with
    ``fuse_int8_queries`` on the 8-bit backends ``wanquant::rope_attention_int8`` (the
    rotary kernel writes the attention's INT8 queries, one pass fewer over the queries)."""

    # Off: on an H100 (2026-12-07) it saved no measurable time, and its GPU test found its
    # output not bit-identical to the unfused path's at head dim 128 (benchmarks/KERNEL_NOTES.md).
    fuse_int8_queries = False

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        eps = fusable(attn, hidden_states, encoder_hidden_states, rotary_emb, self._parallel_config)
        if eps is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        cos, sin = rotary_emb
        mode = int8_mode_of(self._attention_backend)
        if mode is not None and attention_mask is None and self.fuse_int8_queries and int8_covers(attn, value):
            out = ops.rope_attention_int8(query, key, value, attn.norm_q.weight, attn.norm_k.weight, cos, sin,
                                          attn.heads, eps, mode == "int8_reference")
            out = out.flatten(2, 3).type_as(query)
            return attn.to_out[1](attn.to_out[0](out))
        query, key = ops.qk_norm_rope(query, key, attn.norm_q.weight, attn.norm_k.weight, cos, sin, attn.heads, eps)
        value = value.unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=None)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def int8_mode_of(backend) -> str | None:
    """``"int8"`` / ``"int8_reference"`` for wanquant's 8-bit attention backends, else None."""
    from wanquant.model.attention import mode_of_backend

    mode = mode_of_backend(backend)
    return None if mode == "sdpa" else mode


def int8_covers(attn: torch.nn.Module, value: torch.Tensor) -> bool:
    """Whether the 8-bit kernel takes this self-attention (its head dim; q, k, v of one shape)."""
    from wanquant.model.attention import int8_unsupported

    v = value.unflatten(2, (attn.heads, -1))
    return int8_unsupported(v, v, v, None, 0.0, False) is None


def _recast(proc, old: type, new: type):
    """A ``new`` processor with ``proc``'s settings (attention backend, parallel config) if
    ``proc`` is exactly an ``old`` one; ``proc`` itself otherwise (someone else's processor
    is left alone)."""
    if type(proc) is not old:
        return proc
    out = new()
    out.__dict__.update(proc.__dict__)
    return out


def with_fused_rope(proc) -> WanAttnProcessor:
    """The stock processor ``proc`` as a :class:`FusedRopeAttnProcessor`."""
    return _recast(proc, WanAttnProcessor, FusedRopeAttnProcessor)


def without_fused_rope(proc) -> WanAttnProcessor:
    """A :class:`FusedRopeAttnProcessor` ``proc`` as the stock processor."""
    return _recast(proc, FusedRopeAttnProcessor, WanAttnProcessor)


def is_wan_processor(proc) -> bool:
    """Diffusers' stock processor or this one (whose other calls are the stock code)."""
    return type(proc) in (WanAttnProcessor, FusedRopeAttnProcessor)
