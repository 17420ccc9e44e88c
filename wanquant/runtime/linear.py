"""``W4A4Linear``: a quantized linear layer with a timestep-binned activation clip table.

The module stores the canonical parameters (:class:`QuantizedLinearParams`) as buffers,
so ``state_dict`` round-trips them unchanged. Its forward has three backends:

* ``reference``: fp32 PyTorch math (dequantize the weight, quantize-dequantize the
  activation): :func:`wanquant.method.layer.reference_forward`. The ground truth every
  kernel is tested against; what CPUs run.
* ``unpack_bf16``: the paper's way: unpack the weight to bf16 on every call, fake-quantize
  the activation, bf16 GEMM. Same numerics up to bf16 rounding; for comparison.
* ``fast``: the Hopper FP8 path from :mod:`wanquant.kernels` (exact MXFP4 numerics).

``backend="auto"`` picks ``fast`` where :func:`wanquant.kernels.dispatch.fast_path_status`
allows it, else ``reference`` on CPU and ``unpack_bf16`` on other GPUs; the choice and its
reason are logged once and shown by ``wanquant inspect``.

Layering: ``formats`` -> ``numerics`` -> ``method`` -> ``kernels`` / ``runtime`` (here): the
layer holds its weight and activation format objects and hands them to the dispatch.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from wanquant.formats import GroupFormat
from wanquant.method.layer import reference_forward
from wanquant.method.params import QuantizedLinearParams
from wanquant.runtime.state import ExpertState

log = logging.getLogger(__name__)

Backend = Literal["auto", "reference", "unpack_bf16", "fast"]
_BUFFERS = ("qweight", "wscales", "smooth", "l1", "l2", "bias", "clip_table")


class W4A4Linear(nn.Module):
    """``y = Wq Q(x / s; clip[bin]) + ((x / s) L1^T) L2^T + b`` with 4-bit ``Wq`` and ``Q``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        num_bins: int,
        wfmt: GroupFormat,
        afmt: GroupFormat,
        bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % wfmt.group_size or in_features % afmt.group_size:
            raise ValueError(f"in_features {in_features} must be divisible by the group sizes of "
                             f"{wfmt.describe()} and {afmt.describe()}")
        self.in_features, self.out_features = in_features, out_features
        self.wfmt, self.afmt = wfmt, afmt
        g = wfmt.group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("wscales", torch.zeros(out_features, in_features // g, dtype=wfmt.scale_dtype, device=device))
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device))
        self.register_buffer("l1", torch.zeros(rank, in_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("l2", torch.zeros(out_features, rank, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.bfloat16, device=device) if bias else None)
        clip = torch.tensor([[1.0, 0.0]] * num_bins, dtype=torch.float32, device=device)
        self.register_buffer("clip_table", clip)
        self.state = ExpertState.standalone(num_bins)
        self.backend: Backend = "auto"
        self.backend_reason = "not chosen yet (chosen at the first forward)"
        self._resolved: Backend | None = None
        self._fast = None
        self._clip_host: list[tuple[float, int]] = [(1.0, 0)] * num_bins
        self._load_hook = self.register_load_state_dict_post_hook(lambda module, keys: module.refresh())
        # Optional output cache for inputs that are the same at every step (cross-attn k/v).
        self.cache_static_input = False
        # With the fast path, move the canonical L1/L2 to host memory (0.27 GB per A14B expert).
        self.lowrank_to_host = True
        self.report: dict = {}

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_params(cls, params: QuantizedLinearParams, wfmt: GroupFormat, afmt: GroupFormat) -> "W4A4Linear":
        params.validate(wfmt)
        m = cls(
            params.in_features, params.out_features, params.rank, params.clip_table.shape[0], wfmt, afmt,
            bias=params.bias is not None, device=params.qweight.device,
        )
        for name in _BUFFERS:
            value = getattr(params, name)
            if value is not None:
                setattr(m, name, value.detach().clone(memory_format=torch.contiguous_format))
        m.report = dict(params.report)
        m.refresh()
        return m

    def to_params(self) -> QuantizedLinearParams:
        return QuantizedLinearParams(
            self.qweight, self.wscales, self.smooth, self.l1, self.l2, self.bias, self.clip_table, dict(self.report)
        )

    @property
    def rank(self) -> int:
        return self.l1.shape[0]

    @property
    def num_bins(self) -> int:
        return self.clip_table.shape[0]

    def refresh(self) -> None:
        """Re-read host-side copies after the buffers changed (load_state_dict, .to())."""
        table = self.clip_table.detach().float().cpu().tolist()
        self._clip_host = [(float(c), int(round(o))) for c, o in table]
        self._resolved, self._fast = None, None

    def set_backend(self, backend: Backend) -> None:
        self.backend, self._resolved, self._fast = backend, None, None

    def bind_state(self, state: ExpertState) -> None:
        """Share the expert's timestep-bin state (set once per transformer forward)."""
        if state.num_bins != self.num_bins:
            raise ValueError(f"expert has {state.num_bins} timestep bins but this layer's clip table has {self.num_bins}")
        self.state = state

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._resolved, self._fast = None, None  # device may have changed
        return out

    # ---- forward ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        if self.cache_static_input:
            hit = self.state.cache_get(self, x)
            if hit is not None:
                return hit
        clip_ratio, exp_offset = self._clip_host[self.state.bin_index]
        backend = self._resolve_backend(x.device)
        if backend == "fast":
            y = self._fast(x, clip_ratio, exp_offset)
        elif backend == "unpack_bf16":
            y = self.forward_unpack_bf16(x, clip_ratio, exp_offset)
        else:
            y = self.forward_reference(x, clip_ratio, exp_offset)
        if self.cache_static_input:
            self.state.cache_put(self, x, y)
        return y

    def _smoothed(self, x: torch.Tensor) -> torch.Tensor:
        # Multiply by the fp32 reciprocal: the kernels do exactly this, so codes match bit for bit.
        return x.float() * (1.0 / self.smooth)

    def forward_reference(self, x: torch.Tensor, clip_ratio: float, exp_offset: int) -> torch.Tensor:
        y = reference_forward(self.to_params(), x, self.wfmt, self.afmt, clip_ratio, exp_offset)
        return y.to(x.dtype)

    def forward_unpack_bf16(self, x: torch.Tensor, clip_ratio: float, exp_offset: int) -> torch.Tensor:
        xs = self._smoothed(x)
        xq = self.afmt.fake_quantize(xs, clip_ratio, exp_offset).to(torch.bfloat16)
        y = xq @ self.to_params().dequantized_weight(self.wfmt, torch.bfloat16).T
        if self.rank:
            y = y + (xs.to(torch.bfloat16) @ self.l1.to(xs.device).T) @ self.l2.to(xs.device).T
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def _resolve_backend(self, device: torch.device) -> Backend:
        if self._resolved is not None:
            return self._resolved
        choice, reason = self.backend, f"backend={self.backend} requested"
        if choice in ("auto", "fast"):
            ok, why = _fast_status(device, self.wfmt, self.afmt)
            if ok:
                from wanquant.kernels.dispatch import FastW4A4

                self._fast = FastW4A4.prepare(self.to_params(), self.afmt, device)
                choice, reason = "fast", why
                if self.lowrank_to_host:
                    # The fast path holds its own repacked low-rank operands; keep the
                    # canonical L1/L2 (for state_dict and other backends) in host memory.
                    self._buffers["l1"], self._buffers["l2"] = self.l1.cpu(), self.l2.cpu()
            elif choice == "fast":
                raise RuntimeError(f"fast W4A4 path unavailable: {why}; use backend='auto' or 'reference'")
            else:
                choice = "unpack_bf16" if device.type == "cuda" else "reference"
                reason = f"{choice} ({why})"
        self._resolved, self.backend_reason = choice, reason
        log.debug("W4A4Linear %dx%d: %s", self.out_features, self.in_features, reason)
        return choice

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bins={self.num_bins}, "
                f"w={self.wfmt.describe()}, a={self.afmt.describe()}, backend={self._resolved or self.backend}")


def _fast_status(device: torch.device, wfmt: GroupFormat, afmt: GroupFormat) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"device is {device.type}: fast path needs a CUDA GPU with FP8 tensor cores"
    try:
        from wanquant.kernels.dispatch import fast_path_status
    except ImportError as e:  # kernels not importable (no triton): stay on the reference path
        return False, f"kernels unavailable: {e}"
    return fast_path_status(device, wfmt, afmt)
