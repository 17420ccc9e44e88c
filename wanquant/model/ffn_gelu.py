"""A Wan FeedForward's tanh GELU moved into the next W4A4 layer's activation kernel.

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
"""

from __future__ import annotations

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


def move_gelu(block: nn.Module) -> bool:
    """Move ``block.ffn``'s tanh GELU into its W4A4 down projection; False (nothing done)
    where the feed-forward is not that shape (another activation, a 16-bit down
    projection, dropout that is not the identity)."""
    net = getattr(getattr(block, "ffn", None), "net", None)
    if net is None or len(net) != 3:
        return False
    act, drop, down = net[0], net[1], net[2]
    if not (type(act) is GELU and act.approximate == "tanh" and isinstance(down, W4A4Linear)
            and isinstance(drop, nn.Dropout) and drop.p == 0.0):
        return False
    net[0] = ProjectionOnly(act)
    down.gelu_input = True
    return True


def restore_gelu(block: nn.Module) -> None:
    """Undo :func:`move_gelu` (no-op where it was not applied)."""
    net = getattr(getattr(block, "ffn", None), "net", None)
    if net is not None and len(net) == 3 and isinstance(net[0], ProjectionOnly):
        net[0] = net[0]._replaced
        net[2].gelu_input = False
