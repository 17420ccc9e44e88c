"""Images and videos in and out: open a first frame, frames to uint8, MP4 and frame strips.

Pure numpy / Pillow / imageio: no model knowledge. Frames are ``[F, H, W, 3]``, uint8 or
floats in [0, 1] (the pipeline's ``output_type="np"``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Video containers wanquant writes, with the codec each gets (WebM holds only VP8/VP9/AV1).
VIDEO_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".webm": "libvpx-vp9"}
VIDEO_SUFFIXES = tuple(VIDEO_CODECS)


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
    """Write frames [F, H, W, 3] as a video (H.264, VP9 for .webm, through the ffmpeg that
    imageio-ffmpeg bundles); atomic: nothing is left at ``path`` or beside it on failure."""
    import imageio.v2 as imageio

    path = Path(path)
    codec = VIDEO_CODECS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"{path}: write a video as one of {', '.join(VIDEO_SUFFIXES)}, not {path.suffix or 'no suffix'}")
    arr = to_uint8(frames)

    def write(tmp: Path) -> None:
        # macro_block_size=1 keeps odd testbed sizes; yuv420p keeps browsers able to play it.
        with imageio.get_writer(tmp, fps=fps, codec=codec, macro_block_size=1, quality=8,
                                pixelformat="yuv420p", ffmpeg_log_level="error") as w:
            for f in arr:
                w.append_data(f)
        if tmp.stat().st_size == 0 or not _has_video_stream(tmp):
            raise OSError(f"ffmpeg wrote no video to {path}")

    return _atomic(path, path.with_name(path.stem + ".tmp" + path.suffix), write)


def _has_video_stream(path: Path) -> bool:
    """ffmpeg can leave a header-only file behind on some errors without raising."""
    import imageio.v2 as imageio

    try:
        with imageio.get_reader(path) as r:
            r.get_data(0)
        return True
    except (OSError, IndexError, RuntimeError):
        return False


def write_frame_strip(frames, path: str | Path, max_frames: int = 8) -> Path:
    """A PNG of evenly spaced frames side by side (atomic)."""
    arr = to_uint8(frames)
    idx = np.linspace(0, len(arr) - 1, num=min(max_frames, len(arr))).round().astype(int)
    strip = np.concatenate([arr[i] for i in idx], axis=1)
    path = Path(path)
    return _atomic(path, path.with_name(path.stem + ".tmp" + path.suffix),
                   lambda tmp: Image.fromarray(strip).save(tmp))


def _atomic(path: Path, tmp: Path, write) -> Path:
    """``write(tmp)`` then rename it to ``path``; the temporary file never outlives a failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
