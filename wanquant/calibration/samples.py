"""Calibration samples: a JSONL manifest of (image, prompt) pairs, validated up front."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from wanquant.media import open_image
from wanquant.validate import InputError, check_prompt, read_text_lines


@dataclass
class CalibSample:
    image: Image.Image
    prompt: str
    seed: int
    source: str  # where it came from, for logs and the run fingerprint


def load_manifest(path: str | Path, base_seed: int = 0) -> list[CalibSample]:
    """Read ``{"image": path, "prompt": text, "seed"?: int}`` lines; image paths are
    relative to the manifest. Every line is checked and every image opened now, so a bad
    one fails before hours of calibration, not during them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration manifest {path} does not exist")
    samples = []
    for lineno, line in enumerate(read_text_lines(path), 1):
        if line.strip():
            samples.append(_parse_line(path, lineno, line, base_seed))
    return check_samples(samples, str(path))


def _parse_line(path: Path, lineno: int, line: str, base_seed: int) -> CalibSample:
    where = f"{path}:{lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(rec, dict) or "image" not in rec or "prompt" not in rec:
        raise InputError(f"{where}: each line needs \"image\" and \"prompt\" keys")
    check_prompt(rec["prompt"], f"{where}: \"prompt\"")
    if not isinstance(rec["image"], str) or not rec["image"].strip():
        raise InputError(f"{where}: \"image\" must be a file path (text), got {rec['image']!r}")
    seed = rec.get("seed", base_seed + lineno)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"{where}: \"seed\" must be a whole number, got {seed!r}")
    img_path = (path.parent / rec["image"]).resolve()
    if img_path.is_dir():
        raise InputError(f"{where}: \"image\" {rec['image']!r} is a directory ({img_path}); name an image file")
    return CalibSample(open_image(img_path, f"{where}: calibration image"), rec["prompt"], seed, f"{path.name}:{lineno}")


def check_samples(samples: list[CalibSample], where: str = "calibration set") -> list[CalibSample]:
    if not samples:
        raise InputError(f"{where} is empty: calibration needs at least one (image, prompt) sample")
    for i, s in enumerate(samples):
        check_prompt(s.prompt, f"{where}: sample {i} ({s.source}) prompt")
        if not isinstance(s.image, Image.Image):
            raise InputError(f"{where}: sample {i} ({s.source}) image must be a PIL image, got {type(s.image).__name__}")
    return samples


def samples_fingerprint(samples: list[CalibSample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.prompt.encode())
        h.update(str(s.seed).encode())
        h.update(s.image.tobytes()[:65536])
    return h.hexdigest()[:16]
