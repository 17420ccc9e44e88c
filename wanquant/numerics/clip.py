"""Activation clip search: how each timestep bin derives its activation group scales.

For smoothed inputs ``x'`` and the layer's dequantized 4-bit weight ``Wq`` the
objective of a setting ``(c, o)`` (clip ratio, MX exponent offset) is

    err(c, o) = sum |Q(x'; c, o) Wq^T - x' Wq^T|^2 / sum |x' Wq^T|^2

i.e. the output error caused by quantizing the activations alone. The low-rank branch
reads the unquantized ``x'`` in both terms, so it cancels and is left out.

Layering: ``formats`` -> ``numerics`` (here) -> ``method``: grids and switches arrive as
explicit arguments; :func:`wanquant.method.layer.search_clip_table` reads them from a config.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from wanquant.formats import GroupFormat


class ClipResult(NamedTuple):
    clip_ratio: float
    exp_offset: int
    error: float  # objective at the chosen setting
    grid: torch.Tensor  # fp64 [len(clip_ratios), len(exp_offsets)]; NaN where not valid
    clip_ratios: list[float]
    exp_offsets: list[int]

    @property
    def baseline_error(self) -> float:
        """The objective at (1.0, 0) (no clip), NaN when that is not on the grid."""
        if 1.0 in self.clip_ratios and 0 in self.exp_offsets:
            return float(self.grid[self.clip_ratios.index(1.0), self.exp_offsets.index(0)])
        return float("nan")


def subsample(tokens: torch.Tensor, max_tokens: int, seed: int = 0) -> torch.Tensor:
    """At most ``max_tokens`` rows of ``tokens``, drawn uniformly without replacement (seeded)."""
    if tokens.shape[0] <= max_tokens:
        return tokens
    idx = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
    return tokens[idx.sort().values.to(tokens.device)]


def search_clip(
    tokens: torch.Tensor, w_deq: torch.Tensor, fmt: GroupFormat, clip_ratios: list[float],
    exp_offsets: list[int], max_tokens: int = 4096, seed: int = 0,
) -> ClipResult:
    """Grid-search ``(clip_ratio, exp_offset)`` for smoothed input ``tokens [T, K]``.

    Runs on ``w_deq``'s device. Offsets the format cannot use (INT4 has no exponent: all
    but 0) are skipped (NaN in the grid). Ties go to the mildest setting (closest to
    ``(1.0, 0)``).
    """
    if tokens.ndim != 2 or tokens.shape[1] != w_deq.shape[1]:
        raise ValueError(f"tokens must be [T, {w_deq.shape[1]}], got {tuple(tokens.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError("clip search needs at least one token")
    w = w_deq.float()
    x = subsample(tokens, max_tokens, seed).to(w.device, torch.float32)
    den = float(torch.linalg.matrix_norm(x @ w.T).double() ** 2)
    grid = torch.full((len(clip_ratios), len(exp_offsets)), float("nan"), dtype=torch.float64)
    best: tuple[float, float, int, int] | None = None  # (error, distance from (1, 0), i, j)
    for i, c in enumerate(clip_ratios):
        for j, o in enumerate(exp_offsets):
            if not fmt.accepts_exp_offset(o):
                continue
            d = (fmt.fake_quantize(x, c, o) - x) @ w.T
            err = float(torch.linalg.matrix_norm(d).double() ** 2) / den if den > 0 else 0.0
            grid[i, j] = err
            key = (err, abs(1.0 - c) + abs(o), i, j)
            if best is None or key < best:
                best = key
    if best is None:
        raise ValueError("no valid (clip_ratio, exp_offset) on the grid for this format")
    _, _, i, j = best
    return ClipResult(float(clip_ratios[i]), int(exp_offsets[j]), float(grid[i, j]), grid,
                      list(clip_ratios), list(exp_offsets))


def _summary(r: ClipResult) -> dict[str, Any]:
    return {"clip_ratio": r.clip_ratio, "exp_offset": r.exp_offset, "error": r.error,
            "baseline_error": r.baseline_error, "grid": [[None if v != v else v for v in row] for row in r.grid.tolist()]}


def clip_table(
    reservoirs: dict[int, torch.Tensor], w_deq: torch.Tensor, fmt: GroupFormat, num_bins: int,
    clip_ratios: list[float], exp_offsets: list[int], *, max_tokens: int = 4096, per_bin: bool = True,
    enabled: bool = True, smooth: torch.Tensor | None = None, seed: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Per-bin clip settings as an fp32 ``[num_bins, 2]`` table and a JSON-able report.

    ``reservoirs`` maps bin -> raw input tokens; with ``smooth`` they are smoothed here
    exactly as at run time (``x.float() * (1.0 / smooth)``). ``per_bin`` False: one
    setting from the pooled tokens for every bin. ``enabled`` False: ``(1.0, 0)``
    everywhere. A bin without tokens gets the pooled setting (listed in
    ``report["fallback_bins"]``); with no tokens at all, ``(1.0, 0)``. Every search sees
    at most ``max_tokens`` tokens.
    """
    table = torch.tensor([[1.0, 0.0]] * num_bins, dtype=torch.float32)
    report: dict[str, Any] = {"enabled": enabled, "per_bin": per_bin, "bins": {}, "fallback_bins": []}
    bad = [b for b in reservoirs if not 0 <= b < num_bins]
    if bad:
        raise ValueError(f"reservoir bins {bad} outside [0, {num_bins})")
    if not enabled:
        return table, report
    inv = None if smooth is None else (1.0 / smooth.float()).to(w_deq.device)

    def prep(t: torch.Tensor) -> torch.Tensor:
        t = t.to(w_deq.device).float()
        return t if inv is None else t * inv

    def run(t: torch.Tensor, s: int) -> ClipResult:
        return search_clip(prep(t), w_deq, fmt, clip_ratios, exp_offsets, max_tokens, s)

    live = {b: t for b, t in sorted(reservoirs.items()) if t.shape[0] > 0}
    if not live:
        report["fallback_bins"] = list(range(num_bins))
        report["note"] = "no calibration tokens: clip disabled"
        return table, report
    pooled = None
    if not per_bin or len(live) < num_bins:
        # Subsample each bin before concatenating so the pooled set stays bounded.
        parts = [subsample(t, max_tokens, seed + b) for b, t in live.items()]
        pooled = run(torch.cat(parts), seed)
        report["pooled"] = _summary(pooled)
    for b in range(num_bins):
        if per_bin and b in live:
            r = run(live[b], seed + 1 + b)
            report["bins"][b] = _summary(r)
        else:
            r = pooled
            if per_bin:
                report["fallback_bins"].append(b)
        table[b, 0], table[b, 1] = r.clip_ratio, float(r.exp_offset)
    return table, report
