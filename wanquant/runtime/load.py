"""Loading a quantized checkpoint into a diffusers Wan pipeline.

Experts are rebuilt from the checkpoint alone (config + quantized layers + 16-bit rest),
with parameters created on the meta device, so a quantized expert never exists in BF16
in memory. The pipeline's own experts, if loaded, are used only to check that the
checkpoint was made from the same model, and are then replaced.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from wanquant.artifacts.checkpoint import CheckpointError, fingerprint_module, load_expert_files, read_manifest
from wanquant.config import QuantConfig
from wanquant.model.wan import attach_runtime, experts_of, install_layer
from wanquant.runtime.linear import Backend, W4A4Linear
from wanquant.runtime.state import ExpertState, TimestepBins

log = logging.getLogger(__name__)

# Config keys that must agree between a checkpoint and the pipeline's expert.
_ARCH_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "in_channels",
              "out_channels", "text_dim", "patch_size", "image_dim")


# Non-persistent buffers (rotary tables) are saved too, under this prefix, so a reloaded
# expert computes exactly what the in-memory one did, whatever dtype the user cast them to.
BUFFER_PREFIX = "__buffer__."


def export_rest(model: nn.Module, layer_names) -> dict[str, torch.Tensor]:
    """Everything of an expert that is not a quantized layer: parameters and buffers."""
    names = tuple(n + "." for n in layer_names)
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(names)}
    persistent = set(rest)
    for k, v in model.named_buffers():
        if k not in persistent and not k.startswith(names) and v is not None:
            rest[BUFFER_PREFIX + k] = v
    return rest


def _restore_buffers(model: nn.Module, rest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    plain = {}
    for k, v in rest.items():
        if k.startswith(BUFFER_PREFIX):
            path, _, attr = k[len(BUFFER_PREFIX):].rpartition(".")
            owner = model.get_submodule(path) if path else model
            owner._buffers[attr] = v
        else:
            plain[k] = v
    return plain


def quantized_layers(model: nn.Module) -> dict[str, W4A4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, W4A4Linear)}


def bind_expert(model: nn.Module, bins: TimestepBins) -> ExpertState:
    """Give every quantized layer of an expert one shared state and hook the forward."""
    state = ExpertState(bins)
    for layer in quantized_layers(model).values():
        layer.bind_state(state)
    attach_runtime(model, state)
    model._wanquant_state = state
    return state


def set_backend(model: nn.Module, backend: Backend) -> None:
    for layer in quantized_layers(model).values():
        layer.set_backend(backend)


def build_quantized_expert(qdir: str | Path, attr: str, manifest: dict, device: torch.device | str = "cpu",
                           backend: Backend = "auto") -> nn.Module:
    """Rebuild one expert from the checkpoint, on ``device``."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    cfg = QuantConfig.from_dict(manifest["config"])
    layers, rest, config = load_expert_files(qdir, attr, manifest)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel.from_config(config)
    for name, params in layers.items():
        layer = W4A4Linear.from_params(params, cfg.wfmt, cfg.afmt)
        install_layer(model, name, layer)
    rest = _restore_buffers(model, rest)
    expected = {k for k, v in model.state_dict().items()}
    quant_keys = {k for k in expected if any(k.startswith(n + ".") for n in layers)}
    missing = sorted(expected - quant_keys - set(rest))
    unexpected = sorted(set(rest) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{qdir}/{attr} does not match the expert's architecture: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}; re-quantize with this wanquant")
    # Fresh allocations: tensors straight from the file are views into one mapping at
    # arbitrary offsets, and CPU GEMMs round differently on unaligned memory.
    model.load_state_dict({k: v.clone() for k, v in rest.items()}, strict=False, assign=True)
    model.to(device)
    for layer in quantized_layers(model).values():
        layer.refresh()
    set_backend(model, backend)
    bind_expert(model, TimestepBins.from_dict(manifest["experts"][attr]["timestep_bins"]))
    model.eval()
    return model


def check_compatible(pipe, manifest: dict, qdir: str | Path, allow_mismatch: bool = False) -> None:
    """Refuse a checkpoint made for another model or another expert layout."""
    roles = {e.attr: e.role for e in experts_of(pipe)} if getattr(pipe, "transformer", None) is not None else None
    for attr, info in manifest["experts"].items():
        if roles is not None and attr not in roles:
            raise CheckpointError(f"{qdir} has expert {attr!r} but the pipeline has no such expert "
                                  f"(it has {sorted(roles)}); use the pipeline the checkpoint was made for")
        if roles is not None and roles[attr] != info["role"]:
            raise CheckpointError(f"{qdir}: expert {attr} was quantized as the {info['role']!r} expert but the "
                                  f"pipeline runs it as {roles[attr]!r}; check the pipeline's boundary_ratio")
        ck_config = _read_config(qdir, attr)
        _check_components(pipe, ck_config, qdir)
        existing = getattr(pipe, attr, None)
        if existing is None:
            continue
        diffs = {k: (ck_config.get(k), existing.config.get(k)) for k in _ARCH_KEYS
                 if _norm(ck_config.get(k)) != _norm(existing.config.get(k))}
        if diffs:
            raise CheckpointError(f"{qdir} was made for another model: {attr} config differs in "
                                  + ", ".join(f"{k} (checkpoint {a}, pipeline {b})" for k, (a, b) in diffs.items()))
        if quantized_layers(existing) or next(existing.parameters()).device.type == "meta":
            continue
        fp = fingerprint_module(existing)
        if fp != info["source_fingerprint"] and not allow_mismatch:
            raise CheckpointError(
                f"{qdir} was quantized from different {attr} weights (fingerprint {info['source_fingerprint']}, "
                f"pipeline {fp}); load the base model it was made from, or pass allow_mismatch=True "
                "(--allow-mismatch) if you know the weights are equivalent")


def _check_components(pipe, ck_config: dict, qdir) -> None:
    """Without the 16-bit experts, check the text encoder and VAE fit the checkpoint."""
    te, vae = getattr(pipe, "text_encoder", None), getattr(pipe, "vae", None)
    d_model = getattr(getattr(te, "config", None), "d_model", None)
    if d_model is not None and d_model != ck_config.get("text_dim"):
        raise CheckpointError(f"{qdir} was made for another model: its experts read text_dim "
                              f"{ck_config.get('text_dim')} but the pipeline's text encoder gives {d_model}")
    z = getattr(getattr(vae, "config", None), "z_dim", None)
    if z is not None and ck_config.get("out_channels") not in (None, z):
        raise CheckpointError(f"{qdir} was made for another model: its experts predict "
                              f"{ck_config.get('out_channels')} latent channels but the pipeline's VAE has {z}")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _read_config(qdir, attr) -> dict:
    import json

    config = json.loads((Path(qdir) / attr / "config.json").read_text())
    config.pop("quantization_config", None)
    return config


def load_quantized(pipe, qdir: str | Path, device: torch.device | str | None = None, backend: Backend = "auto",
                   allow_mismatch: bool = False, verify: bool = True):
    """Replace the pipeline's experts by the quantized ones from ``qdir``; returns ``pipe``."""
    manifest = read_manifest(qdir, verify=verify)
    check_compatible(pipe, manifest, qdir, allow_mismatch)
    if device is None:
        existing = getattr(pipe, "transformer", None)
        device = next(existing.parameters()).device if existing is not None else "cpu"
        if torch.device(device).type == "meta":
            device = "cpu"
    for attr in manifest["experts"]:
        old = getattr(pipe, attr, None)
        if old is not None:
            pipe.register_modules(**{attr: None})  # free the 16-bit expert before building
            del old
        pipe.register_modules(**{attr: build_quantized_expert(qdir, attr, manifest, device, backend)})
    log.info("loaded %s: experts %s on %s", qdir, sorted(manifest["experts"]), device)
    return pipe
