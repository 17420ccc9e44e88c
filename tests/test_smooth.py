"""Smoothing scales and the alpha search with the quantizers in the loop."""

from __future__ import annotations

import math

import pytest
import torch

from wanquant.formats import MXFP4
from wanquant.numerics.smooth import search_smoothing, smoothing_scales
from wanquant.numerics.stats import LayerStats, LayerStatsAccumulator


ALPHAS = [0.3, 0.4, 0.5, 0.6, 0.7]


# A fresh torch seed per test, printed for reproduction (conftest.py).
pytestmark = pytest.mark.usefixtures("seed")


def test_scales_formula() -> None:
    a, w = torch.tensor([4.0, 9.0, 1.0]), torch.tensor([1.0, 4.0, 0.25])
    torch.testing.assert_close(smoothing_scales(a, w, 0.5), torch.tensor([2.0, 1.5, 2.0]))
    torch.testing.assert_close(smoothing_scales(a, w, 1.0), a)
    torch.testing.assert_close(smoothing_scales(a, w, 0.0), 1 / w)
    with pytest.raises(ValueError):
        smoothing_scales(a, w, 1.5)
    with pytest.raises(ValueError):
        smoothing_scales(a, w[:2], 0.5)


def test_scales_guard_zeros_and_clamp() -> None:
    a = torch.tensor([0.0, 4.0, 9.0, 16.0, 1e30])
    w = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])
    s = smoothing_scales(a, w, 0.5, max_ratio=100.0)
    assert torch.isfinite(s).all() and (s > 0).all()
    g = math.exp((math.log(3.0) + math.log(4.0) + math.log(1e15)) / 3)  # live: channels 2, 3, 4
    torch.testing.assert_close(s[:2], torch.tensor([g, g]), rtol=1e-4, atol=0)
    assert s.max() <= g * 100 * 1.0001 and s.min() >= g / 100 / 1.0001
    assert torch.equal(smoothing_scales(torch.zeros(4), torch.ones(4), 0.5), torch.ones(4))


def _outlier_layer(n: int = 64, k: int = 256, outliers: int = 4):
    """Activation channels 40x larger whose weight columns are 40x smaller.

    Their products are ordinary, but in both 4-bit operands they crush the other 31
    members of their groups: the case smoothing exists for. (With ordinary weight
    columns the outliers dominate the output and smoothing alone only moves the
    damage into the weight groups; the low-rank branch is what fixes that case.)
    """
    w = torch.randn(n, k) / k**0.5
    acc = LayerStatsAccumulator(k, 2, 512, quantile=0.99)
    idx = torch.randperm(k)[:outliers]
    w[:, idx] /= 40.0
    for b in range(2):
        x = torch.distributions.StudentT(4.0).sample((512, k))
        x[:, idx] *= 40.0
        acc.update(x, b)
    return w, acc.finalize()


@pytest.mark.parametrize("rank", [0, 8])
def test_smoothing_improves_outlier_channels(rank: int) -> None:
    w, stats = _outlier_layer()
    r = search_smoothing(w, stats, MXFP4, MXFP4, ALPHAS, rank=rank)
    assert set(r.errors) == set(ALPHAS) and r.objective == "output"
    assert r.errors[r.alpha] == min(r.errors.values())
    assert r.errors[r.alpha] < 0.5 * r.identity_error, (r.errors, r.identity_error)
    assert r.smooth.dtype == torch.float32 and r.smooth.shape == (256,)
    torch.testing.assert_close(r.smooth, smoothing_scales(stats.act_absmax, w.abs().amax(0), r.alpha))


def test_disabled_quantile_and_hessian_fallback() -> None:
    w, stats = _outlier_layer()
    off = search_smoothing(w, stats, MXFP4, MXFP4, None, rank=32)
    assert torch.equal(off.smooth, torch.ones(256)) and off.alpha is None and off.errors == {}
    q = search_smoothing(w, stats, MXFP4, MXFP4, [0.5], act_quantile=0.99, rank=32)
    torch.testing.assert_close(q.smooth, smoothing_scales(stats.act_quantile, w.abs().amax(0), 0.5))
    no_tokens = LayerStats(stats.act_absmax, None, stats.hessian, stats.n_tokens)
    h = search_smoothing(w, no_tokens, MXFP4, MXFP4, ALPHAS, rank=4)
    assert h.objective == "hessian" and all(math.isfinite(e) for e in h.errors.values())
    aware = search_smoothing(w, stats, MXFP4, MXFP4, ALPHAS, rank=4, lowrank_method="activation_aware")
    with pytest.raises(ValueError, match="empty"):
        search_smoothing(w, stats, MXFP4, MXFP4, [], rank=4)
    assert all(math.isfinite(e) for e in aware.errors.values())
