"""How far one tensor is from a reference: the numbers the parallel and numerics studies report."""

from __future__ import annotations

from pathlib import Path

import torch


def tensor_difference(x: torch.Tensor, y: torch.Tensor) -> dict:
    """How far ``y`` is from the reference ``x``: max |diff|, relative L2, PSNR (fp64), finiteness."""
    x, y = x.double(), y.double()
    if x.shape != y.shape:
        return {"error": f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}"}
    err = (y - x).pow(2).mean()
    peak = x.abs().max()
    return {"max_abs": float((y - x).abs().max()), "rel_l2": float(err.sqrt() / x.pow(2).mean().sqrt()),
            "psnr_db": float(10 * torch.log10(peak**2 / err)) if err > 0 else float("inf"),
            "finite": bool(torch.isfinite(y).all())}


def saved_difference(reference: Path, other: Path) -> dict | None:
    """:func:`tensor_difference` of two tensors saved with ``torch.save`` (None if one is missing)."""
    if not reference.exists() or not other.exists():
        return None
    return tensor_difference(torch.load(reference), torch.load(other))
