# TEMPORARY shim (issue 11): re-exports, removed by the lead after the import rewrite
"""Moved to :mod:`wanquant.method.layer`."""

from wanquant.method.layer import output_error, quantize_layer, reference_forward  # noqa: F401
