"""Quality metrics against brute-force references and constructed videos with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wanquant.evaluation import metrics as M


def _video(rng, f=2, h=16, w=16) -> np.ndarray:
    return rng.integers(0, 256, size=(f, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_matches_brute_force():
    rng = np.random.default_rng()
    a, b = _video(rng, 2, 5, 6), _video(rng, 2, 5, 6)
    total, n = 0.0, 0
    for idx in np.ndindex(a.shape):
        total += (float(a[idx]) - float(b[idx])) ** 2
        n += 1
    expected = 10 * math.log10(255.0**2 / (total / n))
    assert M.psnr(a, b) == pytest.approx(expected, rel=1e-12)
    # Floats in [0, 1] are the same video as their uint8 rounding.
    assert M.psnr(a / 255.0, b.astype(np.float32) / 255.0) == pytest.approx(expected, rel=1e-12)


def _ssim_brute(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two luma images, window by window, straight from the definition."""
    g = M.gaussian_window()
    w2 = np.outer(g, g)
    n = len(g)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - n + 1):
        for j in range(x.shape[1] - n + 1):
            px, py = x[i:i + n, j:j + n], y[i:i + n, j:j + n]
            mx, my = (w2 * px).sum(), (w2 * py).sum()
            vx, vy = (w2 * (px - mx) ** 2).sum(), (w2 * (py - my) ** 2).sum()
            cxy = (w2 * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_brute_force():
    rng = np.random.default_rng()
    a = _video(rng, 2, 15, 17)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    lum = lambda v: v.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    expected = np.mean([_ssim_brute(lum(a[k]), lum(b[k])) for k in range(len(a))])
    assert M.ssim(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 0.0 < M.ssim(a, b) < 1.0


def test_identical_videos():
    rng = np.random.default_rng()
    a = _video(rng, 3, 16, 16)
    assert M.psnr(a, a) == math.inf
    assert M.ssim(a, a.copy()) == 1.0
    with pytest.raises(ValueError):
        M.psnr(a, a[:2])


def test_vmaf_orders_noise_or_reports_unavailable(monkeypatch):
    rng = np.random.default_rng(0)
    y, x = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    base = np.stack([(x * 3 + t * 2) % 256 for t in range(4)]).astype(np.uint8)
    ref = np.repeat(np.stack([base, (y * 4 % 256)[None].repeat(4, 0).astype(np.uint8), base], -1), 1, 0)
    noisy = np.clip(ref.astype(int) + rng.normal(0, 25, ref.shape), 0, 255).astype(np.uint8)
    if M.vmaf_status().available:
        same, worse = M.vmaf(ref, ref), M.vmaf(noisy, ref)
        assert same > 90 and worse < same - 5
    else:
        assert M.vmaf(noisy, ref) is None
    monkeypatch.setattr(M, "vmaf_status", lambda: M.VmafStatus(False, "no libvmaf"))
    assert M.vmaf(noisy, ref) is None
    assert M.fidelity(noisy, ref)["vmaf"] is None
