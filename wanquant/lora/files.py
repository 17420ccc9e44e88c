"""Reading a LoRA file into per-module factors, in any of the key styles people have.

A file (``.safetensors``; ``.pt``/``.bin``/``.ckpt`` read with ``weights_only``; or a
directory holding one) becomes a :class:`LoraFile`: per expert section (``transformer``,
``transformer_2``) and per diffusers module name, the factors ``A [r, K]``, ``B [N, r]``
and an optional bias with every scale folded in, so that the module's output gains
``B A x + bias`` at strength 1. Key styles are converted by the model adapter
(:func:`wanquant.model.lora_keys.to_diffusers_keys`, which runs diffusers' converters);
``alpha`` scales come from ``<module>.alpha`` tensors or from the LoRA config a
diffusers/PEFT file carries (safetensors metadata ``lora_adapter_metadata``, or an
``adapter_config.json`` beside the file): ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA),
as PEFT computes it.

Every problem raises :class:`LoraError` naming the file, the key and what to do.
Nothing here knows the model: whether a module exists and fits is checked when the
LoRA is attached (:mod:`wanquant.lora.apply`).
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanquant.model.lora_keys import KeyConversionError, split_expert, to_diffusers_keys

SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "bias", "alpha": "alpha"}
DIR_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class LoraError(ValueError):
    """A LoRA file that cannot be used; the message names the file and the key."""


@dataclass
class ModuleFactors:
    """One module's LoRA with every scale folded in: ``y += up @ (down @ x) + bias``."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    keys: dict[str, str] = field(default_factory=dict)  # role -> the key it came from (for errors)

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    def key(self) -> str:
        return self.keys.get("down") or self.keys.get("up") or self.keys.get("bias") or "?"


@dataclass
class LoraFile:
    path: Path
    style: str  # diffusers | peft | wan | kohya (wanquant.model.lora_keys.key_style)
    sections: dict[str, dict[str, ModuleFactors]]  # expert prefix -> diffusers module name -> factors

    @property
    def rank(self) -> int:
        return max((f.rank for sec in self.sections.values() for f in sec.values()), default=0)


def _err(path, key: str | None, problem: str, fix: str) -> LoraError:
    where = f"LoRA file {path}" + (f", key {key!r}" if key else "")
    return LoraError(f"{where}: {problem}; {fix}")


def resolve_path(path: str | Path) -> Path:
    """The weights file of ``path`` (a file, or a directory holding one LoRA file)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"LoRA file {p} does not exist")
    if p.is_dir():
        for name in DIR_NAMES:
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise _err(p, None, f"is a directory with {len(found)} .safetensors files",
                   "pass the LoRA file itself")
    return p


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(tensors on the CPU, LoRA config or None)`` of one file."""
    if path.suffix == ".safetensors" or path.suffix not in PICKLE_SUFFIXES:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError, ValueError) as e:
            raise _err(path, None, f"cannot be read as safetensors ({e})",
                       "check the download (a truncated or corrupt file), or pass a .pt/.bin file by its suffix")
        config = None
        raw = meta.get("lora_adapter_metadata")
        if raw:
            try:
                config = json.loads(raw)
            except json.JSONDecodeError as e:
                raise _err(path, "__metadata__.lora_adapter_metadata", f"is not JSON ({e})",
                           "re-save the LoRA with diffusers' save_lora_weights") from None
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            raise _err(path, None, f"cannot be read as a torch checkpoint ({type(e).__name__}: {e})",
                       "check the download, or convert the LoRA to .safetensors") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise _err(path, None, "does not hold a flat {name: tensor} dict", "pass a LoRA state dict file")
        tensors, config = dict(obj), None
    adapter_config = path.parent / "adapter_config.json"
    if config is None and adapter_config.is_file():  # PEFT's save_pretrained layout
        try:
            config = json.loads(adapter_config.read_text())
        except json.JSONDecodeError as e:
            raise _err(adapter_config, None, f"is not JSON ({e})", "fix or remove it") from None
    if not tensors:
        raise _err(path, None, "holds no tensors", "pass a LoRA file")
    return tensors, config


def _config_for(config: dict | None, prefix: str) -> dict | None:
    """The LoRA config of one expert section: diffusers prefixes its keys (``transformer.r``)."""
    if not config:
        return None
    own = {k[len(prefix) + 1:]: v for k, v in config.items() if k.startswith(prefix + ".")}
    return own or config


def _pattern_value(patterns: dict, module: str):
    """PEFT's rank/alpha pattern lookup: ``^``-anchored regexes, else a suffix match on module names."""
    for key, value in (patterns or {}).items():
        regex = key + r"$" if key.startswith("^") else rf"(.*\.)?({key})$"
        if re.match(regex, module):
            return value
    return None


def _config_scale(config: dict | None, module: str, rank: int) -> float:
    """PEFT's scaling ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``) of one module; 1 without a config."""
    if not config or "lora_alpha" not in config or rank == 0:
        return 1.0
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    alpha = float(config["lora_alpha"] if alpha is None else alpha)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def parse_lora(path: str | Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> LoraFile:
    """:class:`LoraFile` from a file's tensors (``path`` only names it in errors)."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise _err(path, key, f"has dtype {t.dtype}", "LoRA tensors must be floating point")
        if not torch.isfinite(t).all():
            raise _err(path, key, "contains NaN or Inf", "the file is damaged; get it again")
    try:
        converted, style = to_diffusers_keys(tensors)
    except KeyConversionError as e:
        raise _err(path, e.key, f"is not a Wan LoRA in a known key style: {e}",
                   "wanquant reads diffusers/PEFT, original Wan, ComfyUI and Kohya/musubi Wan LoRAs") from None
    sections: dict[str, dict[str, ModuleFactors]] = {}
    alphas: dict[tuple[str, str], tuple[str, float]] = {}
    for key, t in converted.items():
        try:
            prefix, rest = split_expert(key)
        except KeyError:
            raise _err(path, key, "is not a transformer LoRA key",
                       "text-encoder LoRAs are not supported; remove those keys") from None
        role = next((r for suf, r in SUFFIXES.items() if rest.endswith("." + suf)), None)
        if role is None:
            raise _err(path, key, "is not a LoRA tensor (expected <module>.lora_A.weight, .lora_B.weight, "
                       ".lora_B.bias or .alpha)", "remove the key or convert the file with its trainer")
        module = rest[: -len(next(s for s, r in SUFFIXES.items() if r == role)) - 1]
        if role == "alpha":
            alphas[(prefix, module)] = (key, float(t.float().reshape(-1)[0]))
            continue
        f = sections.setdefault(prefix, {}).setdefault(module, ModuleFactors())
        setattr(f, role, t)
        f.keys[role] = key
    for prefix, modules in sections.items():
        cfg = _config_for(config, prefix)
        for module, f in modules.items():
            _check_factors(path, f)
            if f.down is None:
                continue
            scale = _config_scale(cfg, module, f.rank)
            if (prefix, module) in alphas:
                scale = alphas.pop((prefix, module))[1] / f.rank
            if scale != 1.0:
                f.down = f.down.float() * scale  # fp32: no second rounding of the file's values
    if alphas:
        (prefix, module), (key, _) = next(iter(alphas.items()))
        raise _err(path, key, f"is an alpha for module {module!r} which has no lora_A/lora_B",
                   "the file is incomplete")
    if not sections:
        raise _err(path, None, "holds no LoRA tensors", "pass a LoRA file")
    return LoraFile(Path(path), style, sections)


def _check_factors(path, f: ModuleFactors) -> None:
    if (f.down is None) != (f.up is None):
        have, miss = ("lora_A", "lora_B") if f.down is not None else ("lora_B", "lora_A")
        raise _err(path, f.key(), f"has {have} but no {miss} for this module", "the file is incomplete")
    if f.down is not None:
        if f.down.ndim != 2:
            raise _err(path, f.keys["down"], f"has shape {tuple(f.down.shape)}, expected [rank, in_features]",
                       "only linear LoRAs are supported")
        if f.up.ndim != 2:
            raise _err(path, f.keys["up"], f"has shape {tuple(f.up.shape)}, expected [out_features, rank]",
                       "only linear LoRAs are supported")
        if f.up.shape[1] != f.down.shape[0]:
            raise _err(path, f.keys["up"], f"has rank {f.up.shape[1]} but {f.keys['down']!r} has rank "
                       f"{f.down.shape[0]}", "the file is damaged or mixes two LoRAs")
    if f.bias is not None:
        rows = f.up.shape[0] if f.up is not None else f.bias.shape[0]
        if f.bias.ndim != 1 or f.bias.shape[0] != rows:
            raise _err(path, f.keys["bias"], f"has shape {tuple(f.bias.shape)}, expected ({rows},)",
                       "the file is damaged")


def read_lora(path: str | Path) -> LoraFile:
    """Read and convert one LoRA file (see the module docstring)."""
    p = resolve_path(path)
    tensors, config = read_tensors(p)
    return parse_lora(p, tensors, config)
