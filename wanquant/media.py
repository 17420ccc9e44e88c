"""Images and videos in and out: open a first frame, frames to uint8, MP4 and frame strips.

Pure numpy / Pillow / imageio: no model knowledge. Frames are ``[F, H, W, 3]``, uint8 or
floats in [0, 1] (the pipeline's ``output_type="np"``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm")


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """An RGB image from a PNG/JPEG file, with a clear error for a missing or unreadable one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}; use a PNG or JPEG file") from e


def to_uint8(frames) -> np.ndarray:
    """uint8 frames; floats are taken as [0, 1] and rounded half up."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return arr


def write_video(frames, path: str | Path, fps: int = 16) -> Path:
    """Write frames [F, H, W, 3] as MP4 (H.264 through the ffmpeg imageio-ffmpeg bundles)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(frames)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    # macro_block_size=1 keeps odd testbed sizes; yuv420p keeps browsers able to play it.
    with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1, quality=8,
                            pixelformat="yuv420p") as w:
        for f in arr:
            w.append_data(f)
    tmp.replace(path)
    return path


def write_frame_strip(frames, path: str | Path, max_frames: int = 8) -> Path:
    """A PNG of evenly spaced frames side by side."""
    arr = to_uint8(frames)
    idx = np.linspace(0, len(arr) - 1, num=min(max_frames, len(arr))).round().astype(int)
    strip = np.concatenate([arr[i] for i in idx], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).save(path)
    return path
