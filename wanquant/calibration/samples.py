"""Calibration samples: a JSONL manifest of (image, prompt) pairs, validated up front."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from wanquant.media import open_image


@dataclass
class CalibSample:
    image: Image.Image
    prompt: str
    seed: int
    source: str  # where it came from, for logs and the run fingerprint


def load_manifest(path: str | Path, base_seed: int = 0) -> list[CalibSample]:
    """Read ``{"image": path, "prompt": text, "seed"?: int}`` lines; image paths are
    relative to the manifest. Every image is opened now, so a bad one fails before hours
    of calibration, not during them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration manifest {path} does not exist")
    samples = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
        if not isinstance(rec, dict) or "image" not in rec or "prompt" not in rec:
            raise ValueError(f"{path}:{lineno}: each line needs \"image\" and \"prompt\" keys")
        img_path = (path.parent / rec["image"]).resolve()
        samples.append(CalibSample(open_image(img_path, "calibration image"), str(rec["prompt"]), int(rec.get("seed", base_seed + lineno)),
                                   f"{path.name}:{lineno}"))
    return check_samples(samples, str(path))


def check_samples(samples: list[CalibSample], where: str = "calibration set") -> list[CalibSample]:
    if not samples:
        raise ValueError(f"{where} is empty: calibration needs at least one (image, prompt) sample")
    return samples


def samples_fingerprint(samples: list[CalibSample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.prompt.encode())
        h.update(str(s.seed).encode())
        h.update(s.image.tobytes()[:65536])
    return h.hexdigest()[:16]
