"""Checks of user input shared by the CLI and the API, run before any model is loaded.

Every check raises :class:`InputError` (or ``FileExistsError`` for an output that is
already there) with a message that names the argument, the problem and the fix; the CLI
prints it on one line and exits 2. Argument names are given in their CLI spelling
(``--steps``) and the API keyword beside it, so one message serves both.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from wanquant.artifacts.checkpoint import is_wanquant_output
from wanquant.media import VIDEO_SUFFIXES
from wanquant.model.pipeline import SIZE_MULTIPLE, GenerationSettings


class InputError(ValueError):
    """A bad argument or input file, found before any work started."""


def positive_int(value, name: str, allow_none: bool = False) -> int | None:
    """``value`` as an int >= 1; ``name`` is how the user spelled the argument."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a whole number of at least 1, got {value!r}")
    return value


def check_settings(settings: GenerationSettings) -> GenerationSettings:
    """Sizes, frames, steps and guidance a Wan pipeline can run."""
    positive_int(settings.num_inference_steps, "--steps (num_inference_steps)")
    positive_int(settings.num_frames, "--frames (num_frames)")
    positive_int(settings.max_sequence_length, "max_sequence_length")
    for name, value in (("--height (height)", settings.height), ("--width (width)", settings.width)):
        positive_int(value, name)
        if value % SIZE_MULTIPLE:
            lower = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
            raise InputError(f"{name} must be a multiple of {SIZE_MULTIPLE} (the VAE's 8x downsampling times the "
                             f"2x2 patches), got {value}; use {lower} or {lower + SIZE_MULTIPLE}")
    for name, value in (("--guidance (guidance_scale)", settings.guidance_scale),
                        ("guidance_scale_2", settings.guidance_scale_2)):
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
            raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(settings.negative_prompt, str):
        raise InputError(f"--negative-prompt (negative_prompt) must be text, got {type(settings.negative_prompt).__name__}")
    return settings


def check_calibration_run(blocks_per_pass: int | None, reservoir_tokens: int, shards: int | None) -> None:
    positive_int(blocks_per_pass, "--blocks-per-pass (blocks_per_pass)", allow_none=True)
    positive_int(reservoir_tokens, "--reservoir-tokens (reservoir_tokens)")
    positive_int(shards, "--calib-shards (shards)", allow_none=True)


def check_blocks_left(skip_blocks: list[int], num_blocks: int) -> None:
    """A quantize run must leave at least one block to quantize."""
    bad = [b for b in skip_blocks if not -num_blocks <= b < num_blocks]
    if bad:
        raise InputError(f"--skip-blocks {bad} out of range: the model has {num_blocks} blocks "
                         f"(0..{num_blocks - 1}, or -1..-{num_blocks} from the end)")
    if len({b % num_blocks for b in skip_blocks}) >= num_blocks:
        raise InputError(f"--skip-blocks (precision.skip_blocks) {sorted(skip_blocks)} covers all {num_blocks} "
                         "blocks: nothing would be quantized; keep at least one block out of the list")


def check_prompt(prompt, where: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where} must be non-empty text, got {prompt!r}")
    return prompt


def check_backend(backend: str, device) -> None:
    """``fast`` needs CUDA; say so before a model is loaded, not in the first forward."""
    if backend == "fast" and not str(device).startswith("cuda"):
        raise InputError(f"--backend fast runs the Hopper FP8 kernels and needs a CUDA device, not {device!r}; "
                         "use --backend auto (picks the fastest available) or reference")


def writable_location(path: Path, what: str) -> Path:
    """The nearest existing directory at or above ``path``, after proving a file can be created there.

    ``os.access`` says yes to root on a read-only mount; creating a file does not lie.
    """
    d = path
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise InputError(f"{what} {path}: {d} is a file, not a directory; choose another output path")
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise InputError(f"{what} {path}: cannot write in {d} ({e.strerror}); choose an output path on a "
                         "writable location") from e
    return d


def check_video_out(path: str | Path) -> Path:
    """A video output path that will accept the video and its frame strip."""
    path = Path(path)
    suffixes = ", ".join(VIDEO_SUFFIXES)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(f"--out (out) {path}: name a video file ending in one of {suffixes} "
                         f"(got {path.suffix or 'no suffix'}), e.g. {path.with_suffix('.mp4')}")
    for p in (path, path.with_suffix(".png")):
        if p.is_dir():
            raise InputError(f"--out (out) {path}: {p} is a directory; give a file name such as {p / 'video.mp4'}")
    writable_location(path.parent, "--out (out)")
    return path


def check_checkpoint_out(path: str | Path, overwrite: bool) -> Path:
    """A checkpoint output that is absent, or replaceable with ``overwrite``."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; choose another --out (out_dir) or pass --overwrite")
        if not is_wanquant_output(path):
            raise InputError(f"{path} is not a wanquant checkpoint (not an empty directory, no wanquant "
                             "manifest.json): --overwrite replaces only wanquant checkpoints; choose another --out "
                             "or move it away yourself")
    writable_location(path.parent, "--out (out_dir)")
    return path


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a byte that is not UTF-8 is named with its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from e

