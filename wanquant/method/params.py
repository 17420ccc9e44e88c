"""The tensors that describe one quantized linear, independent of any kernel.

``y = Wq(Q(x / smooth; clip[bin])) + ((x / smooth) @ l1.T) @ l2.T + bias`` where ``Wq`` is
the 4-bit residual held as packed codes and group scales. This is also the canonical
on-disk layout of a layer (see DESIGN.md section 6); kernels repack it at load time.
Part of the method layer: :func:`wanquant.method.layer.quantize_layer` produces it,
checkpoints store it, the runtime and kernels consume it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from wanquant.formats import GroupFormat, Quantized, unpack_nibbles


@dataclass
class QuantizedLinearParams:
    qweight: torch.Tensor  # uint8 [N, K/2], two codes a byte, element 2i in the low nibble
    wscales: torch.Tensor  # [N, K/g] in the weight format's scale dtype (uint8 E8M0 codes for MX)
    smooth: torch.Tensor  # fp32 [K]; the layer's input is divided by it
    l1: torch.Tensor  # bf16 [r, K] low-rank down projection (r may be 0)
    l2: torch.Tensor  # bf16 [N, r] low-rank up projection
    bias: torch.Tensor | None  # bf16 [N]
    clip_table: torch.Tensor  # fp32 [bins, 2]: (clip_ratio, exp_offset) per timestep bin
    # Free-form, JSON-serialisable facts from quantization (chosen alpha, errors, fallbacks).
    report: dict[str, Any] = field(default_factory=dict)

    TENSORS: ClassVar[tuple[str, ...]] = ("qweight", "wscales", "smooth", "l1", "l2", "bias", "clip_table")

    def to(self, device) -> "QuantizedLinearParams":
        moved = {f: (None if getattr(self, f) is None else getattr(self, f).to(device)) for f in self.TENSORS}
        return QuantizedLinearParams(**moved, report=self.report)

    def flat(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix.field: tensor}`` for safetensors (contiguous, on the CPU)."""
        return {f"{prefix}.{f}": getattr(self, f).detach().contiguous().cpu()
                for f in self.TENSORS if getattr(self, f) is not None}

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor], prefix: str, report: dict[str, Any]) -> "QuantizedLinearParams":
        return cls(**{f: flat.get(f"{prefix}.{f}") for f in cls.TENSORS}, report=report)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2

    @property
    def rank(self) -> int:
        return self.l1.shape[0]

    def dequantized_weight(self, wfmt: GroupFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The 4-bit residual ``Wq`` as values ``[N, K]`` (computed in fp32, returned as ``dtype``)."""
        return wfmt.dequantize(Quantized(unpack_nibbles(self.qweight), self.wscales), dtype=dtype)

    def validate(self, wfmt: GroupFormat) -> None:
        """Check shapes and dtypes agree; raise ValueError naming the first mismatch."""
        n, k = self.out_features, self.in_features
        expect = {
            "wscales": ((n, k // wfmt.group_size), wfmt.scale_dtype),
            "smooth": ((k,), torch.float32),
            "l1": ((self.rank, k), None),
            "l2": ((n, self.rank), None),
        }
        if self.qweight.dtype != torch.uint8:
            raise ValueError(f"qweight must be uint8, got {self.qweight.dtype}")
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
            if dtype is not None and t.dtype != dtype:
                raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
        if self.bias is not None and tuple(self.bias.shape) != (n,):
            raise ValueError(f"bias has shape {tuple(self.bias.shape)}, expected ({n},)")
        if self.clip_table.ndim != 2 or self.clip_table.shape[1] != 2:
            raise ValueError(f"clip_table must be [bins, 2], got {tuple(self.clip_table.shape)}")
