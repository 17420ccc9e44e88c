# TEMPORARY shim (issue 11): re-exports, removed by the lead after the import rewrite
"""Moved to :mod:`wanquant.method.params`."""

from wanquant.method.params import QuantizedLinearParams  # noqa: F401
