"""The interface every 4-bit group-scaled number format implements: :class:`GroupFormat`.

Layering: ``formats`` (this package, torch only) -> ``numerics`` -> ``method`` ->
``kernels`` / ``runtime``. Everything above talks to a format only through this class
(GPTQ takes it as an injected object, the clip search asks it which exponent offsets
mean anything, the kernels' dispatch checks its type); nothing branches on a name.

A format quantizes a tensor along its last dimension (K, the GEMM reduction dimension)
in groups of ``group_size`` consecutive elements: one 4-bit code per element, one scale
per group. Codes are unpacked 4-bit values held in ``uint8`` (0..15);
:mod:`wanquant.formats.packing` puts two in a byte for storage.

``clip_ratio`` multiplies a group's absolute maximum before its scale is derived (values
beyond the clipped range saturate); ``exp_offset`` shifts a power-of-two scale by whole
binades, for formats that have one (:meth:`GroupFormat.accepts_exp_offset`). Both are
what the activation clip search calibrates.

A subclass is a frozen dataclass that sets the class-level ``name``, ``scale_dtype``
and ``scale_bits``, gives ``group_size`` its standard default, and implements the five
abstract methods: two for dynamic quantization (:meth:`~GroupFormat.encode_groups`,
:meth:`~GroupFormat.decode_groups`) and three for static group scales as GPTQ uses
them (:meth:`~GroupFormat.group_scale`, :meth:`~GroupFormat.round_to_step`,
:meth:`~GroupFormat.codes_at_step`).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch


class Quantized(NamedTuple):
    """Unpacked codes ``[..., K]`` (uint8, 0..15) and group scales ``[..., K / g]``."""

    codes: torch.Tensor
    scales: torch.Tensor


@dataclass(frozen=True)
class GroupFormat(abc.ABC):
    """A 4-bit format with one scale per group of ``group_size`` elements along K."""

    name: ClassVar[str]  # the registry key, also written to manifests
    scale_dtype: ClassVar[torch.dtype]  # dtype of the stored group scales
    scale_bits: ClassVar[int]  # storage bits of one group scale

    group_size: int

    def __post_init__(self) -> None:
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"group_size must be a positive even number, got {self.group_size}")

    # ---- what each format defines ---------------------------------------------------
    @abc.abstractmethod
    def encode_groups(self, xg: torch.Tensor, clip_ratio: float, exp_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[..., G, g]`` (uint8) and scales ``[..., G]`` of fp32 groups ``xg [..., G, g]``."""

    @abc.abstractmethod
    def decode_groups(self, cg: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """fp32 values ``[..., G, g]`` of grouped codes ``cg`` with their ``scales [..., G]``."""

    @abc.abstractmethod
    def group_scale(self, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static scale of groups with absolute maxima ``amax``: (stored scale, fp32 step).

        The step is what an element is quantized against: value = level * step.
        """

    @abc.abstractmethod
    def round_to_step(self, values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``values`` with fixed steps (broadcast), as :meth:`quantize` would."""

    @abc.abstractmethod
    def codes_at_step(self, values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Codes (uint8) of ``values`` already on the grid of ``step`` (from :meth:`round_to_step`)."""

    def accepts_exp_offset(self, exp_offset: int) -> bool:
        """Whether ``exp_offset`` means anything here; formats without an exponent take only 0."""
        return exp_offset == 0

    # ---- shared ---------------------------------------------------------------------
    @property
    def bits_per_element(self) -> float:
        """Storage cost including the group scale (4.25 for MXFP4 g32)."""
        return 4.0 + self.scale_bits / self.group_size

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` viewed as ``[..., K / g, g]``."""
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.group_size, self.group_size)

    def check_quantizable(self, x: torch.Tensor, what: str = "tensor") -> None:
        """Raise a clear error for inputs that would quantize to garbage."""
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
        if x.ndim == 0:
            raise ValueError(f"{what} must have at least one dimension")
        k, g = x.shape[-1], self.group_size
        if k % g:
            raise ValueError(f"{what}: last dimension {k} is not divisible by the group size {g}; "
                             f"pad K to a multiple of {g} or keep this layer in 16-bit")
        if not torch.isfinite(x).all():
            raise ValueError(f"{what} contains NaN or Inf; check the source weights or calibration data")

    def check_settings(self, clip_ratio: float, exp_offset: int) -> None:
        """Raise for a clip ratio outside (0, 1] or an exponent offset this format cannot use."""
        if not 0.0 < clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
        if not self.accepts_exp_offset(exp_offset):
            raise ValueError(f"exp_offset {exp_offset} does not apply to {self.name} (no exponent to shift); "
                             "use exp_offset=0")

    def quantize(self, x: torch.Tensor, clip_ratio: float = 1.0, exp_offset: int = 0) -> Quantized:
        """Quantize ``x`` along its last dimension. Returns unpacked codes and group scales."""
        self.check_quantizable(x)
        self.check_settings(clip_ratio, exp_offset)
        codes, scales = self.encode_groups(self.grouped(x.to(torch.float32)), clip_ratio, exp_offset)
        return Quantized(codes.reshape(x.shape), scales)

    def dequantize(self, q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Codes and scales back to values (computed in fp32, returned as ``dtype``)."""
        codes, scales = q
        return self.decode_groups(self.grouped(codes), scales).reshape(codes.shape).to(dtype)

    def fake_quantize(self, x: torch.Tensor, clip_ratio: float = 1.0, exp_offset: int = 0) -> torch.Tensor:
        """Quantize-dequantize ``x``; a tensor of ``x``'s dtype and shape.

        Equal to ``dequantize(quantize(x))``; formats may skip the codes (it sits in the
        inner loop of every search).
        """
        return self.dequantize(self.quantize(x, clip_ratio, exp_offset), dtype=x.dtype)

    # ---- description ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for manifests; :func:`wanquant.formats.format_from_dict` inverts it."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def describe(self) -> str:
        """Short label: name, group size, settings off their default (``mxfp4 g32 scale_rule=safe_ceil``)."""
        extra = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if f.name != "group_size" and getattr(self, f.name) != f.default]
        return " ".join([self.name, f"g{self.group_size}", *extra])
