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

LoRAs (DESIGN.md section 9) are more rank in the 16-bit branch: named
:class:`~wanquant.numerics.lora.LoraTerm` s live beside the canonical L1/L2 (which stay
untouched, so ``state_dict`` and unloading give the base layer bit for bit), every
backend runs :meth:`W4A4Linear.effective_params`, and a change re-prepares only the fast
path's branch and clears the expert's cached cross-attention k/v.

Layering: ``formats`` -> ``numerics`` -> ``method`` -> ``kernels`` / ``runtime`` (here): the
layer holds its weight and activation format objects and hands them to the dispatch.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from wanquant.formats import GroupFormat
from wanquant.kernels import ops
from wanquant.kernels.act_quant import row_absmax_reference
from wanquant.numerics.lora import LoraPiece, LoraTerm, check_pieces, extend_bias, extend_lowrank
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
        # The clip table in host memory as a tensor: what the compiled path hands the custom
        # op (a tensor is not guarded by value, so one compiled block serves every layer).
        self._clip_cpu = torch.tensor(self._clip_host, dtype=torch.float64)
        self._launch_key = ""  # the fast path's launch settings as ops.launch_key names them
        self._load_hook = self.register_load_state_dict_post_hook(lambda module, keys: module.refresh())
        # Optional output cache for inputs that are the same at every step (cross-attn k/v).
        self.cache_static_input = False
        # With the fast path, move the canonical L1/L2 to host memory (0.27 GB per A14B expert).
        self.lowrank_to_host = True
        # Compiled fast path: the activation's row maxima as graph ops, which Inductor fuses
        # into the kernel that writes the input (a norm, the GELU), so the activation kernel
        # reads it once, not twice (kernels.act_quant; wanquant.model.compile sets it).
        self.row_amax_in_graph = True
        # The layer's input is the input of a tanh GELU, which the layer applies first (on
        # the fast path inside the activation kernel, so the GELU's output is never written;
        # wanquant.model.fused_block moves a FeedForward's GELU here).
        self.gelu_input = False
        self.report: dict = {}
        # LoRAs by name, in load order (plain attributes: never in state_dict). Their factors
        # stay in host memory; the effective branch is built on the compute device.
        self.loras: dict[str, LoraTerm] = {}
        self._effective: tuple | None = None  # (device, l1, l2, bias) cache of effective_lowrank
        self._lowrank_stale = False  # the fast path's branch predates a LoRA change

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
        self._clip_cpu = torch.tensor(self._clip_host, dtype=torch.float64)
        self._resolved, self._fast, self._effective = None, None, None

    # ---- LoRA -----------------------------------------------------------------------
    # ``prepare=False`` defers re-preparing the fast path's branch, so that several changes
    # (a switch: unload one LoRA, load another) pay for one; :meth:`prepare_lowrank` (or
    # the next forward) does it.
    def set_lora(self, name: str, pieces: tuple[LoraPiece, ...], strength: float = 1.0, prepare: bool = True) -> None:
        """Add (or replace) the LoRA ``name``: ``y[rows] += strength (B A x + bias)`` per piece."""
        check_pieces(pieces, self.in_features, self.out_features)
        pieces = tuple(LoraPiece(p.row0, p.down.detach().cpu(), p.up.detach().cpu(),
                                 None if p.bias is None else p.bias.detach().cpu()) for p in pieces)
        self.loras[name] = LoraTerm(pieces, float(strength))
        self._loras_changed(prepare)

    def set_lora_strength(self, name: str, strength: float, prepare: bool = True) -> None:
        self.loras[name].strength = float(strength)
        self._loras_changed(prepare)

    def remove_lora(self, name: str, prepare: bool = True) -> None:
        if self.loras.pop(name, None) is not None:
            self._loras_changed(prepare)

    def prepare_lowrank(self) -> None:
        """Give the fast path the current branch (after changes made with ``prepare=False``)."""
        if self._lowrank_stale and self._fast is not None:
            self._fast.set_lowrank(*self.effective_lowrank(self._fast.device))
        self._lowrank_stale = False

    @property
    def lora_rank(self) -> int:
        return sum(t.rank for t in self.loras.values())

    def effective_lowrank(self, device: torch.device | str | None = None):
        """``(L1', L2', bias')`` with every LoRA appended (:func:`~wanquant.numerics.lora.extend_lowrank`).

        Without LoRAs (or all at strength 0, which add exact zeros): the canonical buffers
        themselves (bf16), so the base layer's numerics are untouched bit for bit (a wider
        GEMM could sum in another order). With LoRAs: fp32 on ``device`` (default: the
        canonical L1's), cached.
        """
        terms = [t for t in self.loras.values() if t.strength != 0.0]
        if not terms:
            return self.l1, self.l2, self.bias
        device = self.l1.device if device is None else torch.device(device)
        if self._effective is None or self._effective[0] != device:
            l1, l2 = extend_lowrank(self.l1, self.l2, self.smooth, terms, device)
            bias = extend_bias(self.bias, self.out_features, terms, device)
            self._effective = (device, l1, l2, bias)
        return self._effective[1:]

    def effective_params(self, device: torch.device | str | None = None) -> QuantizedLinearParams:
        """:meth:`to_params` with the LoRAs in the branch (and bias): what every backend computes."""
        p = self.to_params()
        p.l1, p.l2, p.bias = self.effective_lowrank(device)
        return p

    def _loras_changed(self, prepare: bool = True) -> None:
        self._effective = None
        # Cached cross-attention k/v were computed with the old branch.
        self.state.clear_cache()
        self._lowrank_stale = True
        if prepare:
            self.prepare_lowrank()

    def set_backend(self, backend: Backend) -> None:
        self.backend, self._resolved, self._fast = backend, None, None

    def bind_state(self, state: ExpertState) -> None:
        """Share the expert's timestep-bin state (set once per transformer forward)."""
        if state.num_bins != self.num_bins:
            raise ValueError(f"expert has {state.num_bins} timestep bins but this layer's clip table has {self.num_bins}")
        self.state = state

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.release_device_state()  # device may have changed
        return out

    # ---- offloading (wanquant.runtime.offload moves the buffers) ---------------------
    def host_resident_buffers(self, device: torch.device | str) -> tuple[str, ...]:
        """Buffers that stay in host memory while the layer runs on ``device``: the canonical
        L1/L2 when the fast path will hold its own repacked copy (``lowrank_to_host``)."""
        if self.lowrank_to_host and self.backend in ("auto", "fast"):
            if _fast_status(torch.device(device), self.wfmt, self.afmt)[0]:
                return ("l1", "l2")
        return ()

    def release_device_state(self) -> None:
        """Drop what was built from the buffers where they were (the fast path's repacked
        operands, the LoRA branch): the buffers are moving. The next forward rebuilds it, so
        an offloaded expert holds the fast path's extra copies only while it is resident."""
        self._resolved, self._fast, self._effective = None, None, None

    # ---- forward ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        if torch.compiler.is_compiling() and self._resolved == "fast":
            return self._forward_compiled(x)
        if self.cache_static_input:
            hit = self.state.cache_get(self, x)
            if hit is not None:
                return hit
        clip_ratio, exp_offset = self._clip_host[self.state.bin_index]
        backend = self._resolve_backend(x.device)
        if backend == "fast":
            if self._lowrank_stale:
                self.prepare_lowrank()
            y = self._fast(x, clip_ratio, exp_offset, self.gelu_input)
        else:
            xa = torch.nn.functional.gelu(x, approximate="tanh") if self.gelu_input else x
            if backend == "unpack_bf16":
                y = self.forward_unpack_bf16(xa, clip_ratio, exp_offset)
            else:
                y = self.forward_reference(xa, clip_ratio, exp_offset)
        if self.cache_static_input:
            self.state.cache_put(self, x, y)
        return y

    # ---- torch.compile ---------------------------------------------------------------
    def prepare_for_compile(self, device: torch.device | str) -> None:
        """Everything the traced forward must not do itself, done eagerly: choose the backend
        (and prepare the fast path) for ``device``, apply pending LoRA changes, name the
        launch settings. :mod:`wanquant.model.compile` calls it before each compiled forward."""
        if self._resolve_backend(torch.device(device)) == "fast":
            self.prepare_lowrank()
            self._launch_key = ops.launch_key(self._fast.gemm_config, self._fast.act_launch)

    def _forward_compiled(self, x: torch.Tensor, row_amax: torch.Tensor | None = None) -> torch.Tensor:
        """The fast path as one ``wanquant::w4a4_linear`` node (what ``torch.compile`` traces).

        ``row_amax``: the input's row maxima, computed by whatever wrote ``x`` (the previous
        layer's GELU epilogue, :meth:`forward_gelu_rowmax`); else, with
        ``row_amax_in_graph``, as graph ops.
        The static-input cache (cross-attention k/v) is skipped here: its lookup is Python
        bookkeeping a graph cannot hold, and recomputing the 512 text tokens costs about
        0.1 % of a forward at 480p.
        """
        f = self._fast
        idx, cnt = f.lr_chunks if f.lr_chunks is not None else (None, None)
        amax = row_amax
        if amax is None and self.row_amax_in_graph and not self.gelu_input:  # Inductor fuses it into x's kernel
            amax = row_absmax_reference(x.to(torch.bfloat16).reshape(-1, self.in_features), f.inv_smooth)
        return ops.w4a4_linear(x, f.qweight, f.wscales, f.s_w, f.w_row_scale, f.inv_smooth, f.l1s, f.l2cat, idx, cnt,
                               f.bias, self._clip_cpu, self.state.bin_index, self.afmt.scale_rule, f.backend,
                               self._launch_key, amax, self.gelu_input)

    def compiles_fast(self) -> bool:
        """Whether a traced forward runs the fast path (as ``wanquant::w4a4_linear``)."""
        return torch.compiler.is_compiling() and self._resolved == "fast"

    def forward_gelu_rowmax(self, x: torch.Tensor, next_layer: "W4A4Linear") -> tuple[torch.Tensor, torch.Tensor]:
        """``(gelu_tanh(self(x)), row maxima of it for next_layer)`` as one
        ``wanquant::w4a4_linear_gelu`` node: the GEMM's epilogue applies the GELU and finds
        the maxima that ``next_layer``'s activation kernel needs (pass them to its
        :meth:`forward_with_row_amax`). Traced forwards of fast layers only
        (:meth:`compiles_fast`)."""
        if not (self.compiles_fast() and next_layer.compiles_fast()):
            raise RuntimeError("forward_gelu_rowmax is the compiled fast path of two W4A4 layers")
        if self.gelu_input or next_layer.gelu_input:
            raise RuntimeError("the GELU is already in an activation kernel (gelu_in_activation): pick one place")
        f = self._fast
        idx, cnt = f.lr_chunks if f.lr_chunks is not None else (None, None)
        amax = None
        if self.row_amax_in_graph:
            amax = row_absmax_reference(x.to(torch.bfloat16).reshape(-1, self.in_features), f.inv_smooth)
        return ops.w4a4_linear_gelu(x, f.qweight, f.wscales, f.s_w, f.w_row_scale, f.inv_smooth, f.l1s, f.l2cat, idx,
                                    cnt, f.bias, self._clip_cpu, self.state.bin_index, self.afmt.scale_rule, f.backend,
                                    self._launch_key, amax, next_layer._fast.inv_smooth)

    def forward_with_row_amax(self, x: torch.Tensor, row_amax: torch.Tensor) -> torch.Tensor:
        """The traced fast forward on an input whose row maxima were found by its producer."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        if not self.compiles_fast():
            raise RuntimeError("forward_with_row_amax is the compiled fast path")
        return self._forward_compiled(x, row_amax)

    def _smoothed(self, x: torch.Tensor) -> torch.Tensor:
        # Multiply by the fp32 reciprocal: the kernels do exactly this, so codes match bit for bit.
        return x.float() * (1.0 / self.smooth)

    def forward_reference(self, x: torch.Tensor, clip_ratio: float, exp_offset: int) -> torch.Tensor:
        y = reference_forward(self.effective_params(x.device), x, self.wfmt, self.afmt, clip_ratio, exp_offset)
        return y.to(x.dtype)

    def forward_unpack_bf16(self, x: torch.Tensor, clip_ratio: float, exp_offset: int) -> torch.Tensor:
        xs = self._smoothed(x)
        xq = self.afmt.fake_quantize(xs, clip_ratio, exp_offset).to(torch.bfloat16)
        y = xq @ self.to_params().dequantized_weight(self.wfmt, torch.bfloat16).T
        l1, l2, bias = self.effective_lowrank(xs.device)
        if l1.shape[0]:
            y = y + (xs.to(torch.bfloat16) @ l1.to(xs.device, torch.bfloat16).T) @ l2.to(xs.device, torch.bfloat16).T
        if bias is not None:
            y = y + bias.to(xs.device, torch.bfloat16)
        return y.to(x.dtype)

    def _resolve_backend(self, device: torch.device) -> Backend:
        if self._resolved is not None:
            return self._resolved
        choice, reason = self.backend, f"backend={self.backend} requested"
        if choice in ("auto", "fast"):
            ok, why = _fast_status(device, self.wfmt, self.afmt)
            if ok:
                from wanquant.kernels.dispatch import FastW4A4

                self._fast = FastW4A4.prepare(self.effective_params(device), self.afmt, device)
                self._launch_key = ops.launch_key(self._fast.gemm_config, self._fast.act_launch)
                self._lowrank_stale = False
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
        loras = f", loras={list(self.loras)} (+rank {self.lora_rank})" if self.loras else ""
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bins={self.num_bins}, "
                f"w={self.wfmt.describe()}, a={self.afmt.describe()}, backend={self._resolved or self.backend}{loras}")


def _fast_status(device: torch.device, wfmt: GroupFormat, afmt: GroupFormat) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"device is {device.type}: fast path needs a CUDA GPU with FP8 tensor cores"
    try:
        from wanquant.kernels.dispatch import fast_path_status
    except ImportError as e:  # kernels not importable (no triton): stay on the reference path
        return False, f"kernels unavailable: {e}"
    return fast_path_status(device, wfmt, afmt)
