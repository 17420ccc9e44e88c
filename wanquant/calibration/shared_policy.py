# TEMPORARY shim (issue 11): re-exports, removed by the lead after the import rewrite
"""Moved to :mod:`wanquant.method.shared_clip`."""

from wanquant.method.shared_clip import shared_clip_table  # noqa: F401
