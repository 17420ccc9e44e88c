"""Wan LoRA key styles -> diffusers module names, through diffusers' own converters.

Part of the model adapter: the only place that knows how LoRA files for Wan name their
tensors. People have LoRAs in four forms:

* diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (PEFT saves
  ``base_model.model.blocks...``; some trainers omit the prefix);
* original Wan (lightx2v, Wan's trainers) and ComfyUI: ``diffusion_model.blocks.0.self_attn.q.
  lora_A.weight`` or ``.lora_down.weight`` / ``.lora_up.weight`` with ``.alpha``, ``.diff_b``;
* Kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` with ``.alpha``.

:func:`to_diffusers_keys` dispatches exactly as diffusers'
``WanLoraLoaderMixin.lora_state_dict`` does (it is called on the in-memory dict, so
diffusers' converters do the renaming, fold ``alpha / rank`` into the factors and turn
``diff_b`` into ``lora_B.bias``) and returns keys
``<expert>.<module>.lora_A.weight`` / ``lora_B.weight`` / ``lora_B.bias`` (``<expert>`` is
``transformer`` or ``transformer_2``), plus any ``<module>.alpha`` the file carries in
diffusers form (scaled by :mod:`wanquant.lora.files`).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

EXPERT_PREFIXES = ("transformer", "transformer_2")
PEFT_PREFIX = "base_model.model."


def key_style(keys) -> str:
    """``"wan"`` (original Wan / ComfyUI), ``"kohya"``, ``"peft"`` or ``"diffusers"``, as diffusers dispatches."""
    keys = list(keys)
    if any(k.startswith("diffusion_model.") for k in keys):
        return "wan"
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    return "diffusers"


class KeyConversionError(ValueError):
    """diffusers' converter refused the file; ``key`` names the tensor it stopped at, if known."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def to_diffusers_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict with diffusers keys, style)`` for a Wan LoRA in any of the supported key styles."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    style = key_style(state_dict)
    sd = dict(state_dict)
    # ComfyUI writes some files with a "model." wrapper around the original Wan names.
    if style == "wan" and any(k.startswith("model.diffusion_model.") for k in sd):
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    if style == "wan":
        sd = _fold_alphas(sd)
    if style in ("wan", "kohya"):
        others = sorted(k for k in sd if not k.startswith(("diffusion_model.", "lora_unet_")))
        if others:
            raise KeyConversionError(f"mixes key styles: {style} keys and e.g. {others[0]!r}", others[0])
        try:
            sd = WanLoraLoaderMixin.lora_state_dict(sd)
        except KeyError as e:  # the converters pop the tensors they expect, without their prefix
            key = (("diffusion_model." if style == "wan" else "lora_unet_") + str(e.args[0])) if e.args else None
            raise KeyConversionError(f"diffusers' {style} converter expected a tensor that is missing: {key!r} "
                                     "(an incomplete or non-Wan LoRA)", key) from None
        except (ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise KeyConversionError(f"diffusers' {style} converter rejected it: {_short(e)}") from None
        return sd, style
    if style == "peft":
        sd = {("transformer." + k.removeprefix(PEFT_PREFIX) if k.startswith(PEFT_PREFIX) else k): v
              for k, v in sd.items()}
    # Trainers that write diffusers module names with kohya-style suffixes.
    sd = {k.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight"): v
          for k, v in sd.items()}
    sd = convert_unet_state_dict_to_peft(sd)  # older diffusers names (.lora.down / .to_q_lora.up ...)
    if any(not k.startswith(tuple(p + "." for p in EXPERT_PREFIXES)) for k in sd):
        # diffusers' loader takes prefix-less keys as the transformer's (PEFT's own files).
        sd = {k if k.startswith(tuple(p + "." for p in EXPERT_PREFIXES)) else "transformer." + k: v
              for k, v in sd.items()}
    # DoRA magnitudes: diffusers drops them with a warning; so do we (lora_state_dict does
    # this for the converted styles).
    dora = [k for k in sd if "dora_scale" in k or "lora_magnitude_vector" in k]
    if dora:
        log.warning("dropping %d DoRA magnitude tensors (e.g. %s): DoRA is not supported, the LoRA part is used",
                    len(dora), dora[0])
        sd = {k: v for k, v in sd.items() if k not in set(dora)}
    return sd, style


def _fold_alphas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``X.alpha`` folded into ``X``'s down factor as ``alpha / rank``, the alpha key dropped.

    diffusers' Wan converter does this for block layers only and rejects an alpha on
    ``head.head`` or ``text_embedding``; folding first gives every module the same rule
    (the converter's split of the scale between the two factors has the same product).
    """
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".alpha")]:
        base = key[: -len(".alpha")]
        down = next((f"{base}.{d}.weight" for d in ("lora_down", "lora_A") if f"{base}.{d}.weight" in sd), None)
        if down is None:
            raise KeyConversionError(f"alpha {key!r} has no lora_down/lora_A beside it", key)
        alpha = float(out.pop(key).float().reshape(-1)[0])
        out[down] = sd[down].float() * (alpha / sd[down].shape[0])
    return out


def split_expert(key: str) -> tuple[str, str]:
    """``(expert prefix, rest)`` of a diffusers LoRA key."""
    head, _, rest = key.partition(".")
    if head not in EXPERT_PREFIXES:
        raise KeyError(key)
    return head, rest


def _short(e: Exception, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + "..."
