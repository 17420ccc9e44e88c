"""Entry points the runtime calls: whether the fast path applies, and the prepared layer.

:class:`FastW4A4` is built once per layer at load time. It keeps the weight packed
(4.25 bits per element) plus small per-row/per-channel vectors; every call runs

1. :func:`~wanquant.kernels.act_quant.act_quant`: one Triton kernel over ``x`` that writes
   e4m3 rows + row scales + the low-rank down projection;
2. :func:`~wanquant.kernels.weight_prep.expand_weight`: packed weight -> e4m3 rows in a
   scratch buffer shared by all layers on the device;
3. the FP8 GEMM with the low-rank up projection and bias: the fused Triton kernel
   (:func:`~wanquant.kernels.gemm.gemm_triton`) or cuBLAS ``_scaled_mm`` + ``addmm_``.

The backend defaults to :data:`DEFAULT_BACKEND`; ``WANQUANT_GEMM=triton|cublas``
overrides it (benchmarks/KERNEL_NOTES.md says which won and by how much).

Which formats the kernels implement is data next to them (:data:`FAST_FORMATS`, group
size :data:`~wanquant.kernels.act_quant.GROUP`); dispatch checks format objects by type.
Layering: ``formats`` -> ``numerics`` -> ``method`` -> ``kernels`` (here) / ``runtime``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from wanquant.formats import GroupFormat
from wanquant.formats.mxfp4 import MXFP4Format
from wanquant.kernels.act_quant import (
    GROUP,
    HAS_TRITON,
    act_quant,
    interpreting,
    lowrank_weights,
    pad_rows,
    padded_rank,
)
from wanquant.kernels.gemm import LR_SINGLE_MAX, GemmConfig, gemm_cublas, gemm_triton, lowrank_chunk_table
from wanquant.kernels.weight_prep import expand_weight, weight_row_exponents

if TYPE_CHECKING:
    from wanquant.method.params import QuantizedLinearParams

FAST_PATH_NAME = "hopper-fp8: triton act-quant + fused triton FP8 GEMM"
DEFAULT_BACKEND = "triton"
BACKENDS = ("triton", "cublas")
# Activation-kernel launches (block_m, block_k, num_warps, num_stages), fastest measured on
# an H100 (benchmarks/KERNEL_NOTES.md): 128-row blocks when that gives 1.5-3 blocks per SM,
# else 64-row blocks (more blocks for small M, shorter rows in flight for large M).
ACT_LAUNCH_LARGE = (128, 64, 8, 3)
ACT_LAUNCH_SMALL = (64, 128, 8, 3)
NSPLIT = 2  # low-rank activations as a bf16 hi/lo pair: ~fp32-accurate branch for ~1 % time
# The formats the kernels implement, for weights and activations alike (either MX scale
# rule), at group size GROUP. Only power-of-two group scales fold exactly into per-row
# FP8 scales (DESIGN.md section 4); every other format stays on the reference path.
FAST_FORMATS: tuple[type[GroupFormat], ...] = (MXFP4Format,)


def _describe(backend: str) -> str:
    if backend == "cublas":
        return "hopper-fp8: triton act-quant + cuBLAS FP8 rowwise"
    return FAST_PATH_NAME


def _format_problem(role: str, fmt: GroupFormat) -> str | None:
    """Why the kernels cannot run ``fmt`` as the ``role`` operand, or None."""
    if not isinstance(fmt, FAST_FORMATS):
        names = ", ".join(c.name for c in FAST_FORMATS)
        return (f"{role} format {fmt.describe()} stays on the reference path: the fast path implements {names} "
                "(power-of-two group scales fold exactly into per-row FP8 scales, DESIGN.md section 4)")
    if fmt.group_size != GROUP:
        return f"{role} group size {fmt.group_size}: the fast path needs MX group size {GROUP}"
    return None


def fast_path_status(device: torch.device, wfmt: GroupFormat, afmt: GroupFormat) -> tuple[bool, str]:
    """(True, description) when :class:`FastW4A4` can run a ``wfmt`` x ``afmt`` layer here, else (False, why)."""
    device = torch.device(device)
    problem = _format_problem("weight", wfmt) or _format_problem("activation", afmt)
    if problem:
        return False, problem
    if not HAS_TRITON:
        return False, "triton missing: install triton for the fast path"
    if device.type != "cuda":
        return False, f"no CUDA: device is {device.type}; the fast path needs a GPU with FP8 tensor cores"
    if not torch.cuda.is_available():
        return False, "no CUDA: torch.cuda.is_available() is False"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"sm_{major}{minor} < sm_89: no FP8 tensor cores"
    return True, _describe(_backend_choice())


def _backend_choice() -> str:
    backend = os.environ.get("WANQUANT_GEMM", DEFAULT_BACKEND)
    if backend not in BACKENDS:
        raise ValueError(f"WANQUANT_GEMM={backend!r}; use one of {BACKENDS}")
    return backend


# The GEMM tile: 128x256x128, 8 warps, 3 stages, 16-row-tile groups, split epilogue. Its
# variants measured within +-3 % of each other (run-to-run noise); see KERNEL_NOTES.md.
LAYER_GEMM_CONFIG = GemmConfig(group_m=16)


def act_launch_for(m: int, device: torch.device) -> tuple[int, int, int, int]:
    """Activation-kernel launch for ``m`` tokens (see ACT_LAUNCH_LARGE)."""
    blocks = -(-pad_rows(m) // ACT_LAUNCH_LARGE[0])
    sms = _sm_count(device)
    return ACT_LAUNCH_LARGE if 1.5 * sms <= blocks < 3 * sms else ACT_LAUNCH_SMALL


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


ACT_LAUNCH_ENV = "WANQUANT_ACT_LAUNCH"


def parse_act_launch(text: str) -> tuple[tuple[int, int, int, int], int | None]:
    """``"bm16-bk128-w4-s3"`` or ``"bm16-bk128-w4-s3-p2xSM"`` -> (launch, programs per SM or None)."""
    parts = text.strip().split("-")
    try:
        bm, bk, nw, ns = (int(p.removeprefix(pre)) for p, pre in zip(parts[:4], ("bm", "bk", "w", "s"), strict=True))
        per_sm = int(parts[4].removeprefix("p").removesuffix("xSM")) if len(parts) == 5 else None
        if len(parts) > 5 or min(bm, bk, nw, ns) < 1 or (per_sm is not None and per_sm < 1):
            raise ValueError
    except ValueError:
        raise ValueError(f"activation launch {text!r}: expected bm<rows>-bk<cols>-w<warps>-s<stages>[-p<n>xSM], "
                         "e.g. bm64-bk128-w8-s3 or bm16-bk128-w4-s3-p1xSM") from None
    return (bm, bk, nw, ns), per_sm


def act_plan(m: int, device: torch.device, launch: tuple[int, int, int, int] | None = None
             ) -> tuple[tuple[int, int, int, int], int | None]:
    """(launch, programs) of the activation kernel for ``m`` tokens: ``launch`` if given, else
    ``$WANQUANT_ACT_LAUNCH`` (benchmarks), else :func:`act_launch_for` with one program per row block."""
    if launch is not None:
        return launch, None
    env = os.environ.get(ACT_LAUNCH_ENV, "")
    if env:
        launch, per_sm = parse_act_launch(env)
        return launch, None if per_sm is None else per_sm * _sm_count(device)
    return act_launch_for(m, device), None


# Limits for the activation kernel's first pass when the low-rank branch is wide (LoRAs
# appended, DESIGN.md section 9): its fp32 accumulator [BM, 2 * R_pad] lives in registers,
# and each pipeline stage holds an x tile [BM, BK1] and an L1 tile [BK1, 2 * R_pad] (bf16)
# in shared memory (H100: 227 KB a block). The launches measured for rank <= 32 are within
# both limits, so they are unchanged.
ACT_ACC_REGS_PER_THREAD = 128
ACT_SMEM_BUDGET = 160 * 1024


def fit_act_launch(launch: tuple[int, int, int, int], r_pad: int) -> tuple[int, int, int, int, int]:
    """``(block_m, block_k, block_k_lr, num_warps, num_stages)``: ``launch`` shrunk to fit a rank-``r_pad`` branch.

    Halves block_m until the accumulator fits the register limit, then the first pass's K
    step (not below one MX group) and the stage count until its tiles fit the budget.
    """
    bm, bk, nw, ns = launch
    rw = 2 * max(r_pad, 16)
    while bm > 16 and bm * rw > ACT_ACC_REGS_PER_THREAD * 32 * nw:
        bm //= 2
    bk1 = bk

    def smem(bk1: int, ns: int) -> int:
        return ns * (bm * bk1 + bk1 * rw) * 2

    while bk1 > GROUP and smem(bk1, ns) > ACT_SMEM_BUDGET:
        bk1 //= 2
    while ns > 2 and smem(bk1, ns) > ACT_SMEM_BUDGET:
        ns -= 1
    return bm, bk, bk1, nw, ns


# One e4m3 scratch buffer per device, grown to the largest weight seen: weights are
# expanded into it right before their GEMM, so only one layer's FP8 copy exists at a time.
_SCRATCH: dict[str, torch.Tensor] = {}


def weight_scratch(device: torch.device, numel: int) -> torch.Tensor:
    """A float8_e4m3fn buffer of at least ``numel`` elements shared by all layers on ``device``."""
    key = str(device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(key, None)  # free the old one before allocating the larger one
        buf = torch.empty(numel, dtype=torch.float8_e4m3fn, device=device)
        _SCRATCH[key] = buf
    return buf[:numel]


class FastW4A4:
    """A quantized linear prepared for the Hopper FP8 path; call it like the layer.

    Holds (persistent): packed codes, E8M0 scales, per-row weight exponents and scales,
    1/smooth, (L1 diag(1/smooth))^T as hi|lo bf16 (padded), [L2|L2] (padded; times 2^-s_w
    for the Triton GEMM), bias. :meth:`set_lowrank` replaces the branch and bias alone
    (LoRAs appended to L1/L2, DESIGN.md section 9): the weight is not repacked.
    """

    def __init__(self) -> None:
        raise TypeError("use FastW4A4.prepare(params, act_format, device)")

    @classmethod
    def prepare(cls, params: "QuantizedLinearParams", act_format: GroupFormat, device,
                backend: str | None = None, gemm_config: GemmConfig | None = None) -> "FastW4A4":
        """Repack ``params`` for ``device`` (done once per layer, at load time); activations in ``act_format``."""
        device = torch.device(device)
        if params.wscales.dtype != MXFP4Format.scale_dtype:
            raise ValueError("FastW4A4 needs MXFP4 weights (uint8 E8M0 scales); int4 stays on the reference path")
        problem = _format_problem("activation", act_format)
        if problem:
            raise ValueError(problem)
        if device.type != "cuda" and not interpreting():
            raise RuntimeError("FastW4A4 needs a CUDA device (or TRITON_INTERPRET=1 for tests)")
        n, k = params.out_features, params.in_features
        if params.wscales.shape != (n, k // GROUP):
            raise ValueError(f"wscales shape {tuple(params.wscales.shape)} != {(n, k // GROUP)}: group size must be {GROUP}")
        self = object.__new__(cls)
        self.n, self.k, self.rank = n, k, params.rank
        self.act_format = act_format
        self.backend = backend or _backend_choice()
        self.gemm_config = gemm_config or LAYER_GEMM_CONFIG
        self.act_launch: tuple[int, int, int, int] | None = None  # None: act_launch_for(M)
        self.device = device
        self.qweight = params.qweight.to(device).contiguous()
        self.wscales = params.wscales.to(device).contiguous()
        self.s_w = weight_row_exponents(self.wscales).contiguous()
        self.w_row_scale = torch.exp2(self.s_w.float()).contiguous()
        # Multiply by the fp32 reciprocal, exactly as the reference layer does.
        self.inv_smooth = (1.0 / params.smooth.to(device=device, dtype=torch.float32)).contiguous()
        self.set_lowrank(params.l1, params.l2, params.bias)
        return self

    def set_lowrank(self, l1: torch.Tensor, l2: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Prepare the branch ``L1 [r, K]``, ``L2 [N, r]`` (bf16 or fp32, any rank) and the bias.

        Used at prepare time and whenever LoRAs change the branch; fp32 factors (a LoRA's
        ``strength * A diag(s)``) keep their precision into the hi|lo split of the folded L1.
        """
        if l1.shape[1] != self.k or l2.shape != (self.n, l1.shape[0]):
            raise ValueError(f"low-rank factors {tuple(l1.shape)}, {tuple(l2.shape)} do not fit a "
                             f"{self.n}x{self.k} layer")
        self.rank = l1.shape[0]
        self.bias = None if bias is None else bias.to(device=self.device, dtype=torch.bfloat16).contiguous()
        self.l1s, self.l2cat = self._lowrank_operands(l1, l2, self.device)
        self.lr_chunks = None
        if self.l2cat is not None and self.backend == "triton" and self.l2cat.shape[1] > LR_SINGLE_MAX:
            self.lr_chunks = lowrank_chunk_table(self.l2cat, self.gemm_config.block_n)

    def _lowrank_operands(self, l1: torch.Tensor, l2_in: torch.Tensor, device: torch.device):
        """``(L1 diag(1/smooth))^T`` as hi|lo bf16 ``[K, 2*R_pad]`` and ``[L2|L2]`` ``[N, NSPLIT*R_pad]``."""
        if self.rank == 0:
            return None, None
        r_pad = padded_rank(self.rank)
        # .float(), not .bfloat16(): bf16 factors (the checkpoint's) convert exactly either
        # way; fp32 ones (LoRA rows) keep their bits until the hi|lo split.
        l1s = lowrank_weights(l1.to(device=device, dtype=torch.float32), self.inv_smooth)
        l2 = torch.zeros(self.n, r_pad, dtype=torch.float32, device=device)
        l2[:, : self.rank] = l2_in.to(device=device, dtype=torch.float32)
        if self.backend == "triton":  # divided by the row scale: exact (power of two)
            l2 = l2 * torch.exp2(-self.s_w.float())[:, None]
        l2cat = torch.cat([l2] * NSPLIT, dim=1).to(torch.bfloat16).contiguous()
        return l1s, l2cat

    @staticmethod
    def extra_bytes(n: int, k: int, rank: int) -> int:
        """Device bytes :meth:`prepare` adds beside the layer's own codes, scales and bias (row
        exponents and scales, 1/smooth, the hi|lo folded L1 and [L2|L2]): what a memory plan
        counts per resident layer."""
        lowrank = (k + n) * NSPLIT * padded_rank(rank) * 2 if rank else 0
        return n * 4 + n * 4 + k * 4 + lowrank

    def memory_bytes(self) -> int:
        """Persistent device bytes this layer holds (the shared scratch is not counted)."""
        tensors = (self.qweight, self.wscales, self.s_w, self.w_row_scale, self.inv_smooth,
                   self.bias, self.l1s, self.l2cat, *(self.lr_chunks or ()))
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def quantize_input(self, x2: torch.Tensor, clip_ratio: float, exp_offset: int, gelu_input: bool = False):
        """Step 1 alone (benchmarks time it separately); ``gelu_input``: quantize the tanh GELU of ``x2``."""
        launch, programs = act_plan(x2.shape[0], self.device, self.act_launch)
        bm, bk, bk1, nw, ns = fit_act_launch(launch, padded_rank(self.rank))
        return act_quant(x2, self.inv_smooth, self.l1s, clip_ratio, exp_offset, self.act_format.scale_rule,
                         nsplit=NSPLIT, m_pad=pad_rows(x2.shape[0]), block_m=bm, block_k=bk,
                         num_warps=nw, num_stages=ns, block_k_lr=bk1, programs=programs, gelu_input=gelu_input)

    def expand_weight(self) -> torch.Tensor:
        """Step 2 alone: the e4m3 weight in the shared scratch buffer."""
        buf = weight_scratch(self.device, self.n * self.k).view(self.n, self.k)
        return expand_weight(self.qweight, self.wscales, self.s_w, out=buf)

    def gemm(self, aq, w8: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Step 3 alone: FP8 GEMM + low-rank + bias into ``out [M_pad, N]`` (bf16)."""
        if self.backend == "triton":
            return gemm_triton(aq.q, aq.row_scale, w8, self.w_row_scale, aq.lowrank, self.l2cat, self.bias,
                               out=out, config=self.gemm_config, lr_chunks=self.lr_chunks)
        return gemm_cublas(aq.q, aq.row_scale, w8, self.w_row_scale, aq.lowrank, self.l2cat, self.bias, out=out)

    def __call__(self, x: torch.Tensor, clip_ratio: float, exp_offset: int, gelu_input: bool = False) -> torch.Tensor:
        """``x [..., K]`` (bf16; other float dtypes are cast) -> ``y [..., N]`` in ``x``'s dtype
        (of ``gelu_tanh(x)`` with ``gelu_input``)."""
        if x.shape[-1] != self.k:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.k}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        aq = self.quantize_input(x2, clip_ratio, exp_offset, gelu_input)
        y = self.gemm(aq, self.expand_weight())[:m].reshape(*lead, self.n)
        return y if x.dtype == torch.bfloat16 else y.to(x.dtype)
