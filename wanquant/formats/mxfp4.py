"""OCP MXFP4: E2M1 elements with one E8M0 (power-of-two) scale per group (DESIGN.md section 3).

Codes: bit 3 is the sign, bits 0-2 index the E2M1 magnitudes ``{0, 0.5, 1, 1.5, 2, 3, 4,
6}``; rounding is to nearest with ties to even, saturating at 6. Scales are E8M0
exponents stored biased by 127 in ``uint8``; the group scale is ``2 ** (code - 127)``.

Scale rules: ``ocp_floor`` (exponent ``floor(log2(amax)) - 2``, the OCP rule; values in
``(6, 8) * 2^e`` saturate) and ``safe_ceil`` (the smallest exponent with
``amax <= 6 * 2^e``: nothing saturates). ``exp_offset`` shifts the exponent.

The E2M1/E8M0 helpers here are also what the Hopper kernels' references are built on
(:mod:`wanquant.kernels.act_quant`, :mod:`wanquant.kernels.weight_prep`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from wanquant.formats.base import GroupFormat

ScaleRule = Literal["ocp_floor", "safe_ceil"]
SCALE_RULES: tuple[str, ...] = ("ocp_floor", "safe_ceil")

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Decision points between neighbouring E2M1 magnitudes; a value exactly on one goes to
# the neighbour with an even code (ties to even).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest E2M1 binade (4 and 6 lie in [2^2, 2^3))
E8M0_BIAS = 127
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2(x))`` for positive finite fp32 ``x`` (int32); -127 for zero.

    Read from the float's bits, as the kernels do, so reference and kernel agree
    bit for bit (subnormals report -127, which the E8M0 clamp absorbs).
    """
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return ((bits >> 23) & 0xFF) - 127


def mx_group_exponents(
    amax: torch.Tensor, scale_rule: ScaleRule, clip_ratio: float = 1.0, exp_offset: int = 0
) -> torch.Tensor:
    """E8M0 exponents (int32, unbiased) for groups with absolute maxima ``amax`` (fp32).

    ``ocp_floor``: ``floor(log2(amax)) - 2`` (the OCP rule; values in ``(6, 8) * 2^e``
    saturate). ``safe_ceil``: the smallest ``e`` with ``amax <= 6 * 2^e``.
    """
    a = amax.to(torch.float32) * clip_ratio
    e = floor_log2(a) - E2M1_EMAX
    if scale_rule == "safe_ceil":
        e = e + (a > torch.ldexp(torch.full_like(a, E2M1_MAX), e.to(torch.float32))).to(torch.int32)
    e = e + exp_offset
    return e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def _e2m1_round_values(mag: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 magnitude of non-negative ``mag``, ties to even, saturating at 6.

    E2M1 magnitudes are evenly spaced within each binade: steps of 0.5 below 2, 1 in
    [2, 4), 2 from 4. Rounding ``mag / step`` half-to-even (``torch.round``) lands on the
    even code at every tie, because within a binade even codes are even multiples of the
    step; ties on a binade edge (1.75, 3.5) round up into the next binade's even code.
    """
    step = torch.where(mag < 2.0, 0.5, torch.where(mag < 4.0, 1.0, 2.0))
    return (torch.round(mag / step) * step).clamp(max=E2M1_MAX)


def e2m1_nearest(v: torch.Tensor) -> torch.Tensor:
    """The E2M1 value nearest to ``v`` (ties to even, saturating), without going through codes."""
    return torch.copysign(_e2m1_round_values(v.abs()), v)


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to E2M1 codes (uint8), nearest with ties to even, saturating at 6."""
    q = _e2m1_round_values(v.abs().to(torch.float32))
    # value -> code: 0..1.5 -> 0..3, 2..3 -> 4..5, 4 -> 6, 6 -> 7
    idx = torch.where(q < 2.0, q * 2.0, torch.where(q < 4.0, q + 2.0, q * 0.5 + 4.0)).to(torch.uint8)
    sign = ((v < 0) & (idx > 0)).to(torch.uint8)  # -0 encodes as +0
    return idx + sign * 8


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) to fp32 values."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    mag = table[c & 7]
    return torch.where(c >= 8, -mag, mag)


@dataclass(frozen=True)
class MXFP4Format(GroupFormat):
    """OCP MXFP4 with the standard group of 32 (4.25 bits per element) and a scale rule."""

    name: ClassVar[str] = "mxfp4"
    scale_dtype: ClassVar[torch.dtype] = torch.uint8
    scale_bits: ClassVar[int] = 8

    group_size: int = 32
    scale_rule: ScaleRule = "ocp_floor"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"unknown scale_rule {self.scale_rule!r}; use one of {SCALE_RULES}")

    def accepts_exp_offset(self, exp_offset: int) -> bool:
        return True

    def encode_groups(self, xg: torch.Tensor, clip_ratio: float, exp_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        e = mx_group_exponents(xg.abs().amax(dim=-1), self.scale_rule, clip_ratio, exp_offset)
        codes = e2m1_round(torch.ldexp(xg, (-e).to(torch.float32).unsqueeze(-1)))
        return codes, (e + E8M0_BIAS).to(torch.uint8)

    def decode_groups(self, cg: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        e = scales.to(torch.int32) - E8M0_BIAS
        return torch.ldexp(e2m1_decode(cg), e.to(torch.float32).unsqueeze(-1))

    def fake_quantize(self, x: torch.Tensor, clip_ratio: float = 1.0, exp_offset: int = 0) -> torch.Tensor:
        # Skips the codes: same values as dequantize(quantize(x)), faster in search loops.
        self.check_quantizable(x)
        self.check_settings(clip_ratio, exp_offset)
        xg = self.grouped(x.to(torch.float32))
        e = mx_group_exponents(xg.abs().amax(dim=-1), self.scale_rule, clip_ratio, exp_offset)
        e = e.to(torch.float32).unsqueeze(-1)
        mag = _e2m1_round_values(torch.ldexp(xg.abs(), -e))
        return torch.ldexp(torch.copysign(mag, xg), e).reshape(x.shape).to(x.dtype)

    def group_scale(self, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = mx_group_exponents(amax, self.scale_rule)
        return (e + E8M0_BIAS).to(torch.uint8), torch.exp2(e.float())

    def round_to_step(self, values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return e2m1_nearest(values * (1.0 / step)) * step  # powers of two: exact

    def codes_at_step(self, values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return e2m1_round(values * (1.0 / step))
