"""Memory of quantized experts at run time: the per-context k/v caches and accounting.

The cross-attention keys/values of the text context are the same at every step; the
W4A4 layer can cache them per context (``W4A4Linear.cache_static_input``, switched by
:func:`wanquant.model.wan.set_static_kv_cache`). :func:`release_static_caches` and
:func:`install_cache_release` free the caches of experts that will not run again in
this video. The byte counters count shared storages once.

Model-independent: the activation side (token chunking of Wan blocks) is in
:mod:`wanquant.model.block`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

# ---------------------------------------------------------------------------------------
# static (per-video) cross-attention key/value cache of W4A4 layers
def _static_layers(transformer: nn.Module):
    for m in transformer.modules():
        if hasattr(m, "cache_static_input") and hasattr(m, "state"):
            yield m


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


def expert_memory_breakdown(transformer: nn.Module, blocks: nn.Module) -> dict[str, int]:
    """Bytes of one expert by kind: quantized layers (canonical buffers), the fast path's
    repacked extras, 16-bit ``blocks`` and the 16-bit rest, per-context caches."""
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

