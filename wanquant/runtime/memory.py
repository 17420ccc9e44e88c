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

import functools
import types
from collections.abc import Iterable

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
def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Identifies the memory a tensor lives in: views of one buffer share it."""
    return str(t.device), t.untyped_storage().data_ptr()


_NOT_WALKED = (nn.Module, str, bytes, int, float, bool, complex, type, torch.device, torch.dtype,
               types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType, functools.partial)
_MODULE_SLOTS = ("_parameters", "_buffers", "_modules")


def _walk(obj, depth: int, seen: set[int], out: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return
    if depth <= 0 or obj is None or isinstance(obj, _NOT_WALKED) or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return
    for v in items:
        _walk(v, depth - 1, seen, out)


def held_tensors(module: nn.Module, depth: int = 6) -> list[torch.Tensor]:
    """Tensors ``module`` and its submodules hold outside their parameters and buffers: in
    plain attributes and the objects, containers and caches those reach (``depth`` levels):
    a prepared kernel's operands, a key/value cache, a stored context. Submodules are not
    entered through attributes (``modules()`` visits them)."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for m in module.modules():
        for name, v in vars(m).items():
            if name not in _MODULE_SLOTS:
                _walk(v, depth, seen, out)
    return out


def _storages(components: dict[str, nn.Module], others: dict[str, Iterable[torch.Tensor]] | None):
    """``(component, "params" | "held", tensor)`` for every distinct storage (by
    :func:`storage_key`), each for the first component that has it: parameters and
    buffers, then :func:`held_tensors`, component by component, then ``others``."""
    seen: set[tuple[str, int]] = set()

    def fresh(tensors):
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            key = storage_key(t)
            if key not in seen:
                seen.add(key)
                yield t

    for name, module in components.items():
        if module is None:
            continue
        for t in fresh([*module.parameters(), *module.buffers()]):
            yield name, "params", t
        for t in fresh(held_tensors(module)):
            yield name, "held", t
    for name, tensors in (others or {}).items():
        for t in fresh(tensors):
            yield name, "held", t


def device_census(components: dict[str, nn.Module], others: dict[str, Iterable[torch.Tensor]] | None = None) -> dict:
    """Bytes on each device, per component: ``params`` (parameters and buffers) and
    ``held`` (:func:`held_tensors`), then any ``others`` (name -> tensors). Every storage
    is counted once, for the first component that has it (a view of a flat buffer counts
    the whole buffer: that is the memory it keeps). Returns ``{"components": {name:
    {"params": {device: bytes}, "held": {device: bytes}}}, "total": {device: bytes}}``;
    :func:`owned_storages` gives the storages themselves."""
    out: dict = {"components": {}, "total": {}}
    for name, module in components.items():
        if module is not None:
            out["components"][name] = {"params": {}, "held": {}}
    for name in others or {}:
        out["components"][name] = {"params": {}, "held": {}}
    for name, kind, t in _storages(components, others):
        dev, n = str(t.device), t.untyped_storage().nbytes()
        per = out["components"][name][kind]
        per[dev] = per.get(dev, 0) + n
        out["total"][dev] = out["total"].get(dev, 0) + n
    return out


HOST_KINDS = ("pinned", "pageable", "file")


def host_census(components: dict[str, nn.Module], others: dict[str, Iterable[torch.Tensor]] | None = None,
                file_ranges: list[tuple[int, int]] | None = None) -> dict[str, dict[str, int]]:
    """Host bytes per component (counted as :func:`device_census` does) by kind: ``pinned``
    (page-locked: a policy's group buffers), ``file`` (inside a file-backed memory map, e.g.
    weights transformers mapped from safetensors: in the resident set only where read;
    ``file_ranges`` as :func:`wanquant.runtime.offload.file_ranges` gives them) and
    ``pageable`` (the rest)."""
    from wanquant.runtime.offload import file_ranges as maps, in_file

    ranges = maps() if file_ranges is None else file_ranges
    out = {name: dict.fromkeys(HOST_KINDS, 0) for name in [*(k for k, m in components.items() if m is not None),
                                                           *(others or {})]}
    for name, _kind, t in _storages(components, others):
        if t.device.type != "cpu":
            continue
        kind = "file" if in_file(t, ranges) else "pinned" if _pinned(t) else "pageable"
        out[name][kind] += t.untyped_storage().nbytes()
    return out


def _pinned(t: torch.Tensor) -> bool:
    try:
        return bool(t.is_pinned())
    except RuntimeError:  # a build without an accelerator to ask
        return False


def owned_storages(components: dict[str, nn.Module]) -> set[tuple[str, int]]:
    """:func:`storage_key` of every tensor :func:`device_census` counts for ``components``."""
    keys = set()
    for module in components.values():
        if module is not None:
            for t in [*module.parameters(), *module.buffers(), *held_tensors(module)]:
                if t.device.type != "meta":
                    keys.add(storage_key(t))
    return keys


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

