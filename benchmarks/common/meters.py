"""Meters of GPU memory and time: per-stage peaks, synchronised forward timings, profiles.

On a CPU every memory figure is 0 and timings are plain wall time, so dry runs exercise
the same code.
"""

from __future__ import annotations

import gc
import time
from typing import Callable

import torch
from torch import nn

GB = 1e9


def cuda_sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (no-op off CUDA): timings then cover the kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak allocated memory on ``device`` since the last reset, in GB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def free(*_) -> None:
    """Collect garbage and return cached blocks, so the next stage starts from live tensors only."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Meter:
    """Per-stage peak memory (reset between stages), resident memory at stage start, time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.stages: dict[str, dict] = {}
        self.current: str | None = None
        self.t0 = 0.0
        self.resident0 = 0

    def sync(self) -> None:
        cuda_sync(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def enter(self, stage: str | None) -> None:
        if stage is not None and stage == self.current:
            return
        self.sync()
        now = time.perf_counter()
        if self.current is not None:
            peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else 0
            reserved = torch.cuda.max_memory_reserved(self.device) if self.cuda else 0
            self.stages[self.current] = {"peak_allocated": peak, "peak_reserved": reserved,
                                         "resident_at_start": self.resident0, "seconds": now - self.t0}
        self.current = stage
        if stage is not None:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            self.resident0 = self.allocated()
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        self.enter(None)


class ForwardTimer:
    """CUDA-synchronised wall time of every expert forward, with its timestep.

    The first forward switches ``meter`` to the stage ``"denoising"``.
    """

    def __init__(self, meter: Meter):
        self.meter = meter
        self.records: list[dict] = []
        self.handles = []
        self._t0 = 0.0

    def attach(self, model: nn.Module, role: str) -> None:
        def pre(module, args, kwargs):
            if self.meter.current != "denoising" and self.meter.current is not None:
                self.meter.enter("denoising")
            self.meter.sync()
            self._t0 = time.perf_counter()

        def post(module, args, kwargs, output):
            self.meter.sync()
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
            self.records.append({"expert": role, "timestep": t, "seconds": time.perf_counter() - self._t0})

        self.handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(model.register_forward_hook(post, with_kwargs=True))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def steps(self) -> list[dict]:
        """Group the forwards of one step (same expert and timestep): the cond+uncond pair."""
        out: list[dict] = []
        for r in self.records:
            if out and out[-1]["expert"] == r["expert"] and out[-1]["timestep"] == r["timestep"]:
                out[-1]["seconds"] += r["seconds"]
                out[-1]["forwards"] += 1
            else:
                out.append(dict(r, forwards=1))
        return out


def wrap_method(obj, name: str, before: Callable[[], None]) -> Callable[[], None]:
    """Call ``before()`` ahead of every ``obj.name(...)`` (e.g. to switch a meter's stage);
    returns the function that undoes it."""
    orig = getattr(obj, name)

    def wrapper(*args, **kwargs):
        before()
        return orig(*args, **kwargs)

    setattr(obj, name, wrapper)
    return lambda: obj.__dict__.pop(name, None)


# ---------------------------------------------------------------------------------------
# kernel-time profiles
def kernel_us(event) -> float:
    """An averaged profiler event's own GPU time in microseconds (the attribute was renamed
    from ``self_cuda_time_total`` to ``self_device_time_total`` across torch versions)."""
    us = getattr(event, "self_device_time_total", None)
    return getattr(event, "self_cuda_time_total", 0.0) if us is None else us


def kernel_category(name: str) -> str:
    """The bucket a CUDA kernel's time is reported under, from its name."""
    n = name.lower()
    if "act_quant" in n:
        return "w4a4 act-quant (triton)"
    if "expand" in n and "kernel" in n:
        return "w4a4 weight expand (triton)"
    if "fp8_gemm" in n:
        return "w4a4 FP8 GEMM (triton)"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "scaled_mm")):
        return "cuBLAS GEMM"
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    if any(k in n for k in ("norm", "reduce")):
        return "norm/reduce"
    return "elementwise/other"


def profile_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> dict:
    """GPU kernel time of one expert forward by category (torch.profiler, CUDA activity only)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():  # one untimed forward first (this setting's kernels, allocator state)
        model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.no_grad():
            model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cats: dict[str, float] = {}
    kernels: dict[str, list] = {}
    for e in prof.key_averages():
        us = kernel_us(e)
        if not us:
            continue
        cat = kernel_category(e.key)
        cats[cat] = cats.get(cat, 0.0) + us / 1e6
        kernels[e.key] = [us / 1e6, e.count, cat]
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    return {"wall_s_profiled": wall, "kernel_s": sum(cats.values()),
            "by_category_s": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": k[:120], "seconds": v[0], "count": v[1], "category": v[2]} for k, v in top]}
