"""4-bit number formats: OCP MXFP4 (E2M1 + E8M0) and symmetric INT4.

A format is data (:class:`QuantFormat`); every function here takes one. Tensors are
quantized along their last dimension (K, the GEMM reduction dimension) in groups of
``fmt.group_size`` consecutive elements.

Codes are unpacked 4-bit values held in ``uint8`` (0..15):

* ``mxfp4``: bit 3 is the sign, bits 0-2 index the E2M1 magnitudes
  ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``. Scales are E8M0 exponents stored biased by 127 in
  ``uint8``; the group scale is ``2 ** (code - 127)``.
* ``int4``: two's complement nibble of an integer in ``[-qmax, qmax]``. Scales are
  ``bfloat16`` numbers (the group's step size).

``clip_ratio`` multiplies a group's absolute maximum before its scale is derived (values
beyond the clipped range saturate); ``exp_offset`` shifts an MX exponent by whole
powers of two. Both are what the activation clip search calibrates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

FormatName = Literal["mxfp4", "int4"]
ScaleRule = Literal["ocp_floor", "safe_ceil"]

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Decision points between neighbouring E2M1 magnitudes; a value exactly on one goes to
# the neighbour with an even code (ties to even).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest E2M1 binade (4 and 6 lie in [2^2, 2^3))
E8M0_BIAS = 127
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127


@dataclass(frozen=True)
class QuantFormat:
    """A 4-bit format: what the elements are and how a group's scale is chosen."""

    name: FormatName
    group_size: int
    scale_rule: ScaleRule = "ocp_floor"  # MX only
    int_qmax: int = 7  # int4 only: symmetric range [-int_qmax, int_qmax]

    def __post_init__(self) -> None:
        if self.name not in ("mxfp4", "int4"):
            raise ValueError(f"unknown format {self.name!r}; use 'mxfp4' or 'int4'")
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"group_size must be a positive even number, got {self.group_size}")
        if self.scale_rule not in ("ocp_floor", "safe_ceil"):
            raise ValueError(f"unknown scale_rule {self.scale_rule!r}; use 'ocp_floor' or 'safe_ceil'")
        if self.int_qmax not in (7, 8):
            raise ValueError("int_qmax must be 7 (range [-7, 7]) or 8 (range [-8, 7])")

    @property
    def is_mx(self) -> bool:
        return self.name == "mxfp4"

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.uint8 if self.is_mx else torch.bfloat16

    @property
    def bits_per_element(self) -> float:
        """Storage cost including the group scale (4.25 for MXFP4 g32)."""
        return 4.0 + (8.0 if self.is_mx else 16.0) / self.group_size


def make_format(name: FormatName, group_size: int | None = None, scale_rule: ScaleRule = "ocp_floor") -> QuantFormat:
    """The format by name with its standard group size (32 for MXFP4, 64 for INT4)."""
    if group_size is None:
        group_size = 32 if name == "mxfp4" else 64
    return QuantFormat(name=name, group_size=group_size, scale_rule=scale_rule)


MXFP4 = make_format("mxfp4")
INT4 = make_format("int4")


class Quantized(NamedTuple):
    """Unpacked codes ``[..., K]`` (uint8, 0..15) and group scales ``[..., K / g]``."""

    codes: torch.Tensor
    scales: torch.Tensor


def check_quantizable(x: torch.Tensor, fmt: QuantFormat, what: str = "tensor") -> None:
    """Raise a clear error for inputs that would quantize to garbage."""
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{what} must have at least one dimension")
    k = x.shape[-1]
    if k % fmt.group_size:
        raise ValueError(
            f"{what}: last dimension {k} is not divisible by the group size {fmt.group_size}; "
            f"pad K to a multiple of {fmt.group_size} or keep this layer in 16-bit"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or Inf; check the source weights or calibration data")


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


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
    """Nearest E2M1 magnitude of non-negative fp32 ``mag``, ties to even, saturating at 6.

    E2M1 magnitudes are evenly spaced within each binade: steps of 0.5 below 2, 1 in
    [2, 4), 2 from 4. Rounding ``mag / step`` half-to-even (``torch.round``) lands on the
    even code at every tie, because within a binade even codes are even multiples of the
    step; ties on a binade edge (1.75, 3.5) round up into the next binade's even code.
    """
    step = torch.where(mag < 2.0, 0.5, torch.where(mag < 4.0, 1.0, 2.0))
    return (torch.round(mag / step) * step).clamp(max=E2M1_MAX)


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


def quantize(
    x: torch.Tensor, fmt: QuantFormat, clip_ratio: float = 1.0, exp_offset: int = 0
) -> Quantized:
    """Quantize ``x`` along its last dimension. Returns unpacked codes and group scales."""
    check_quantizable(x, fmt)
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    xg = _grouped(x.to(torch.float32), fmt.group_size)
    amax = xg.abs().amax(dim=-1)
    if fmt.is_mx:
        e = mx_group_exponents(amax, fmt.scale_rule, clip_ratio, exp_offset)
        v = torch.ldexp(xg, (-e).to(torch.float32).unsqueeze(-1))
        codes = e2m1_round(v)
        scales = (e + E8M0_BIAS).to(torch.uint8)
    else:
        if exp_offset != 0:
            raise ValueError("exp_offset applies to MX formats only; use exp_offset=0 with int4")
        qmax = fmt.int_qmax
        # The scale is stored in bf16; quantize with the stored value so dequantize agrees.
        scale = (amax * clip_ratio / qmax).to(torch.bfloat16).to(torch.float32)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        # With qmax 8 the positive side stops at 7 (the nibble's range).
        q = torch.round(xg / safe.unsqueeze(-1)).clamp(-qmax, min(qmax, 7))
        q = torch.where(scale.unsqueeze(-1) > 0, q, torch.zeros_like(q))
        codes = (q.to(torch.int16) & 0xF).to(torch.uint8)
        scales = scale.to(torch.bfloat16)
    return Quantized(codes.reshape(x.shape), scales)


def dequantize(q: Quantized, fmt: QuantFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes and scales back to values (computed in fp32, returned as ``dtype``)."""
    codes, scales = q
    cg = _grouped(codes, fmt.group_size)
    if fmt.is_mx:
        vals = e2m1_decode(cg)
        e = scales.to(torch.int32) - E8M0_BIAS
        out = torch.ldexp(vals, e.to(torch.float32).unsqueeze(-1))
    else:
        signed = cg.to(torch.int16)
        signed = torch.where(signed >= 8, signed - 16, signed).to(torch.float32)
        out = signed * scales.to(torch.float32).unsqueeze(-1)
    return out.reshape(codes.shape).to(dtype)


def fake_quantize(
    x: torch.Tensor, fmt: QuantFormat, clip_ratio: float = 1.0, exp_offset: int = 0
) -> torch.Tensor:
    """Quantize-dequantize ``x``; returns a tensor of ``x``'s dtype and shape.

    Equal to ``dequantize(quantize(x))``; the MX case skips the codes (it sits in the
    inner loop of every search).
    """
    if not fmt.is_mx:
        return dequantize(quantize(x, fmt, clip_ratio, exp_offset), fmt, dtype=x.dtype)
    check_quantizable(x, fmt)
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    xg = _grouped(x.to(torch.float32), fmt.group_size)
    e = mx_group_exponents(xg.abs().amax(dim=-1), fmt.scale_rule, clip_ratio, exp_offset)
    e = e.to(torch.float32).unsqueeze(-1)
    mag = _e2m1_round_values(torch.ldexp(xg.abs(), -e))
    out = torch.ldexp(torch.copysign(mag, xg), e)
    return out.reshape(x.shape).to(x.dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``[..., K]`` into bytes ``[..., K/2]``: element 2i in the low nibble."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of codes ({codes.shape[-1]})")
    if (codes > 15).any():
        raise ValueError("codes must be 4-bit values (0..15)")
    lo = codes[..., 0::2]
    hi = codes[..., 1::2]
    return (lo | (hi << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
