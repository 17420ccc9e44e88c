"""Video quality metrics: fidelity to a reference video and accuracy against ground truth.

Videos are ``[F, H, W, 3]``: uint8, or floats in [0, 1] (the pipelines' ``np`` output);
every metric first converts to uint8 exactly as a written video would store it, so two
videos that would encode to the same file score as identical.

Fidelity (to the 16-bit model's output, same seed):
- :func:`psnr`: over all pixels and channels of all frames, peak 255.
- :func:`ssim`: SSIM (Wang et al. 2004) on the BT.601 luma plane, Gaussian window 11 x 11
  with sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, ``L = 255``, over the "valid" window
  positions only (no padding), averaged over positions and then over frames.
- :func:`vmaf`: Netflix VMAF (model v0.6.1, built into libvmaf) through the ffmpeg binary
  that the imageio-ffmpeg wheel bundles. VMAF's model was fitted on HD video; the testbed's
  64 x 64 clips are scaled up (bicubic, both videos alike) to ``vmaf_size`` first, so
  that its four-scale features have room. Returns ``None`` with a reason where ffmpeg or
  its libvmaf filter is missing: never an invented number.

Accuracy (against the testbed's true clip): :func:`ground_truth_accuracy` uses the
testbed's own ``psnr`` and ``trajectory_error`` (both skip frame 0, the condition image).
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

# BT.601 luma weights (what ffmpeg's rgb -> yuv conversion and VMAF's luma use).
_LUMA = np.array([0.299, 0.587, 0.114])
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def as_uint8(video) -> np.ndarray:
    """``[F, H, W, 3]`` uint8; floats are taken as [0, 1] and rounded half up."""
    arr = np.asarray(video)
    if arr.dtype == np.uint8:
        out = arr
    elif np.issubdtype(arr.dtype, np.floating):
        out = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise TypeError(f"expected a uint8 or float video, got {arr.dtype}")
    if out.ndim == 3:  # one image
        out = out[None]
    if out.ndim != 4 or out.shape[-1] != 3:
        raise ValueError(f"expected a video [F, H, W, 3], got shape {tuple(arr.shape)}")
    return out


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_uint8(a), as_uint8(b)
    if x.shape != y.shape:
        raise ValueError(f"videos differ in shape: {x.shape} vs {y.shape}")
    return x, y


def psnr(video, reference, skip_first: bool = False) -> float:
    """PSNR in dB over every frame, pixel and channel (peak 255); ``inf`` if identical.

    ``skip_first``: leave out frame 0 (in image-to-video it is the given image)."""
    x, y = _pair(video, reference)
    if skip_first:
        x, y = x[1:], y[1:]
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def luma(video) -> np.ndarray:
    """BT.601 luma ``[F, H, W]`` in 0..255 (float64)."""
    return as_uint8(video).astype(np.float64) @ _LUMA


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian taps; the 2-D window is their outer product."""
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(t**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation of ``[..., H, W]`` with ``taps`` x ``taps``, valid part only."""
    n = len(taps)
    h, w = img.shape[-2:]
    rows = sum(taps[i] * img[..., i:h - n + 1 + i, :] for i in range(n))
    return sum(taps[j] * rows[..., :, j:w - n + 1 + j] for j in range(n))


def ssim_map(a: np.ndarray, b: np.ndarray, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
             data_range: float = 255.0) -> np.ndarray:
    """Local SSIM of two luma stacks ``[..., H, W]`` at every valid window position."""
    if a.shape[-1] < window or a.shape[-2] < window:
        raise ValueError(f"images of {a.shape[-2:]} are smaller than the {window} x {window} SSIM window")
    g = gaussian_window(window, sigma)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(video, reference) -> float:
    """Mean SSIM on luma over frames (1.0 for identical videos)."""
    x, y = _pair(video, reference)
    if np.array_equal(x, y):
        return 1.0
    per_frame = ssim_map(luma(x), luma(y)).mean(axis=(-2, -1))
    return float(per_frame.mean())


# ------------------------------------------------------------------------------ VMAF


@dataclass(frozen=True)
class VmafStatus:
    available: bool
    reason: str
    ffmpeg: str | None = None


@lru_cache(maxsize=1)
def vmaf_status() -> VmafStatus:
    """Whether the bundled ffmpeg can compute VMAF (has the ``libvmaf`` filter)."""
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # wheel missing or its binary absent
        return VmafStatus(False, f"no ffmpeg from imageio-ffmpeg: {e}")
    try:
        out = subprocess.run([exe, "-hide_banner", "-filters"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return VmafStatus(False, f"cannot run {exe}: {e}", exe)
    if not any(line.split()[1:2] == ["libvmaf"] for line in out.splitlines() if line.strip()):
        return VmafStatus(False, f"{exe} was built without libvmaf (no 'libvmaf' in `ffmpeg -filters`)", exe)
    return VmafStatus(True, "libvmaf filter of the imageio-ffmpeg ffmpeg, model vmaf_v0.6.1", exe)


def vmaf(video, reference, vmaf_size: int | None = 256, fps: int = 16, timeout: float = 300.0) -> float | None:
    """Mean VMAF (0..100) of ``video`` against ``reference``; None where unavailable.

    Both videos go to ffmpeg as raw RGB, are scaled to ``vmaf_size`` (bicubic; None keeps
    the native size), converted to yuv444p and compared by ``libvmaf`` with one thread.
    """
    status = vmaf_status()
    if not status.available:
        return None
    x, y = _pair(video, reference)
    f, h, w, _ = x.shape
    chain = "format=yuv444p" if vmaf_size is None else f"scale={vmaf_size}:{vmaf_size}:flags=bicubic,format=yuv444p"
    with tempfile.TemporaryDirectory(prefix="wanquant-vmaf-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "dist.rgb").write_bytes(np.ascontiguousarray(x).tobytes())
        (tmp_path / "ref.rgb").write_bytes(np.ascontiguousarray(y).tobytes())
        log = tmp_path / "vmaf.json"
        raw = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps)]
        cmd = [status.ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin",
               *raw, "-i", str(tmp_path / "dist.rgb"), *raw, "-i", str(tmp_path / "ref.rgb"),
               "-lavfi", f"[0:v]{chain}[d];[1:v]{chain}[r];[d][r]libvmaf=log_fmt=json:log_path={log}:n_threads=1",
               "-f", "null", "-"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not log.exists():
            raise RuntimeError(f"ffmpeg libvmaf failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        data = json.loads(log.read_text())
    pooled = data.get("pooled_metrics", {}).get("vmaf", {})
    if "mean" in pooled:
        return float(pooled["mean"])
    frames = [fr["metrics"]["vmaf"] for fr in data.get("frames", [])]
    return float(np.mean(frames)) if frames else None


def fidelity(video, reference, with_vmaf: bool = True) -> dict[str, float | None]:
    """PSNR, SSIM and (if available) VMAF of ``video`` against ``reference``."""
    return {"psnr": psnr(video, reference), "ssim": ssim(video, reference),
            "vmaf": vmaf(video, reference) if with_vmaf else None}


def ground_truth_accuracy(video, sample) -> dict[str, float]:
    """PSNR against the true clip and the object-trajectory error (testbed ground truth)."""
    from wanquant.testbed.dataset import trajectory_error

    traj = trajectory_error(as_uint8(video), sample)
    return {"gt_psnr": psnr(video, sample.frames, skip_first=True), "trajectory_err": traj["traj_err_px"],
            "trajectory_err_rel": traj["traj_err_rel"], "missing_frac": traj["missing_frac"]}


def mean_finite(values) -> float | None:
    """Mean of the values that are not None; ``inf`` stays ``inf``; None if there are none."""
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None
