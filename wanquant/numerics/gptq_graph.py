"""A function of fixed-shape CUDA tensors replayed as one CUDA graph (GPTQ's block loop).

GPTQ's in-block column loop launches ~10-15 tiny kernels per column; at 128 columns a
block it is bound by the CPU's launch rate, not by the GPU. Captured once per shape and
replayed, the same kernels run with one launch. Replay reruns the captured kernels on
the captured buffers, so the values are those of the eager call, bit for bit.

Use: ``graph_for(key, fn, *inputs)`` returns the cached :class:`GraphRunner` of ``key``
(capturing ``fn`` on ``inputs`` the first time); ``runner.run(*inputs)`` copies the
inputs into its static buffers, replays and returns the static outputs, which the next
replay overwrites: consume or copy them first. ``fn`` must be capture-safe: no host
syncs (``.item()``, ``bool(tensor)``, data-dependent shapes), no new CPU->GPU copies.

Layering: torch only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

MAX_CACHED = 8  # graphs kept (LRU); each holds only its static buffers, a few MB at GPTQ's shapes
_WARMUP = 2  # eager runs before capture: lazy library / allocator initialisation must not be captured


class GraphRunner:
    """``fn(*inputs)`` captured once as a CUDA graph on static copies of ``inputs``."""

    def __init__(self, fn: Callable[..., Any], *inputs: torch.Tensor) -> None:
        self.device = inputs[0].device
        # Capture and replay use the *current* device's streams: make it the inputs' one.
        with torch.cuda.device(self.device):
            self.inputs = tuple(x.detach().clone(memory_format=torch.contiguous_format) for x in inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the current stream, as PyTorch's recipe asks
                for _ in range(_WARMUP):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # Our own stream (torch's shared default capture stream lives on the first device that used it);
            # thread_local: CUDA calls of other threads (memory samplers, loaders) do not break the capture.
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                self.outputs = fn(*self.inputs)

    def run(self, *inputs: torch.Tensor) -> Any:
        """Replay on ``inputs`` (same shapes and dtypes as at capture); the outputs are reused buffers."""
        with torch.cuda.device(self.device):
            for static, x in zip(self.inputs, inputs, strict=True):
                if x.shape != static.shape:  # copy_ would broadcast silently
                    raise ValueError(f"graph captured for input shape {tuple(static.shape)}, got {tuple(x.shape)}; "
                                     "its cache key must include every input shape")
                static.copy_(x)
            self.graph.replay()
        return self.outputs


_CACHE: OrderedDict[Hashable, GraphRunner] = OrderedDict()


def graph_for(key: Hashable, fn: Callable[..., Any], *inputs: torch.Tensor) -> GraphRunner:
    """The runner cached under ``key`` (which must determine ``fn`` and the inputs' shapes,
    dtypes and device), captured from ``fn(*inputs)`` if absent."""
    runner = _CACHE.get(key)
    if runner is None:
        try:
            runner = GraphRunner(fn, *inputs)
        except RuntimeError as e:
            raise RuntimeError(f"CUDA graph capture failed for {key!r}: {e}. The captured function must not sync "
                               "with the host (.item(), bool(tensor), data-dependent shapes); make it capture-safe "
                               "or switch the graph off (e.g. GPTQConfig.cuda_graph=False)") from e
        _CACHE[key] = runner
        if len(_CACHE) > MAX_CACHED:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return runner


def clear_cache() -> None:
    """Drop every cached graph (frees their static buffers)."""
    _CACHE.clear()
