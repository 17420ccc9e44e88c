"""Symmetric INT4 with one bf16 scale per group (SVDQuant's format, DESIGN.md section 3).

Elements are integers in ``[-qmax, qmax]`` (``qmax`` 7), or ``[-8, 7]`` with ``qmax`` 8:
the nibble's positive side stops at 7. Codes are the two's complement nibble. Scales
are ``bfloat16`` steps ``amax / qmax``; values are quantized against the *stored* (bf16)
step so that dequantization agrees exactly. There is no exponent, so the only valid
``exp_offset`` is 0.

Arbitrary 16-bit group scales do not fold into per-row FP8 scales: INT4 runs on the
reference path (DESIGN.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from wanquant.formats.base import GroupFormat


def _nibbles(levels: torch.Tensor) -> torch.Tensor:
    """Integer levels (float) as two's complement nibbles (uint8)."""
    return (levels.to(torch.int16) & 0xF).to(torch.uint8)


def _safe(step: torch.Tensor) -> torch.Tensor:
    """Zero steps (all-zero groups) replaced by 1 so that dividing by them is harmless."""
    return torch.where(step > 0, step, torch.ones_like(step))


@dataclass(frozen=True)
class INT4Format(GroupFormat):
    """Symmetric INT4, standard group of 64 (4.25 bits per element)."""

    name: ClassVar[str] = "int4"
    scale_dtype: ClassVar[torch.dtype] = torch.bfloat16
    scale_bits: ClassVar[int] = 16

    group_size: int = 64
    qmax: int = 7  # range [-7, 7]; 8 gives [-8, 7]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qmax not in (7, 8):
            raise ValueError("qmax must be 7 (range [-7, 7]) or 8 (range [-8, 7])")

    def _levels(self, values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return torch.round(values / _safe(step)).clamp(-self.qmax, min(self.qmax, 7))

    def encode_groups(self, xg: torch.Tensor, clip_ratio: float, exp_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale, step = self.group_scale(xg.abs().amax(dim=-1) * clip_ratio)
        step = step.unsqueeze(-1)
        q = self._levels(xg, step)
        q = torch.where(step > 0, q, torch.zeros_like(q))
        return _nibbles(q), scale

    def decode_groups(self, cg: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        signed = cg.to(torch.int16)
        signed = torch.where(signed >= 8, signed - 16, signed).to(torch.float32)
        return signed * scales.to(torch.float32).unsqueeze(-1)

    def group_scale(self, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = (amax / self.qmax).to(torch.bfloat16)
        return s, s.float()

    def round_to_step(self, values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return self._levels(values, step) * step

    def codes_at_step(self, values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return _nibbles(torch.round(values / _safe(step)))
