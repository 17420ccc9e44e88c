"""Regional ``torch.compile`` of Wan experts: one compiled block serves all 40.

Compiling a whole 40-block expert costs minutes and recompiles whenever anything changes;
diffusers' ``compile_repeated_blocks`` compiles the repeated block instead, and so does
:func:`compile_blocks`: each block's ``forward`` becomes ``torch.compile(forward)``.
TorchDynamo caches compiled code per code object, so the first block's compilation is
reused by the other 39 (its guards check types, shapes and settings, not which block).

What makes the blocks compile without graph breaks: the W4A4 fast path and the 8-bit
attention are ``torch.library`` custom ops (:mod:`wanquant.kernels.ops`), so Inductor
fuses the modulation, norms, rotary, gates and residuals around them. The traced W4A4
forward does no bookkeeping of its own; a pre-forward hook on the expert (eager, outside
the compiled regions) prepares every quantized layer for the input's device first
(:meth:`~wanquant.runtime.linear.W4A4Linear.prepare_for_compile`).

Shapes are compiled static (``dynamic=False``): a new video size compiles once more. A
quantized block compiles once per timestep bin it meets (the bin index is guarded), at
most three per expert.

Hooks registered on a block (offloading) stay eager: only ``forward`` is compiled. Call
it last, after token chunking, attention and LoRA settings; :func:`uncompile_blocks`
undoes it.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

from wanquant.model.ffn_gelu import gelu_in_epilogue as _gelu_in_epilogue
from wanquant.model.ffn_gelu import move_gelu, restore_gelu
from wanquant.model.wan import blocks_of, group_of
from wanquant.runtime.expert import quantized_layers

log = logging.getLogger(__name__)

_PREV = "_wanquant_precompile_forward"  # the block's forward before compile_blocks (instance attribute or None)
_HOOK = "_wanquant_compile_hook"


def _prepare_hook(transformer: nn.Module):
    layers = list(quantized_layers(transformer).values())

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(x, torch.Tensor):
            for layer in layers:
                layer.prepare_for_compile(x.device)

    return hook


# Inductor elides a bf16 downcast-upcast pair inside a fused kernel: row maxima fused into
# the kernel that writes x would be those of x before its rounding, not of the stored x the
# activation kernel quantizes (a smaller maximum can overflow e4m3). Emulating the casts
# keeps them exact, and the compiled block's numbers closer to eager's.
ROW_AMAX_INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


def compile_blocks(transformer: nn.Module, *, mode: str | None = None, backend: str = "inductor",
                   fullgraph: bool = False, dynamic: bool = False, options: dict | None = None,
                   fused_norms: bool = False, row_amax_in_graph: bool = True,
                   gelu_in_activation: bool = False, gelu_in_epilogue: bool = False) -> int:
    """Compile every block's ``forward`` of ``transformer``; returns how many blocks.

    ``mode``/``backend``/``fullgraph``/``dynamic``/``options`` (Inductor settings, e.g.
    ``{"coordinate_descent_tuning": True}``; not together with ``mode``) go to
    ``torch.compile``. ``fused_norms``: compile
    :func:`~wanquant.model.fused_block.fused_block_forward` (the norm steps as wanquant
    kernels) instead of the stock forward, where no other forward (token chunking) is set.
    ``row_amax_in_graph``: each W4A4 layer's activation row maxima as graph ops (fused by
    Inductor into the kernel that writes the input; the activation kernel reads it once),
    except after attention (:attr:`~wanquant.model.wan.LinearGroup.after_attention`);
    False: the activation kernel finds them in a first pass of its own. With Inductor and
    W4A4 layers it sets :data:`ROW_AMAX_INDUCTOR_OPTIONS` (``mode`` then goes in as its
    options); a 16-bit model compiles with the caller's settings alone.
    ``gelu_in_activation``: each feed-forward's GELU moves into its W4A4 down projection's
    activation kernel (:mod:`wanquant.model.ffn_gelu`; off by default: measured slower).
    ``gelu_in_epilogue``: each feed-forward's GELU and its down projection's row maxima in
    the up projection's GEMM epilogue (same module; off by default: measured within noise,
    15.77 against 15.80 s a 720p step on an H100).
    Calling it again recompiles with the new arguments.
    """
    if mode is not None and options:
        raise ValueError("torch.compile takes a mode or Inductor options, not both")
    if gelu_in_activation and gelu_in_epilogue:
        raise ValueError("the GELU goes in the activation kernel or in the GEMM epilogue, not both")
    uncompile_blocks(transformer)
    for block in blocks_of(transformer):
        if gelu_in_activation:
            move_gelu(block)
        if gelu_in_epilogue:
            _gelu_in_epilogue(block)
    layers = quantized_layers(transformer)
    for name, layer in layers.items():
        layer.row_amax_in_graph = row_amax_in_graph and not group_of(name).after_attention
    if backend == "inductor" and any(layer.row_amax_in_graph for layer in layers.values()):
        if mode is not None:  # the same settings, spelled as options
            from torch._inductor import list_mode_options

            options, mode = dict(list_mode_options(mode, dynamic)), None
        options = {**(options or {}), **ROW_AMAX_INDUCTOR_OPTIONS}
    blocks = blocks_of(transformer)
    for block in blocks:
        prev = block.__dict__.get("forward")  # token chunking sets an instance forward
        block.__dict__[_PREV] = prev
        forward = block.forward
        if fused_norms and prev is None:
            from wanquant.model.fused_block import fused_block_forward

            forward = types.MethodType(fused_block_forward, block)
        block.forward = torch.compile(forward, mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic,
                                      options=options or None)
    setattr(transformer, _HOOK, transformer.register_forward_pre_hook(_prepare_hook(transformer), with_kwargs=True))
    return len(blocks)


def uncompile_blocks(transformer: nn.Module) -> None:
    """Undo :func:`compile_blocks` (no-op where it was not applied)."""
    for block in blocks_of(transformer):
        restore_gelu(block)
        if _PREV in block.__dict__:
            prev = block.__dict__.pop(_PREV)
            if prev is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = prev
    handle = transformer.__dict__.pop(_HOOK, None)
    if handle is not None:
        handle.remove()


def is_compiled(transformer: nn.Module) -> bool:
    return _HOOK in transformer.__dict__
