"""Per-expert runtime state: which timestep bin is active, and the per-video k/v cache.

One :class:`ExpertState` is shared by every quantized layer of an expert. A pre-forward
hook on the expert sets it once per transformer forward, so a layer's lookup of its clip
setting is one list index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TimestepBins:
    """Maps a diffusion timestep to a bin of one expert.

    The expert runs timesteps from ``t_start`` (noisiest) down to ``t_end``. A step's
    relative position is ``r = (t_start - t) / (t_start - t_end)`` clamped to [0, 1]; bin
    ``i`` holds ``edges[i-1] <= r < edges[i]``. Bins are defined on timesteps rather than
    step indices so that they do not depend on the step count or the scheduler.
    """

    t_start: float
    t_end: float
    edges: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.t_start > self.t_end:
            raise ValueError(f"t_start ({self.t_start}) must be above t_end ({self.t_end})")

    @property
    def num_bins(self) -> int:
        return len(self.edges) + 1

    def position(self, t: float) -> float:
        r = (self.t_start - float(t)) / (self.t_start - self.t_end)
        return min(max(r, 0.0), 1.0)

    def bin_of(self, t: float) -> int:
        r = self.position(t)
        return sum(1 for e in self.edges if r >= e)

    def to_dict(self) -> dict:
        return {"t_start": self.t_start, "t_end": self.t_end, "edges": list(self.edges)}

    @classmethod
    def from_dict(cls, d: dict) -> "TimestepBins":
        return cls(float(d["t_start"]), float(d["t_end"]), tuple(float(e) for e in d["edges"]))


@dataclass
class ExpertState:
    """Mutable state shared by the quantized layers of one expert."""

    bins: TimestepBins
    bin_index: int = 0
    # The context (text embedding tensor) of the current forward; identifies cond/uncond.
    context: torch.Tensor | None = None
    max_cached_contexts: int = 2
    _cache: dict = field(default_factory=dict)  # (context id) -> (context, {layer id: output})

    @classmethod
    def standalone(cls, num_bins: int) -> "ExpertState":
        edges = tuple((i + 1) / num_bins for i in range(num_bins - 1))
        return cls(TimestepBins(1000.0, 0.0, edges))

    @property
    def num_bins(self) -> int:
        return self.bins.num_bins

    def set_timestep(self, timestep: torch.Tensor | float) -> int:
        """Set the active bin from a forward's ``timestep`` (a scalar or one per sample)."""
        if isinstance(timestep, torch.Tensor):
            # Samples of a batch share the step in Wan pipelines; Wan2.2 TI2V passes one
            # timestep per token with 0 on the first frame, so the maximum is the step's t.
            t = float(timestep.max().item())
        else:
            t = float(timestep)
        self.bin_index = self.bins.bin_of(t)
        return self.bin_index

    def set_context(self, context: torch.Tensor | None) -> None:
        self.context = context

    # The cache holds a reference to the context tensor it was built for: an object that is
    # alive cannot be replaced by another at the same address, so identity plus the
    # tensor's version counter is a safe key.
    def _entry(self, create: bool):
        ctx = self.context
        if ctx is None:
            return None
        # Inference-mode tensors keep no version counter (and cannot be changed in place
        # outside inference mode); identity alone identifies them.
        key = (id(ctx), -1 if ctx.is_inference() else ctx._version)
        entry = self._cache.get(key)
        if entry is None and create:
            while len(self._cache) >= self.max_cached_contexts:
                self._cache.pop(next(iter(self._cache)))
            entry = self._cache[key] = (ctx, {})
        return entry

    def cache_get(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        entry = self._entry(create=False)
        if entry is None:
            return None
        hit = entry[1].get(id(layer))
        if hit is not None and hit[0] == tuple(x.shape):
            return hit[1]
        return None

    def cache_put(self, layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        entry = self._entry(create=True)
        if entry is not None:
            entry[1][id(layer)] = (tuple(x.shape), y)

    def clear_cache(self) -> None:
        self._cache.clear()
