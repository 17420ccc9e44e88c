"""Quality metrics against brute-force references and constructed videos with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wanquant.evaluation import metrics as M
from wanquant.evaluation import vbench_style as VB


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


# ---------------------------------------------------------------------- VBench-style dims


def test_flicker_static_vs_flickering():
    static = np.full((6, 16, 16, 3), 100, dtype=np.uint8)
    assert VB.temporal_flickering(static) == 1.0
    flicker = static.copy()
    flicker[1::2] = 120  # every other frame 20 levels brighter
    assert VB.temporal_flickering(flicker) == pytest.approx((255 - 20) / 255)
    # Restricted to a mask, only its pixels count.
    part = static.copy()
    part[1::2, :, :8] = 140
    mask = np.zeros((16, 16), dtype=bool)
    mask[:, 8:] = True
    assert VB.temporal_flickering(part, mask) == 1.0
    assert VB.temporal_flickering(part, ~mask) == pytest.approx((255 - 40) / 255)


def _square_video(velocity: float, frames: int = 9, size: int = 64, jitter: np.ndarray | None = None) -> np.ndarray:
    """A textured 14 px square moving right by ``velocity`` px a frame over a smooth background."""
    rng = np.random.default_rng(1)
    tex = rng.integers(120, 256, size=(14, 14, 3)).astype(np.uint8)
    y, x = np.mgrid[0:size, 0:size]
    bg = np.stack([40 + x // 4, 40 + y // 4, 60 + 0 * x], -1).astype(np.uint8)
    out = []
    for t in range(frames):
        fr = bg.copy()
        x0 = int(round(8 + velocity * t + (jitter[t] if jitter is not None else 0)))
        fr[25:39, x0:x0 + 14] = tex
        out.append(fr)
    return np.stack(out)


def test_optical_flow_recovers_a_translating_square():
    v = _square_video(2.0)
    flow = VB.optical_flow(v[3], v[4])
    x0 = 8 + 2 * 3
    inner = flow[28:36, x0 + 3:x0 + 11]
    assert inner[..., 0].mean() == pytest.approx(2.0, abs=0.35)
    assert abs(inner[..., 1].mean()) < 0.3


def test_motion_metrics_on_known_motion():
    moving, still = _square_video(2.0), _square_video(0.0)
    thr = VB.dynamic_threshold(64, 64)
    assert thr == pytest.approx(1.5)
    assert VB.dynamic_degree(moving) == 1.0
    assert VB.dynamic_degree(still) == 0.0
    jerky = _square_video(2.0, jitter=np.array([0, 4, -3, 5, -4, 3, -5, 4, 0]))
    smooth_s, jerky_s, still_s = (VB.motion_smoothness(v) for v in (moving, jerky, still))
    assert still_s == pytest.approx(1.0, abs=1e-6)
    assert smooth_s > 0.99
    assert jerky_s < smooth_s - 0.005


def test_subject_and_background_consistency():
    v = _square_video(2.0)
    v[..., :] = np.where(v.sum(-1, keepdims=True) > 400, [230, 40, 40], v).astype(np.uint8)  # a red object
    base = VB.subject_consistency(v, [(230, 40, 40)])
    gone = v.copy()
    gone[4:6] = gone[0, :, :1]  # the object vanishes for two frames
    assert VB.subject_consistency(gone, [(230, 40, 40)]) < base - 0.1
    assert VB.background_consistency(np.repeat(v[:1], 5, 0)) == pytest.approx(1.0)


def test_vbench_style_on_a_testbed_clip():
    from wanquant.testbed.dataset import get_sample

    s = get_sample("eval", 0)
    dims = VB.vbench_style(s.frames, s, with_brisque=False)
    assert set(VB.DIMENSIONS) <= set(dims)
    assert all(0.0 <= dims[k] <= 1.0 for k in VB.DIMENSIONS)
    assert dims["temporal_flickering"] == 1.0  # the true clip's background never changes
    assert dims["average"] == pytest.approx(np.mean([dims[k] for k in VB.DIMENSIONS]))
    mask = VB.static_mask(s)
    assert 0 < mask.sum() < mask.size


def test_brisque_reports_a_number_or_why_not():
    from wanquant.testbed.dataset import get_sample

    out = VB.imaging_quality_brisque(get_sample("eval", 0).frames[:4], every=4)
    if out["score"] is None:
        assert out["reason"]
    else:
        assert np.isfinite(out["raw"]) and 0.0 <= out["score"] <= 1.0
