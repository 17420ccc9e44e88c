"""4-bit number formats, each one object behind the :class:`GroupFormat` interface.

The bottom of the layering: ``formats`` -> ``numerics`` -> ``method`` -> ``kernels`` /
``runtime``; this package imports only torch.

* :mod:`~wanquant.formats.base`: the interface (:class:`GroupFormat`) and :class:`Quantized`;
* :mod:`~wanquant.formats.mxfp4`: OCP MXFP4 (E2M1 + E8M0), scale rules ``ocp_floor`` and
  ``safe_ceil``, and the E2M1 helpers the kernels' references use;
* :mod:`~wanquant.formats.int4`: symmetric INT4 with bf16 scales;
* :mod:`~wanquant.formats.packing`: two codes a byte.

Formats are found by name in a registry (manifests store ``fmt.to_dict()``). Adding one,
e.g. NVFP4, takes its own module with a :class:`GroupFormat` subclass and one
``register_format`` line below; nothing else in the library names formats.
"""

from __future__ import annotations

from typing import Any

from wanquant.formats.base import GroupFormat, Quantized
from wanquant.formats.int4 import INT4Format
from wanquant.formats.mxfp4 import MXFP4Format
from wanquant.formats.packing import pack_nibbles, unpack_nibbles

FORMATS: dict[str, type[GroupFormat]] = {}


def register_format(cls: type[GroupFormat]) -> type[GroupFormat]:
    """Make ``cls`` findable by ``cls.name`` (idempotent; another class under a taken name raises)."""
    known = FORMATS.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"format name {cls.name!r} is already registered by {known.__qualname__}")
    FORMATS[cls.name] = cls
    return cls


def format_class(name: str) -> type[GroupFormat]:
    """The registered class of format ``name``."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; registered: {sorted(FORMATS)}")
    return FORMATS[name]


def make_format(name: str, group_size: int | None = None, **settings: Any) -> GroupFormat:
    """Format ``name`` with its standard group size (32 for MXFP4, 64 for INT4) unless given."""
    if group_size is not None:
        settings["group_size"] = group_size
    return format_class(name)(**settings)


def format_from_dict(d: dict[str, Any]) -> GroupFormat:
    """Inverse of :meth:`GroupFormat.to_dict`."""
    settings = dict(d)
    return make_format(settings.pop("name"), **settings)


register_format(MXFP4Format)
register_format(INT4Format)

MXFP4 = MXFP4Format()
INT4 = INT4Format()

__all__ = [
    "FORMATS", "GroupFormat", "INT4", "INT4Format", "MXFP4", "MXFP4Format", "Quantized", "format_class",
    "format_from_dict", "make_format", "pack_nibbles", "register_format", "unpack_nibbles",
]
