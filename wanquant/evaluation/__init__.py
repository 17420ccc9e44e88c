"""Fidelity metrics (PSNR, SSIM, VMAF, ground-truth accuracy) and HTML report pages.

Experiment-only evaluation (the ablation, VBench-style dimensions, per-layer error
studies) lives in ``benchmarks/quality``.
"""
