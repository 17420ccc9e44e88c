"""Offline, VBench-style video quality dimensions, each in [0, 1] with higher better.

VBench scores its dimensions with large pretrained networks (DINO, CLIP, RAFT, AMT,
MUSIQ) that cannot be downloaded here. These are offline stand-ins with the same intent
and, where VBench's formula does not need a network, the same formula. All work on uint8
``[F, H, W, 3]`` videos (floats in [0, 1] are converted as a written video would be).

- ``temporal_flickering``: VBench's formula, ``(255 - MAD) / 255``, where MAD is the mean
  absolute difference between consecutive frames (all channels), taken over *static*
  pixels only. On the testbed the static region is known: pixels more than 2 px outside
  every object's true disc in every frame (:func:`static_mask`); without a sample, the
  whole frame (as VBench, which scores static-camera videos).
- ``motion_smoothness``: VBench drops every other frame, re-creates it with a
  frame-interpolation network and scores ``(255 - MAE) / 255``. Here the interpolator is
  OpenCV's Farneback optical flow with the linear intermediate-flow approximation of
  Super SloMo: for frames ``t-1, t, t+1`` with flows ``F01`` (t-1 -> t+1) and ``F10``,
  ``F_t->0 = (F10 - F01) / 4``, ``F_t->1 = (F01 - F10) / 4``; both neighbours are
  backward-warped to ``t`` and averaged. Smooth (constant-velocity) motion is
  interpolated well, jerky motion and flicker are not.
- ``dynamic_degree``: VBench's rule per frame pair: the pair is moving if the mean of the
  top 5 % optical-flow magnitudes exceeds ``6 * min(H, W) / 256`` pixels (VBench's
  threshold, scaled to the resolution). VBench then calls a whole video dynamic or not
  (0/1); with few evaluation videos that is too coarse, so this reports the fraction of
  moving pairs per video (continuous, same threshold).
- ``subject_consistency``: VBench compares DINO features of each frame with the first
  and the previous frame: ``mean_t (sim(f_t, f_0) + sim(f_t, f_{t-1})) / 2``. Here the
  feature is the colour histogram (8 bins per channel) of a window around each object
  (found by its colour, as the testbed's trajectory metric finds it) and ``sim`` is the
  histogram intersection; a frame where the object is missing scores 0. Needs the
  objects' colours (from the testbed sample); without them the whole frame is used.
- ``background_consistency``: the same formula on the colour histogram of the static
  region (VBench uses CLIP features of whole frames).

The ``average`` is the plain mean of those five. ``imaging_quality_brisque`` (BRISQUE
through the ``brisque`` wheel, whose SVM parameters ship inside it) is reported beside
them but kept out of the average: on the testbed's 64 x 64 synthetic clips it is outside
the natural-image statistics it was fitted on and ranks wrongly (adding Gaussian noise to
a clean testbed frame *improves* its score). ``None`` with a reason when unavailable.

OpenCV and ``brisque`` come with the ``eval`` extra (``pip install -e ".[eval]"``).
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np

from wanquant.evaluation.metrics import as_uint8

DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
              "dynamic_degree")
# Farneback parameters for small (64 px) frames: 3 pyramid levels, 9 px windows.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=9, iterations=5, poly_n=5, poly_sigma=1.1, flags=0)
HIST_BINS = 8
COLOUR_THRESHOLD = 70.0  # as wanquant.testbed.dataset.colour_centroids


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - dependency missing
        raise ImportError('the optical-flow dimensions need OpenCV: pip install -e ".[eval]"') from e
    return cv2


def _gray(frame: np.ndarray) -> np.ndarray:
    return _cv2().cvtColor(frame, _cv2().COLOR_RGB2GRAY)


def optical_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Farneback flow ``[H, W, 2]`` (dx, dy) from RGB frame ``a`` to ``b``: a(p) ~ b(p + flow(p))."""
    return _cv2().calcOpticalFlowFarneback(_gray(a), _gray(b), None, **FARNEBACK)


def consecutive_flows(video) -> np.ndarray:
    v = as_uint8(video)
    return np.stack([optical_flow(v[i], v[i + 1]) for i in range(len(v) - 1)])


def _warp(frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: out(p) = frame(p + flow(p)), bilinear, edges replicated."""
    cv2 = _cv2()
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(frame.astype(np.float32), gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


# ------------------------------------------------------------------------ dimensions


def temporal_flickering(video, mask: np.ndarray | None = None) -> float:
    """``(255 - MAD) / 255`` of consecutive frames over the pixels of ``mask`` ([H, W] bool)."""
    v = as_uint8(video).astype(np.float64)
    if len(v) < 2:
        return 1.0
    diff = np.abs(v[1:] - v[:-1]).mean(axis=-1)  # [F-1, H, W]
    if mask is not None:
        if not mask.any():
            return float("nan")
        diff = diff[:, mask]
    return float((255.0 - diff.mean()) / 255.0)


def interpolate_middle(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """The frame halfway between two RGB frames, from optical flow (see the module doc)."""
    f01, f10 = optical_flow(prev, nxt), optical_flow(nxt, prev)
    ft0, ft1 = 0.25 * (f10 - f01), 0.25 * (f01 - f10)
    return 0.5 * (_warp(prev, ft0) + _warp(nxt, ft1))


def motion_smoothness(video) -> float:
    """``(255 - MAE) / 255`` of every odd frame against its flow interpolation from its neighbours."""
    v = as_uint8(video)
    errs = [np.abs(interpolate_middle(v[t - 1], v[t + 1]) - v[t].astype(np.float32)).mean()
            for t in range(1, len(v) - 1, 2)]
    return float((255.0 - np.mean(errs)) / 255.0) if errs else 1.0


def dynamic_threshold(height: int, width: int) -> float:
    """VBench's motion threshold (6 px at 256 px), scaled to the frame size."""
    return 6.0 * min(height, width) / 256.0


def motion_magnitudes(video) -> np.ndarray:
    """Per frame pair, the mean of the top 5 % flow magnitudes (VBench's statistic), pixels."""
    flows = consecutive_flows(video)
    mags = np.linalg.norm(flows, axis=-1).reshape(len(flows), -1)
    k = max(1, int(math.ceil(0.05 * mags.shape[1])))
    return np.sort(mags, axis=1)[:, -k:].mean(axis=1)


def dynamic_degree(video) -> float:
    """Fraction of consecutive frame pairs that move more than :func:`dynamic_threshold`."""
    v = as_uint8(video)
    if len(v) < 2:
        return 0.0
    return float((motion_magnitudes(v) > dynamic_threshold(*v.shape[1:3])).mean())


def colour_histogram(pixels: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """Normalised joint RGB histogram of ``[N, 3]`` uint8 pixels (zeros if N == 0)."""
    idx = (pixels.astype(np.int64) * bins) // 256
    flat = (idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2]
    h = np.bincount(flat, minlength=bins**3).astype(np.float64)
    return h / h.sum() if h.sum() > 0 else h


def _consistency(hists: list[np.ndarray | None]) -> float:
    """VBench's ``mean_t (sim(t, 0) + sim(t, t-1)) / 2`` with histogram intersection; None = missing."""
    first = hists[0]
    scores = []
    for t in range(1, len(hists)):
        cur, prev = hists[t], hists[t - 1]
        if cur is None or first is None:
            scores.append(0.0)
            continue
        s_first = float(np.minimum(cur, first).sum())
        s_prev = float(np.minimum(cur, prev).sum()) if prev is not None else 0.0
        scores.append(0.5 * (s_first + s_prev))
    return float(np.mean(scores)) if scores else 1.0


def subject_consistency(video, colours=None, window: float = 0.25) -> float:
    """Appearance consistency of each object (see the module doc); ``window`` = half-size / width."""
    v = as_uint8(video)
    f, h, w, _ = v.shape
    if not colours:
        return _consistency([colour_histogram(fr.reshape(-1, 3)) for fr in v])
    half = max(1, int(round(window * w)))
    per_object = []
    for rgb in colours:
        dist = np.sqrt(((v.astype(np.float32) - np.asarray(rgb, np.float32)) ** 2).sum(-1))
        hists: list[np.ndarray | None] = []
        for t in range(f):
            ys, xs = np.nonzero(dist[t] < COLOUR_THRESHOLD)
            if len(xs) == 0:
                hists.append(None)
                continue
            cx, cy = int(round(xs.mean())), int(round(ys.mean()))
            crop = v[t, max(0, cy - half):cy + half + 1, max(0, cx - half):cx + half + 1]
            hists.append(colour_histogram(crop.reshape(-1, 3)))
        per_object.append(_consistency(hists))
    return float(np.mean(per_object))


def background_consistency(video, mask: np.ndarray | None = None) -> float:
    """Colour-histogram consistency of the static region (whole frame without a mask)."""
    v = as_uint8(video)
    if mask is not None and not mask.any():
        return float("nan")
    return _consistency([colour_histogram(fr[mask] if mask is not None else fr.reshape(-1, 3)) for fr in v])


def static_mask(sample, margin: float = 2.0) -> np.ndarray:
    """``[H, W]`` True where no object of a testbed sample ever comes within ``margin`` px."""
    _, h, w, _ = sample.frames.shape
    ys = np.arange(h, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float64)[None, :] + 0.5
    free = np.ones((h, w), dtype=bool)
    for centres, radii in zip(sample.centres, sample.radii):
        for (cx, cy), r in zip(centres, radii):
            free &= (xs - cx) ** 2 + (ys - cy) ** 2 > (r + margin) ** 2
    return free


# --------------------------------------------------------------------------- BRISQUE


@lru_cache(maxsize=1)
def _brisque_model():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from brisque import BRISQUE
        return BRISQUE(url=False), None
    except Exception as e:  # not installed, or its import failed
        return None, f"brisque unavailable: {type(e).__name__}: {e}"


def brisque_status() -> tuple[bool, str]:
    model, why = _brisque_model()
    return (model is not None, why or "brisque 0.2.0 wheel (its SVM model ships inside the wheel)")


def brisque_score(frame: np.ndarray) -> float:
    """BRISQUE (lower is better, about 0..100) of one RGB uint8 frame.

    Calls the wheel's feature and SVM steps directly: its ``score()`` convenience method
    fails under NumPy >= 2.4 (it converts 1-element arrays with ``float``).
    """
    model, why = _brisque_model()
    if model is None:
        raise RuntimeError(why)
    cv2 = _cv2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.color  # a dependency of the brisque wheel: the grey conversion it was fitted with

        gray = skimage.color.rgb2gray(frame)
        full = model.calculate_brisque_features(gray, kernel_size=7, sigma=7 / 6)
        half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
        feats = np.concatenate([full, model.calculate_brisque_features(half, kernel_size=7, sigma=7 / 6)])
        flat = np.array([float(np.asarray(x, dtype=np.float64).reshape(-1)[0]) for x in feats])
        return float(model.calculate_image_quality_score(flat))


def imaging_quality_brisque(video, every: int = 4) -> dict:
    """Mean BRISQUE over every ``every``-th frame, raw and mapped to ``clip((100 - s) / 100, 0, 1)``."""
    ok, why = brisque_status()
    if not ok:
        return {"score": None, "raw": None, "reason": why}
    v = as_uint8(video)
    raw = float(np.mean([brisque_score(fr) for fr in v[::every]]))
    return {"score": float(np.clip((100.0 - raw) / 100.0, 0.0, 1.0)), "raw": raw, "reason": why}


# --------------------------------------------------------------------------- summary


def vbench_style(video, sample=None, with_brisque: bool = True) -> dict:
    """Every dimension of one video; ``sample`` (testbed) gives the static mask and object colours."""
    mask = static_mask(sample) if sample is not None else None
    if mask is not None and not mask.any():
        mask = None  # objects sweep the whole frame: fall back to every pixel
    colours = list(sample.colours) if sample is not None else None
    dims = {
        "subject_consistency": subject_consistency(video, colours),
        "background_consistency": background_consistency(video, mask),
        "temporal_flickering": temporal_flickering(video, mask),
        "motion_smoothness": motion_smoothness(video),
        "dynamic_degree": dynamic_degree(video),
    }
    out = {**dims, "average": float(np.mean([dims[k] for k in DIMENSIONS]))}
    if with_brisque:
        out["imaging_quality_brisque"] = imaging_quality_brisque(video)
    return out


def mean_dims(rows: list[dict]) -> dict:
    """Average per-video results of :func:`vbench_style` over videos."""
    out = {k: float(np.nanmean([r[k] for r in rows])) for k in (*DIMENSIONS, "average")}
    bq = [r["imaging_quality_brisque"] for r in rows if "imaging_quality_brisque" in r]
    if bq:
        raws = [b["raw"] for b in bq if b["raw"] is not None]
        out["imaging_quality_brisque"] = {
            "score": float(np.clip((100.0 - np.mean(raws)) / 100.0, 0.0, 1.0)) if raws else None,
            "raw": float(np.mean(raws)) if raws else None, "reason": bq[0]["reason"], "in_average": False}
    return out
