# TEMPORARY shim (issue 11): re-exports, removed by the lead after the import rewrite
"""Moved to :mod:`wanquant.method.config`."""

from wanquant.method.config import (  # noqa: F401
    PRESETS, BinConfig, ClipConfig, GPTQConfig, LowRankConfig, LowRankMethod, PrecisionPolicy, QuantConfig,
    SmoothConfig, paper_preset, preset, wanquant_preset,
)
