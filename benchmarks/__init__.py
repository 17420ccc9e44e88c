"""Experiments and benchmark drivers of wanquant; not part of the installed package.

Every driver runs from the repository root as ``python -m benchmarks.<driver> ...``
(``--help`` prints its usage) and writes its numbers to ``benchmarks/results/``. Shared
infrastructure lives in :mod:`benchmarks.common`, the testbed quality study's pieces in
:mod:`benchmarks.quality`; drivers import from those two, never from each other.
"""
