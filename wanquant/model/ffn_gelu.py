"""Where a Wan FeedForward's tanh GELU runs in a compiled W4A4 block.

diffusers' ``FeedForward`` is ``GELU(proj + tanh GELU) -> Dropout -> Linear``. In a compiled
W4A4 block the GELU is an Inductor kernel that reads the up projection's output and writes
its GELU (2 x 2 bytes per element of the 13,824-wide hidden layer), and the down
projection's activation kernel then reads that output twice. :func:`move_gelu` gives the
down projection (``W4A4Linear.gelu_input``) the GELU instead: its activation kernel applies
it on load (``act_quant(gelu_input=True)``), so the GELU's output is never written. The
up projection stays where it was (``ffn.net.0.proj``), so ``state_dict`` keys, checkpoints
and LoRA names are unchanged; :func:`restore_gelu` undoes it.

Used by :func:`wanquant.model.compile.compile_blocks` with ``gelu_in_activation=True``
(off by default: measured slower on an H100, see benchmarks/KERNEL_NOTES.md).

:func:`gelu_in_epilogue` moves it the other way, into the up projection's GEMM epilogue:
the compiled feed-forward runs ``wanquant::w4a4_linear_gelu`` (the GEMM stores the GELU
and the down projection's activation row maxima) and the down projection on those maxima,
so the GELU's own kernel goes away and the activation kernel reads its input once. Only the
feed-forward's ``forward`` changes (an instance attribute), eager runs stay stock, and
:func:`restore_gelu` undoes it. ``compile_blocks(gelu_in_epilogue=True)`` uses it (off by
default: on an H100 the GELU kernel's 0.17 s a 720p step went away and the up projection's
GEMM grew by 0.14 s, its epilogue not being overlapped with its MMAs; benchmarks/KERNEL_NOTES.md).
"""

from __future__ import annotations

import types

import torch
from diffusers.models.activations import GELU
from torch import nn

from wanquant.runtime.linear import W4A4Linear


class ProjectionOnly(nn.Module):
    """diffusers' ``GELU`` module without its activation: ``proj(x)``, the GELU having moved
    into the next layer. Keeps the module it replaced (unregistered) for :func:`restore_gelu`."""

    def __init__(self, gelu: GELU) -> None:
        super().__init__()
        self.proj = gelu.proj
        object.__setattr__(self, "_replaced", gelu)  # not a submodule: its parameters are proj's

    def forward(self, hidden_states):
        return self.proj(hidden_states)


def _tanh_gelu_ffn(block: nn.Module) -> nn.ModuleList | None:
    """``block.ffn.net`` where it is ``GELU(proj, tanh) -> Dropout(0) -> W4A4Linear``; else None."""
    net = getattr(getattr(block, "ffn", None), "net", None)
    if net is None or len(net) != 3:
        return None
    act, drop, down = net[0], net[1], net[2]
    if not (type(act) is GELU and act.approximate == "tanh" and isinstance(down, W4A4Linear)
            and isinstance(drop, nn.Dropout) and drop.p == 0.0):
        return None
    return net


def move_gelu(block: nn.Module) -> bool:
    """Move ``block.ffn``'s tanh GELU into its W4A4 down projection; False (nothing done)
    where the feed-forward is not that shape (another activation, a 16-bit down
    projection, dropout that is not the identity)."""
    net = _tanh_gelu_ffn(block)
    if net is None:
        return False
    net[0] = ProjectionOnly(net[0])
    net[2].gelu_input = True
    return True


def _epilogue_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``FeedForward.forward`` with the GELU in the up projection's GEMM epilogue where
    both projections are traced on the fast path; the stock forward otherwise."""
    up, down = self.net[0].proj, self.net[2]
    if isinstance(up, W4A4Linear) and up.compiles_fast() and down.compiles_fast():
        g, amax = up.forward_gelu_rowmax(hidden_states, down)
        return down.forward_with_row_amax(g, amax)
    return type(self).forward(self, hidden_states, *args, **kwargs)


def gelu_in_epilogue(block: nn.Module) -> bool:
    """Run ``block.ffn``'s tanh GELU in its W4A4 up projection's GEMM epilogue when compiled
    (see the module docstring); False (nothing done) where the feed-forward is not
    ``GELU(W4A4 proj, tanh) -> Dropout(0) -> W4A4Linear``."""
    net = _tanh_gelu_ffn(block)
    if net is None or not isinstance(net[0].proj, W4A4Linear):
        return False
    block.ffn.forward = types.MethodType(_epilogue_forward, block.ffn)
    return True


def restore_gelu(block: nn.Module) -> None:
    """Undo :func:`move_gelu` and :func:`gelu_in_epilogue` (no-op where neither was applied)."""
    ffn = getattr(block, "ffn", None)
    net = getattr(ffn, "net", None)
    if net is not None and len(net) == 3 and isinstance(net[0], ProjectionOnly):
        net[0] = net[0]._replaced
        net[2].gelu_input = False
    if ffn is not None and getattr(ffn.__dict__.get("forward"), "__func__", None) is _epilogue_forward:
        del ffn.__dict__["forward"]
