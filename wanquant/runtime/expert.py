"""The quantized layers of one expert as a group: find them, share one state, pick a backend.

Model-independent: which module is an expert and how its forward announces the timestep
is the model adapter's business (:func:`wanquant.model.wan.bind_expert`).
"""

from __future__ import annotations

from torch import nn

from wanquant.runtime.linear import Backend, W4A4Linear
from wanquant.runtime.state import ExpertState, TimestepBins


def quantized_layers(model: nn.Module) -> dict[str, W4A4Linear]:
    """Every W4A4 layer of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, W4A4Linear)}


def share_state(model: nn.Module, bins: TimestepBins) -> ExpertState:
    """One :class:`ExpertState` for every quantized layer of ``model``; returns it."""
    state = ExpertState(bins)
    for layer in quantized_layers(model).values():
        layer.bind_state(state)
    return state


def set_backend(model: nn.Module, backend: Backend) -> None:
    for layer in quantized_layers(model).values():
        layer.set_backend(backend)


def refresh(model: nn.Module) -> None:
    """Re-read every layer's host-side copies after its buffers were replaced."""
    for layer in quantized_layers(model).values():
        layer.refresh()
