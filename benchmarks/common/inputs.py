"""Seeded random inputs for runs whose content does not matter (timing, memory, scaling)."""

from __future__ import annotations

import numpy as np

# Prompt words of the random calibration samples (a subset of the testbed's vocabulary).
WORDS = "a red blue green ball square circle moves left right up down slowly quickly over the grass sky".split()


def random_image(height: int, width: int, seed: int = 0):
    """A PIL image of uniform random RGB noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_calib_samples(n: int, height: int, width: int) -> list:
    """``n`` calibration samples: noise images, 8 random words each, seeds 1000.. (the same every call)."""
    from PIL import Image

    from wanquant.calibration.samples import CalibSample

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        prompt = " ".join(rng.choice(WORDS, 8))
        out.append(CalibSample(img, prompt, 1000 + i, f"bench:{i}"))
    return out
