# TEMPORARY shim (issue 11): re-exports, removed by the lead after the import rewrite
"""Moved to :mod:`wanquant.formats`; the free functions became methods of the format objects."""

import dataclasses

import torch

from wanquant.formats import (  # noqa: F401
    INT4, MXFP4, GroupFormat, Quantized, format_class, format_from_dict, make_format, pack_nibbles, unpack_nibbles,
)
from wanquant.formats.mxfp4 import (  # noqa: F401
    E2M1_EMAX, E2M1_MAX, E2M1_VALUES, E8M0_BIAS, E8M0_MAX_EXP, E8M0_MIN_EXP, ScaleRule, e2m1_decode, e2m1_round,
    floor_log2, mx_group_exponents,
)

FormatName = str


def QuantFormat(name: str, group_size: int, scale_rule: str = "ocp_floor", int_qmax: int = 7) -> GroupFormat:  # noqa: N802
    """The old constructor spelling: ``make_format(name, group_size, ...)``."""
    fields = {f.name for f in dataclasses.fields(format_class(name))}
    return make_format(name, group_size, **{k: v for k, v in (("scale_rule", scale_rule), ("qmax", int_qmax))
                                            if k in fields})


def quantize(x: torch.Tensor, fmt: GroupFormat, clip_ratio: float = 1.0, exp_offset: int = 0) -> Quantized:
    return fmt.quantize(x, clip_ratio, exp_offset)


def dequantize(q: Quantized, fmt: GroupFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return fmt.dequantize(q, dtype)


def fake_quantize(x: torch.Tensor, fmt: GroupFormat, clip_ratio: float = 1.0, exp_offset: int = 0) -> torch.Tensor:
    return fmt.fake_quantize(x, clip_ratio, exp_offset)


def check_quantizable(x: torch.Tensor, fmt: GroupFormat, what: str = "tensor") -> None:
    fmt.check_quantizable(x, what)
