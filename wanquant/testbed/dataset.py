"""Procedural image-to-video clips with known ground truth.

Every clip is a static textured background with one or two moving shapes. The clip is
a pure function of its seed, so a sample can be regenerated anywhere (CPU or GPU
machine) from ``(split, index)`` alone. The prompt states what the first frame cannot:
how each object moves (direction, speed, spin/grow/shrink). The first frame is the I2V
condition image, so a model that ignores its prompt cannot know where objects go; that
is what the prompt-following evaluation measures.

Splits are disjoint by construction: each split owns its own seed range.

Conventions: frames are uint8 ``[F, H, W, 3]``; positions are ``(x, y)`` in pixels with
pixel ``(i, j)`` covering ``[j, j+1) x [i, i+1)`` (so its centre is ``(j+0.5, i+0.5)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# --------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Saturated object colours. Backgrounds below are muted, darker tones, so a pixel near one
# of these colours belongs to an object: that is what the trajectory metric relies on.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 210, 60),
    "blue": (50, 90, 255),
    "yellow": (245, 225, 40),
    "magenta": (230, 50, 220),
    "cyan": (40, 225, 230),
    "white": (250, 250, 250),
    "orange": (255, 120, 0),
}

# Background colour names -> (dark tone, light tone); patterns mix the two tones.
BACKGROUND_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "grey": ((60, 60, 60), (110, 110, 110)),
    "brown": ((80, 55, 35), (125, 95, 65)),
    "navy": ((25, 30, 70), (60, 70, 120)),
    "olive": ((65, 70, 30), (110, 115, 60)),
    "purple": ((60, 35, 75), (105, 75, 120)),
    "teal": ((25, 65, 65), (55, 105, 100)),
}

PATTERNS: tuple[str, ...] = ("striped", "checkered", "gradient", "noisy", "plain")

# Unit direction vectors in image coordinates (y grows downwards).
_DIAG = float(np.sqrt(0.5))
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-_DIAG, -_DIAG),
    "up-right": (_DIAG, -_DIAG),
    "down-left": (-_DIAG, _DIAG),
    "down-right": (_DIAG, _DIAG),
}

# Speeds and sizes are fractions of the frame width, so clips look alike at any resolution.
SPEEDS: dict[str, float] = {"slowly": 0.012, "quickly": 0.035}
SIZES: dict[str, float] = {"small": 0.09, "large": 0.15}
# Extra motions: name -> (rotation in radians per frame, scale factor reached at the end).
EXTRAS: dict[str, tuple[float, float]] = {
    "": (0.0, 1.0),
    "spinning": (0.25, 1.0),
    "growing": (0.0, 1.6),
    "shrinking": (0.0, 0.6),
}

# Word-level vocabulary of every prompt this module can write (the tokenizer's vocab).
PROMPT_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "moves", "stays", "still", "and", "while", "over", "background"]
        + list(SHAPES)
        + list(OBJECT_COLOURS)
        + list(BACKGROUND_COLOURS)
        + list(PATTERNS)
        + list(DIRECTIONS)
        + list(SPEEDS)
        + list(SIZES)
        + [e for e in EXTRAS if e]
    )
)

# Seed ranges of the splits: (first seed, number of samples). Disjoint by construction.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000),
    "calib": (10_000_000, 100_000),
    "eval": (20_000_000, 100_000),
}

DEFAULT_FRAMES = 17
DEFAULT_SIZE = 64

# ------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ObjectSpec:
    """One moving object. ``direction``/``speed`` are prompt words (speed None: still)."""

    shape: str
    colour: str
    size: str
    start: tuple[float, float]  # (x, y) as fractions of (width, height)
    direction: str | None = None
    speed: str | None = None
    extra: str = ""
    angle0: float = 0.0

    @property
    def rgb(self) -> tuple[int, int, int]:
        return OBJECT_COLOURS[self.colour]

    def phrase(self) -> str:
        """The object's part of the prompt."""
        head = f"a {self.size} {self.colour} {self.shape}"
        if self.speed is None:
            return f"{head} stays still"
        text = f"{head} moves {self.direction} {self.speed}"
        return f"{text} while {self.extra}" if self.extra else text


@dataclass(frozen=True)
class BackgroundSpec:
    """Static background: a pattern mixing the two tones of a colour name."""

    colour: str
    pattern: str
    period: float = 0.2  # stripe/checker period as a fraction of the width
    angle: float = 0.0  # stripe/gradient orientation in radians
    noise_seed: int = 0


@dataclass(frozen=True)
class ClipSpec:
    objects: tuple[ObjectSpec, ...]
    background: BackgroundSpec

    def prompt(self) -> str:
        things = " and ".join(o.phrase() for o in self.objects)
        bg = self.background
        return f"{things} over a {bg.colour} {bg.pattern} background"


@dataclass
class Sample:
    """A rendered clip with its prompt and ground truth.

    ``frames``: uint8 ``[F, H, W, 3]``; ``centres``: float ``[n_objects, F, 2]`` (x, y)
    in pixels; ``radii``: float ``[n_objects, F]`` circumradius in pixels.
    """

    split: str
    index: int
    seed: int
    spec: ClipSpec
    prompt: str
    frames: np.ndarray
    centres: np.ndarray
    radii: np.ndarray
    colours: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    def video_tensor(self):
        """Frames as a float tensor ``[F, 3, H, W]`` in [-1, 1] (the VAE's input range)."""
        import torch

        x = torch.from_numpy(self.frames).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0

    def first_frame(self):
        """The I2V condition image as a PIL image."""
        from PIL import Image

        return Image.fromarray(self.frames[0])


# ---------------------------------------------------------------------------- sampling


def _sample_object(rng: np.random.Generator, colour: str) -> ObjectSpec:
    shape = str(rng.choice(SHAPES))
    size = str(rng.choice(list(SIZES)))
    if rng.random() < 0.08:
        direction, speed, extra = None, None, ""
    else:
        direction = str(rng.choice(list(DIRECTIONS)))
        speed = str(rng.choice(list(SPEEDS)))
        extras = [e for e in EXTRAS if not (e == "spinning" and shape == "circle")]
        # Half the moving objects get an extra motion; a spinning circle would be invisible.
        extra = "" if rng.random() < 0.5 else str(rng.choice([e for e in extras if e]))
    start = (float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.0, 1.0)))
    # Only spinning objects start at a random angle: an axis-aligned square stays
    # distinguishable from a diamond (a square turned 45 degrees *is* one).
    angle0 = float(rng.uniform(0, 2 * np.pi)) if extra == "spinning" else 0.0
    return ObjectSpec(shape, colour, size, start, direction, speed, extra, angle0)


def sample_spec(rng: np.random.Generator) -> ClipSpec:
    """Draw a random clip description (one object 70 %, two objects 30 %)."""
    n_objects = 1 if rng.random() < 0.7 else 2
    colours = rng.choice(list(OBJECT_COLOURS), size=n_objects, replace=False)
    objects = tuple(_sample_object(rng, str(c)) for c in colours)
    background = BackgroundSpec(
        colour=str(rng.choice(list(BACKGROUND_COLOURS))),
        pattern=str(rng.choice(PATTERNS)),
        period=float(rng.uniform(0.15, 0.35)),
        angle=float(rng.choice([0.0, np.pi / 2, np.pi / 4, 3 * np.pi / 4])),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )
    return ClipSpec(objects, background)


# ---------------------------------------------------------------------------- geometry


def object_track(
    obj: ObjectSpec, num_frames: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres ``[F, 2]``, circumradii ``[F]`` and angles ``[F]`` of an object.

    Objects bounce elastically off the frame edges so that they stay fully visible:
    their centre is reflected back into ``[r, size - r]`` after every step.
    """
    scale_end = EXTRAS[obj.extra][1]
    spin = EXTRAS[obj.extra][0]
    t = np.arange(num_frames, dtype=np.float64)
    r0 = SIZES[obj.size] * width
    radii = r0 * (1.0 + (scale_end - 1.0) * t / max(num_frames - 1, 1))
    r_max = float(radii.max())
    lo = np.array([r_max, r_max])
    hi = np.array([width - r_max, height - r_max])
    pos = lo + np.array(obj.start) * (hi - lo)
    if obj.speed is None:
        vel = np.zeros(2)
    else:
        vel = np.array(DIRECTIONS[obj.direction]) * SPEEDS[obj.speed] * width
    centres = np.empty((num_frames, 2))
    for f in range(num_frames):
        centres[f] = pos
        pos = pos + vel
        # Reflect at the walls (the largest radius keeps growing objects inside too).
        below, above = pos < lo, pos > hi
        pos = np.where(below, 2 * lo - pos, pos)
        pos = np.where(above, 2 * hi - pos, pos)
        vel = np.where(below | above, -vel, vel)
    angles = obj.angle0 + spin * t
    return centres, radii, angles


def _signed_distance(shape: str, lx: np.ndarray, ly: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Approximate signed distance (pixels) to a shape of circumradius r, local coords.

    Every shape is centrally symmetric about its centre or (triangle) has its centroid
    there, so a shape's pixel centroid is its centre: the ground-truth position.
    """
    if shape == "circle":
        return np.sqrt(lx**2 + ly**2) - r
    if shape == "square":
        return np.maximum(np.abs(lx), np.abs(ly)) - r * _DIAG
    if shape == "diamond":
        return (np.abs(lx) + np.abs(ly) - r) * _DIAG
    if shape == "triangle":
        # Equilateral triangle, inradius r/2; outward edge normals 120 degrees apart.
        d = None
        for k in range(3):
            a = np.pi / 2 + k * 2 * np.pi / 3
            e = lx * np.cos(a) + ly * np.sin(a)
            d = e if d is None else np.maximum(d, e)
        return d - r / 2
    raise ValueError(f"unknown shape {shape!r}")


def object_coverage(
    shape: str, centres: np.ndarray, radii: np.ndarray, angles: np.ndarray, height: int, width: int
) -> np.ndarray:
    """Anti-aliased coverage ``[F, H, W]`` in [0, 1] of a shape along its track."""
    ys = np.arange(height, dtype=np.float64)[None, :, None] + 0.5
    xs = np.arange(width, dtype=np.float64)[None, None, :] + 0.5
    dx = xs - centres[:, 0, None, None]
    dy = ys - centres[:, 1, None, None]
    c = np.cos(angles)[:, None, None]
    s = np.sin(angles)[:, None, None]
    lx, ly = c * dx + s * dy, -s * dx + c * dy
    sd = _signed_distance(shape, lx, ly, radii[:, None, None])
    return np.clip(0.5 - sd, 0.0, 1.0)


def render_background(bg: BackgroundSpec, height: int, width: int) -> np.ndarray:
    """Float ``[H, W, 3]`` background in 0..255."""
    dark, light = (np.array(c, dtype=np.float64) for c in BACKGROUND_COLOURS[bg.colour])
    ys = (np.arange(height)[:, None] + 0.5) / width
    xs = (np.arange(width)[None, :] + 0.5) / width
    u = xs * np.cos(bg.angle) + ys * np.sin(bg.angle)
    if bg.pattern == "striped":
        mix = (np.floor(u / (bg.period / 2)) % 2).astype(np.float64)
    elif bg.pattern == "checkered":
        mix = ((np.floor(xs / (bg.period / 2)) + np.floor(ys / (bg.period / 2))) % 2).astype(np.float64)
    elif bg.pattern == "gradient":
        mix = (u - u.min()) / max(u.max() - u.min(), 1e-9)
    elif bg.pattern == "noisy":
        mix = _value_noise(bg.noise_seed, height, width)
    elif bg.pattern == "plain":
        mix = np.full((height, width), 0.5)
    else:
        raise ValueError(f"unknown pattern {bg.pattern!r}")
    mix = np.broadcast_to(mix, (height, width))[..., None]
    return dark * (1.0 - mix) + light * mix


def _value_noise(seed: int, height: int, width: int, cells: int = 6) -> np.ndarray:
    """Smooth noise in [0, 1]: a random coarse grid, bilinearly upsampled."""
    grid = np.random.default_rng(seed).random((cells + 1, cells + 1))
    gy = (np.arange(height) + 0.5) / height * cells
    gx = (np.arange(width) + 0.5) / width * cells
    y0, x0 = np.floor(gy).astype(int), np.floor(gx).astype(int)
    fy, fx = (gy - y0)[:, None], (gx - x0)[None, :]
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def render_clip(
    spec: ClipSpec, num_frames: int = DEFAULT_FRAMES, height: int = DEFAULT_SIZE, width: int = DEFAULT_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a clip: (frames uint8 [F,H,W,3], centres [n,F,2], radii [n,F])."""
    canvas = np.broadcast_to(render_background(spec.background, height, width), (num_frames, height, width, 3))
    canvas = canvas.copy()
    centres, radii = [], []
    for obj in spec.objects:
        c, r, a = object_track(obj, num_frames, height, width)
        alpha = object_coverage(obj.shape, c, r, a, height, width)[..., None]
        canvas = canvas * (1.0 - alpha) + np.array(obj.rgb, dtype=np.float64) * alpha
        centres.append(c)
        radii.append(r)
    frames = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return frames, np.stack(centres), np.stack(radii)


# ------------------------------------------------------------------------------ splits


def split_seed(split: str, index: int) -> int:
    """Seed of sample ``index`` of ``split``; raises outside the split's range."""
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    first, size = SPLITS[split]
    if not 0 <= index < size:
        raise IndexError(f"index {index} outside split {split!r} (size {size})")
    return first + index


def get_sample(
    split: str,
    index: int,
    num_frames: int = DEFAULT_FRAMES,
    height: int = DEFAULT_SIZE,
    width: int = DEFAULT_SIZE,
) -> Sample:
    """Sample ``index`` of ``split``: deterministic, a pure function of its seed."""
    seed = split_seed(split, index)
    spec = sample_spec(np.random.default_rng(seed))
    frames, centres, radii = render_clip(spec, num_frames, height, width)
    return Sample(split, index, seed, spec, spec.prompt(), frames, centres, radii, [o.rgb for o in spec.objects])


def list_samples(split: str, count: int, start: int = 0, **render_kwargs) -> list[Sample]:
    """Samples ``start .. start+count-1`` of a split."""
    return [get_sample(split, i, **render_kwargs) for i in range(start, start + count)]


# ----------------------------------------------------------------------------- metrics


def to_uint8_frames(video) -> np.ndarray:
    """Convert a video to uint8 ``[F, H, W, 3]``.

    Accepts uint8 ``[F,H,W,3]``, float ``[F,H,W,3]`` in [0,1] (the pipeline's ``np``
    output) or a float tensor ``[F,3,H,W]`` in [-1,1].
    """
    if hasattr(video, "detach"):
        v = video.detach().float().cpu().numpy()
        if v.ndim == 4 and v.shape[1] == 3 and v.shape[-1] != 3:
            v = np.transpose((v + 1.0) / 2.0, (0, 2, 3, 1))
        video = v
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video
    return np.clip(np.rint(video * 255.0), 0, 255).astype(np.uint8)


def colour_centroids(frames: np.ndarray, rgb: Sequence[int], threshold: float = 70.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame centroid ``[F, 2]`` (x, y) of pixels within ``threshold`` of a colour.

    Returns the centroids and a boolean ``[F]`` telling which frames had any such pixel
    (centroids of the others are NaN). The background palette is at least 113 away from
    every object colour, so the default threshold separates them.
    """
    f = to_uint8_frames(frames).astype(np.float32)
    dist = np.sqrt(((f - np.asarray(rgb, dtype=np.float32)) ** 2).sum(-1))
    mask = (dist < threshold).astype(np.float64)
    count = mask.sum(axis=(1, 2))
    ys = np.arange(mask.shape[1]) + 0.5
    xs = np.arange(mask.shape[2]) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (mask.sum(1) * xs).sum(-1) / count
        cy = (mask.sum(2) * ys).sum(-1) / count
    return np.stack([cx, cy], -1), count > 0


def trajectory_error(frames, sample: Sample, skip_first: bool = True) -> dict[str, float]:
    """Object-trajectory error of a video against a sample's ground truth.

    For each object, the centroid of pixels of its colour is compared with the true
    centre, in pixels. Frames where the colour is absent count a penalty of a quarter of
    the frame width (an object that vanished is as wrong as a far-off one). Frame 0 is
    the condition image and is skipped by default.
    """
    frames = to_uint8_frames(frames)
    start = 1 if skip_first else 0
    width = frames.shape[2]
    penalty = width / 4.0
    errors, missing = [], []
    for rgb, centres in zip(sample.colours, sample.centres):
        found, ok = colour_centroids(frames[start:], rgb)
        d = np.linalg.norm(found - centres[start : start + len(found)], axis=-1)
        errors.append(np.where(ok, np.minimum(d, 2 * penalty), penalty))
        missing.append(~ok)
    err = np.concatenate(errors)
    return {
        "traj_err_px": float(err.mean()),
        "traj_err_rel": float(err.mean() / width),
        "missing_frac": float(np.concatenate(missing).mean()),
    }
