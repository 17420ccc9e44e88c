"""A Wan block forward whose residual + LayerNorm + modulation steps are wanquant kernels.

``WanTransformerBlock.forward`` (diffusers 0.42.1) normalises three times per block; the
function below is that forward with those steps as the custom ops
``wanquant::norm_modulate`` and ``wanquant::residual_norm``
(:mod:`wanquant.kernels.adaln`, one pass per row) instead of PyTorch expressions that
Inductor fuses on its own (at 1.6-1.7x their memory floors on an H100). Everything else
(modulation table, sub-layers, the last gated residual, which Inductor runs at its floor)
is the stock code. On CPU the ops run diffusers' arithmetic, so the block's output is the
stock block's, bit for bit.

:func:`wanquant.model.compile.compile_blocks` uses it with ``fused_norms=True`` (a
candidate until ``benchmarks/prepass_check.sh`` shows it beats Inductor; off by default).
Blocks it does not cover (per-token modulation as in Wan2.2-TI2V-5B, ``cross_attn_norm``
off, other norm types) run the stock forward.
"""

from __future__ import annotations

import torch
from diffusers.models.normalization import FP32LayerNorm
from torch import nn

from wanquant.kernels import ops


def _layer_norm_eps(norm: nn.Module, affine: bool) -> float | None:
    """eps of a diffusers ``FP32LayerNorm`` over the last dim with (or without) weight and bias; else None."""
    if type(norm) is not FP32LayerNorm or len(norm.normalized_shape) != 1:
        return None
    if affine != (norm.weight is not None and norm.bias is not None) or (not affine and norm.weight is not None):
        return None
    return float(norm.eps)


def covered(block: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor) -> bool:
    """Whether :func:`fused_block_forward` computes this call (else it runs the stock forward)."""
    eps = [_layer_norm_eps(block.norm1, False), _layer_norm_eps(block.norm2, True), _layer_norm_eps(block.norm3, False)]
    return (None not in eps and temb.ndim == 3 and hidden_states.ndim == 3
            and hidden_states.dtype in (torch.bfloat16, torch.float16))


def fused_block_forward(self: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                        temb: torch.Tensor, rotary_emb: torch.Tensor) -> torch.Tensor:
    """``WanTransformerBlock.forward`` with the norm steps as wanquant ops (bound to a block)."""
    if not covered(self, hidden_states, temb):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
        self.scale_shift_table + temb.float()).chunk(6, dim=1)
    # 1. self-attention
    n = ops.norm_modulate(hidden_states, scale_msa, shift_msa, self.norm1.eps)
    attn_output = self.attn1(n, None, None, rotary_emb)
    # 2. cross-attention
    hidden_states, n = ops.residual_norm(hidden_states, attn_output, gate_msa, self.norm2.weight.float(),
                                         self.norm2.bias.float(), None, None, self.norm2.eps)
    attn_output = self.attn2(n, encoder_hidden_states, None, None)
    # 3. feed-forward
    hidden_states, n = ops.residual_norm(hidden_states, attn_output, None, None, None, c_scale_msa, c_shift_msa,
                                         self.norm3.eps)
    ff_output = self.ffn(n)
    return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)
