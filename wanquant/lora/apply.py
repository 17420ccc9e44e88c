"""LoRAs on a Wan pipeline's experts: load, set strengths, unload, list.

A LoRA on a quantized layer becomes more rank in its 16-bit branch
(:meth:`wanquant.runtime.linear.W4A4Linear.set_lora`; fused q|k|v take one piece per
member). A LoRA on a layer that stayed 16-bit (embedders, ``proj_out``, blocks kept
16-bit, or a whole BF16 pipeline) runs as a forward hook that adds ``strength (B A x +
bias)`` to the output, PEFT's unmerged form: exact and reversible, the weight is never
touched. Either way the checkpoint's tensors are never modified, so unloading gives
the base model bit for bit, and nothing needs reloading to switch.

Every change clears the expert's cached cross-attention k/v: they depend on the
text-embedder and the ``attn2.to_kv`` branch, either of which a LoRA may change.

Which expert: ``"transformer"`` (high noise; alias ``"high"``), ``"transformer_2"`` (low
noise; ``"low"``) or ``"both"``. A file with ``transformer_2.``-prefixed keys carries
its own low-noise section, used for that expert.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from wanquant.lora.files import LoraError, LoraFile, ModuleFactors, read_lora
from wanquant.numerics.lora import LoraPiece, LoraTerm
from wanquant.model.wan import LoraSite, experts_of, lora_site, runtime_state

log = logging.getLogger(__name__)

EXPERT_ALIASES = {"both": "both", "transformer": "transformer", "high": "transformer",
                  "transformer_2": "transformer_2", "low": "transformer_2"}
REGISTRY_ATTR = "_wanquant_loras"  # on each expert module: {name: LoraRecord}
LINEAR_TERMS_ATTR = "_wanquant_lora_terms"  # on a 16-bit nn.Linear: {name: LoraTerm}
LINEAR_HOOK_ATTR = "_wanquant_lora_hook"


@dataclass
class LoraRecord:
    """What one loaded LoRA put into one expert."""

    name: str
    path: str
    style: str
    strength: float
    rank: int
    layers: dict[str, nn.Module] = field(default_factory=dict)  # layer name -> W4A4Linear or nn.Linear

    def counts(self) -> dict[str, int]:
        q = sum(1 for m in self.layers.values() if not isinstance(m, nn.Linear))
        return {"w4a4": q, "16bit": len(self.layers) - q}


# ---------------------------------------------------------------------------------------
# 16-bit linears: a forward hook
def _linear_hook(module: nn.Linear, args, output):
    x = args[0]
    y = output
    for term in getattr(module, LINEAR_TERMS_ATTR).values():
        if term.strength == 0.0:
            continue
        for p in term.pieces:
            d = (x @ p.down.to(x.device, x.dtype).T) @ p.up.to(x.device, x.dtype).T if p.rank else 0.0
            if p.bias is not None:
                d = d + p.bias.to(x.device, x.dtype)
            y = y + term.strength * d
    return y


def _linear_set(module: nn.Linear, name: str, term: LoraTerm) -> None:
    # In the layer's device and dtype once, not at every forward (PEFT's unmerged LoRA
    # also runs in the layer's dtype).
    dev, dt = module.weight.device, module.weight.dtype
    term = LoraTerm(tuple(LoraPiece(p.row0, p.down.to(dev, dt), p.up.to(dev, dt),
                                    None if p.bias is None else p.bias.to(dev, dt)) for p in term.pieces), term.strength)
    terms = module.__dict__.setdefault(LINEAR_TERMS_ATTR, {})
    terms[name] = term
    if module.__dict__.get(LINEAR_HOOK_ATTR) is None:
        module.__dict__[LINEAR_HOOK_ATTR] = module.register_forward_hook(_linear_hook)


def _linear_remove(module: nn.Linear, name: str) -> None:
    terms = module.__dict__.get(LINEAR_TERMS_ATTR, {})
    terms.pop(name, None)
    if not terms:
        handle = module.__dict__.pop(LINEAR_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
        module.__dict__.pop(LINEAR_TERMS_ATTR, None)


# W4A4 layers are changed with prepare=False and prepared once at the end of an API call
# (_prepare), so a switch (unload + load) re-prepares each fast-path branch once.
def _set(layer: nn.Module, name: str, pieces: tuple[LoraPiece, ...], strength: float) -> None:
    if isinstance(layer, nn.Linear):
        _linear_set(layer, name, LoraTerm(pieces, strength))
    else:
        layer.set_lora(name, pieces, strength, prepare=False)


def _remove(layer: nn.Module, name: str) -> None:
    if isinstance(layer, nn.Linear):
        _linear_remove(layer, name)
    else:
        layer.remove_lora(name, prepare=False)


def _set_strength(layer: nn.Module, name: str, strength: float) -> None:
    if isinstance(layer, nn.Linear):
        layer.__dict__[LINEAR_TERMS_ATTR][name].strength = float(strength)
    else:
        layer.set_lora_strength(name, strength, prepare=False)


def _prepare(layers) -> None:
    seen = set()
    for layer in layers:
        if id(layer) not in seen and not isinstance(layer, nn.Linear):
            seen.add(id(layer))
            layer.prepare_lowrank()


def _changed(expert: nn.Module) -> None:
    state = runtime_state(expert)
    if state is not None:
        state.clear_cache()


# ---------------------------------------------------------------------------------------
# planning: resolve and check everything before touching the model
def _experts(pipe) -> dict[str, nn.Module]:
    return {e.attr: e.module for e in experts_of(pipe)}


def _targets(pipe, lora: LoraFile, expert: str) -> dict[str, dict[str, ModuleFactors]]:
    """Expert attribute -> the file section it gets."""
    choice = EXPERT_ALIASES.get(str(expert))
    if choice is None:
        raise ValueError(f"expert={expert!r}: use one of {sorted(EXPERT_ALIASES)}")
    experts = _experts(pipe)
    if choice != "both" and choice not in experts:
        raise ValueError(f"expert={expert!r}: this pipeline has experts {sorted(experts)}")
    wanted = list(experts) if choice == "both" else [choice]
    secs = lora.sections
    if set(secs) == {"transformer"}:  # one section: whichever experts were asked for
        return {attr: secs["transformer"] for attr in wanted}
    out = {attr: secs[attr] for attr in wanted if attr in secs}
    unused = sorted(set(secs) - set(out))
    if out and unused:
        log.warning("LoRA file %s: its %s section(s) are not used (expert=%r)", lora.path, unused, expert)
    if not out:
        raise LoraError(f"LoRA file {lora.path} holds weights for {sorted(secs)} only, not for expert {expert!r}; "
                        "load it with expert='both' or the expert it names")
    return out


def _plan(expert_module: nn.Module, lora: LoraFile, section: dict[str, ModuleFactors]) -> dict[str, tuple]:
    """layer name -> (layer, pieces), every module resolved and shape-checked."""
    plan: dict[str, tuple[nn.Module, list[LoraPiece]]] = {}
    for module, f in section.items():
        try:
            site: LoraSite = lora_site(expert_module, module)
        except KeyError as e:
            raise LoraError(f"LoRA file {lora.path}, key {f.key()!r}: targets {module!r}, which this Wan expert does "
                            f"not have ({e.args[0]}); is it a LoRA for another model?") from None
        except TypeError as e:
            raise LoraError(f"LoRA file {lora.path}, key {f.key()!r}: {e}; only linear layers take LoRAs here "
                            "(remove the key)") from None
        rank = f.rank
        if f.down is not None and f.down.shape[1] != site.in_features:
            raise LoraError(f"LoRA file {lora.path}, key {f.keys['down']!r}: lora_A has {f.down.shape[1]} input "
                            f"features but {module} has {site.in_features}; is it a LoRA for another model size?")
        rows = f.up.shape[0] if f.up is not None else f.bias.shape[0]
        if rows != site.rows:
            key = f.keys.get("up") or f.keys.get("bias")
            raise LoraError(f"LoRA file {lora.path}, key {key!r}: has {rows} outputs but {module} has {site.rows}; "
                            "is it a LoRA for another model size?")
        down = f.down if f.down is not None else f.bias.new_zeros(0, site.in_features)
        up = f.up if f.up is not None else f.bias.new_zeros(rows, rank)
        entry = plan.setdefault(site.layer_name, (site.layer, []))
        entry[1].append(LoraPiece(site.row0, down, up, f.bias))
    return plan


# ---------------------------------------------------------------------------------------
# public
def load_lora(pipe, path: str | Path, strength: float = 1.0, expert: str = "both", name: str | None = None,
              replace: bool = False) -> str:
    """Load the LoRA at ``path`` into ``expert`` (see the module docstring) at ``strength``; returns its name.

    ``name`` defaults to the file's stem. A name already loaded is an error unless
    ``replace`` (then the old one is unloaded once the new file has been read and checked):
    loading under a fixed name with ``replace=True`` is the cheap way to switch LoRAs, each
    fast-path branch is re-prepared once.
    """
    lora = read_lora(path)
    name = name or lora.path.stem
    loaded = {n for recs in _registries(pipe).values() for n in recs}
    if name in loaded and not replace:
        raise ValueError(f"a LoRA named {name!r} is loaded already; unload it, pass another name, or replace=True")
    targets = _targets(pipe, lora, expert)
    experts = _experts(pipe)
    plans = {attr: _plan(experts[attr], lora, section) for attr, section in targets.items()}
    touched = _unload(pipe, [name]) if name in loaded else []
    for attr, plan in plans.items():
        rec = LoraRecord(name, str(lora.path), lora.style, float(strength), lora.rank)
        for layer_name, (layer, pieces) in plan.items():
            _set(layer, name, tuple(pieces), float(strength))
            rec.layers[layer_name] = layer
        experts[attr].__dict__.setdefault(REGISTRY_ATTR, {})[name] = rec
        touched.extend(rec.layers.values())
        _changed(experts[attr])
        log.info("LoRA %r (%s, %s keys, rank %d) on %s: %s", name, lora.path, lora.style, lora.rank, attr, rec.counts())
    _prepare(touched)
    return name


def _registries(pipe) -> dict[str, dict[str, LoraRecord]]:
    return {attr: module.__dict__.get(REGISTRY_ATTR, {}) for attr, module in _experts(pipe).items()}


def _check_names(pipe, names) -> None:
    loaded = {n for recs in _registries(pipe).values() for n in recs}
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise KeyError(f"no LoRA named {unknown[0]!r} is loaded (loaded: {sorted(loaded)})")


def set_lora_strengths(pipe, strengths: dict[str, float]) -> None:
    """Set the strength of loaded LoRAs by name (0 turns one off without unloading it)."""
    _check_names(pipe, strengths)
    touched = []
    for attr, recs in _registries(pipe).items():
        for name, s in strengths.items():
            rec = recs.get(name)
            if rec is None:
                continue
            rec.strength = float(s)
            for layer in rec.layers.values():
                _set_strength(layer, name, float(s))
                touched.append(layer)
            _changed(_experts(pipe)[attr])
    _prepare(touched)


def _unload(pipe, names: list[str] | None) -> list[nn.Module]:
    """Remove LoRAs without preparing the layers; returns the layers touched."""
    touched: list[nn.Module] = []
    experts = _experts(pipe)
    for attr, recs in _registries(pipe).items():
        for name in list(recs if names is None else [n for n in names if n in recs]):
            rec = recs.pop(name)
            for layer in rec.layers.values():
                _remove(layer, name)
                touched.append(layer)
        _changed(experts[attr])
    return touched


def unload_loras(pipe, names: list[str] | None = None) -> list[str]:
    """Remove LoRAs by name (all when ``names`` is None); returns the names removed."""
    if names is not None:
        _check_names(pipe, names)
    loaded = [n for recs in _registries(pipe).values() for n in recs]
    removed = list(dict.fromkeys(n for n in loaded if names is None or n in names))
    _prepare(_unload(pipe, names))
    return removed


def list_loras(pipe) -> list[dict]:
    """One row per loaded LoRA: name, path, key style, strength, rank and, per expert, layers touched."""
    rows: dict[str, dict] = {}
    for attr, recs in _registries(pipe).items():
        for name, rec in recs.items():
            row = rows.setdefault(name, {"name": name, "path": rec.path, "style": rec.style, "strength": rec.strength,
                                         "rank": rec.rank, "experts": {}})
            row["experts"][attr] = rec.counts()
    return list(rows.values())
