"""8-bit attention for Hopper (sm_90): INT8 Q.K^T, FP8 P.V (SageAttention2's recipe).

Non-causal softmax attention ``softmax(Q K^T * scale) V`` for inputs laid out as
``[B, S, H, D]`` (what diffusers' attention dispatcher passes; ``[B, H, S, D]`` too),
head_dim D a power of two in [32, 256]. Two steps:

1. **K/V pre-pass** (:func:`quantize_kv`, two Triton kernels; memory-bound: about 2 GB
   of traffic at 32,760 tokens, expected ~1 ms next to ~25 ms of attention):

   * K is *smoothed*: its mean over tokens (per batch, head, channel) is subtracted.
     This is exact for softmax: ``q . (k - mu) = q . k - q . mu`` shifts every score of a
     query row by the same amount. It removes the common offset that post-RMSNorm keys
     carry, so the INT8 grid resolves what differs between keys.
   * K is quantized to INT8 per block of :data:`K_BLOCK` tokens (one fp32 scale per
     block, per head): a block of keys is one tile of the main loop, so its scale is a
     scalar there and costs nothing per score.
   * V is *smoothed* the same way (its channel mean is added back after the softmax,
     exact because the weights sum to one) and quantized to FP8 e4m3 with one scale per
     channel (per head): ``V8 = (V - mu_v) * 448 / colmax|V - mu_v|``. V is written
     transposed, ``[B*H, D, S_pad]``: Hopper's FP8 tensor-core instruction (wgmma) needs
     both operands K-major, and for P.V the reduction runs over tokens.

2. **Main kernel** (:func:`attention_prepared`), FlashAttention-2 style, one program per
   ``BLOCK_M`` queries of one head:

   * Q is quantized in the prologue, INT8 per token (finer than SageAttention2's
     per-block Q, and free: its scale multiplies a per-row vector that exists anyway);
     the softmax scale and log2(e) are folded into that scale. (``q_prepass`` configs
     quantize Q in a pre-pass kernel instead and load INT8 Q like K: same numbers.)
   * scores = int32 ``tl.dot`` of INT8 Q and K tiles, exact. The int32 -> fp32
     conversion uses the bit trick ``as_float(i + 0x4B400000) - 1.5 * 2^23`` (exact for
     ``|i| < 2^22``, which holds for D <= 256): an integer add and a float subtract
     instead of an I2F conversion per score, which issues at a fraction of the FMA
     pipe's rate (the SASS of the loop has no per-score I2F). The row maximum is taken
     on the integers (the scale is positive). ``fold`` configs skip the subtraction:
     ``t = fma(as_float(i + 0x4B400000), c, -(1.5 * 2^23 * c + m'))``, one FMA per score
     (the bias's rounding moves a whole row of a tile by ~1e-4 in log2 units).
   * online softmax in fp32 (base 2). P is written as ``448 * 2^(s - m)`` (P's scale
     448 = e4m3's maximum is folded into the exponent: no multiply) and cast to e4m3;
     the row sum ``l`` uses the unrounded fp32 values (``l_mma`` configs: the rounded
     ones, summed by the tensor cores as ``P8 . ones``). The 448 cancels in ``acc / l``.
     ``v_perm`` configs store V's tokens permuted within each 32 (:func:`v_token_order`)
     and permute P's columns the same way, which makes the Q.K^T accumulator's register
     layout the P.V operand's: no shuffles between the two products.
   * ``acc += P8 . V8`` on FP8 tensor cores into an fp32 accumulator. Hopper accumulates
     FP8 products with about 22-bit precision inside the instruction; ``pv_promote``
     (SageAttention2's two-level accumulation) adds each tile's product to the fp32
     accumulator separately, at a speed cost. Both are measured by
     ``benchmarks/attention.py``.
   * epilogue: ``out = acc / l * v_scale + mu_v`` in the output dtype, written straight
     into ``[B, S, H, D]``.

   Sequence lengths need not be multiples of the blocks: the buffers are padded to
   :data:`K_BLOCK`, the last key tile is masked (scores of padded keys are -inf), and
   padded query rows are computed but not stored.

Error (``relative_error`` vs fp32 attention) is dominated by the e4m3 rounding of P and V
(3 mantissa bits: about 2.7 % rms per element, each): ~3.6 % on zero-mean Gaussian test
inputs, whose output is a small average of noisy values (bf16 SDPA: ~0.2 %); ~0.2 % where
the values share a per-channel offset, as real values do (V smoothing keeps the offset
out of the rounding). INT8 Q.K^T with K smoothing adds little on top; without the
smoothing, keys with a large common offset lose resolution (tests check both).

:func:`attention_int8_reference` is the PyTorch definition of all this (same
quantization, same tile-by-tile online softmax with the running maximum at which P is
rounded): the ground truth of the kernel tests, and what CPU runs use.

Interpreter notes (``TRITON_INTERPRET=1``, CPU tests): the interpreter truncates
fp32 -> e4m3/bf16 conversions where the GPU rounds to nearest even, so values are
rounded explicitly before those casts when ``INTERPRET`` is set (P, the output); the
pre-pass rounds explicitly on every device (memory-bound: the arithmetic is free).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from typing import Literal

import torch

from wanquant.kernels.act_quant import HAS_TRITON, interpreting
from wanquant.kernels.attention_ws import BLOCK_M as WS_BLOCK_M
from wanquant.kernels.attention_ws import CONSUMERS as WS_CONSUMERS
from wanquant.kernels.attention_ws import HAS_GLUON, attention_ws_launch

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from wanquant.kernels.act_quant import _exp2i, _round_bf16

Layout = Literal["bshd", "bhsd"]

LOG2E = 1.4426950408889634
INT8_MAX = 127.0
E4M3_MAX = 448.0
P_SCALE = E4M3_MAX  # P in [0, 1] is stored times 448: e4m3's whole range
LOG2_P_SCALE = math.log2(P_SCALE)
K_BLOCK = 128  # tokens per K scale; every main-loop tile (BLOCK_N) lies inside one such block
STATS_BLOCK = 128  # tokens per step of the K/V statistics kernel
MAX_SPLITS = 32  # programs per (batch, head) in the statistics kernel
_MAGIC_F = 12582912.0  # 1.5 * 2^23: (x + M) - M rounds |x| < 2^22 to an integer, ties to even
_MAGIC_I = 0x4B400000  # the bits of 1.5 * 2^23
# lazy_rescale: how far (log2) a row's maximum may outgrow P's reference before a rescale.
# 2: on Gaussian scores 11 % of 64x128 tiles rescale at 8,192 keys (5 % of the last 32),
# and the error against exact attention moves from 3.96 % to 4.01 %.
LAZY_SLACK = 2.0
HALF_EXP_MAX_BLOCK_N = 128  # 128 x 448 < 65,504: a tile's fp16 row sum cannot overflow
V_PERM_BLOCK = 32  # tokens per block of the v_perm token order (one k32 step of the FP8 wgmma)


def v_token_order(n: torch.Tensor | int) -> torch.Tensor | int:
    """Where token ``n`` sits in ``v8t`` when ``v_perm``: within each 32-token block, bits
    (3, 2, 1) of the index rotate to (1, 3, 2).

    A thread of the Q.K^T wgmma holds score columns 8j + 2t + b (j < 4, t = lane % 4, b < 2)
    of each 32-column block; the FP8 P.V wgmma wants, from the same thread, P columns
    16h + 4t + i (h < 2, i < 4). Sending column n = (j1 j0 t1 t0 b) to k = (j1 t1 t0 j0 b)
    maps one set onto the other thread by thread, so P permuted this way (and V stored the
    same way) needs no data movement. Any order is exact: it only reorders the P.V sum.
    """
    return (n & ~0xE) | ((n & 8) >> 2) | ((n & 6) << 1)


@dataclass(frozen=True)
class AttnConfig:
    """Launch parameters of the main kernel (benchmarks/attention.py sweeps :data:`CONFIGS`)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    # SageAttention2's two-level accumulation: each tile's P.V is summed in a fresh
    # accumulator and added to the fp32 one (Triton: max_num_imprecise_acc = BLOCK_N).
    pv_promote: bool = False
    # Quantize Q in a pre-pass kernel (INT8 Q read from memory, as K) instead of in the
    # main kernel's prologue (INT8 Q built in registers): same numbers, another code path.
    q_prepass: bool = False
    # Fold the int32 -> fp32 trick's subtraction into the exponent's FMA (one fp32 op per
    # score less): t = fma(bits(qk + M), c, -(M c + m')) instead of ((bits - M) c - m').
    fold: bool = False
    # P.V in the wgmma operand order: V's tokens are stored permuted within each 32-token
    # block (:func:`v_token_order`) so that P needs no cross-thread shuffle between the two
    # products (FlashAttention-3's FP8 trick). Needs block_n and k_block multiples of 32.
    v_perm: bool = False
    # K and V tiles by TMA (host tensor descriptors) instead of per-thread cp.async: one
    # thread issues a tile's copy, the others skip the address arithmetic.
    tma: bool = False
    # The row sums l on the tensor cores, as P8 . ones (sums of the rounded P, so the weights
    # of V sum to one exactly) instead of one fp32 add per score.
    l_mma: bool = False
    # Register cap per thread (ptxas .maxnreg; 0: the compiler's choice): 168 lets three
    # 128-thread CTAs share an SM where the kernel fits without spilling (64x64 tiles).
    maxnreg: int = 0
    # Triton's automatic warp specialization of the key loop (tl.range(warp_specialize=True)):
    # producer warps issue the K/V copies, the MMAs overlap the softmax (FlashAttention-3's plan).
    warp_spec: bool = False
    # exp2 on packed halves: t rounded to fp16, ``ex2.approx.f16x2`` (two exponentials per
    # issue of the MUFU pipe, 16 lanes per SM and clock: the FP8 kernel's narrowest pipe, as
    # wide as the tensor cores' work per score at D = 128), P cast to e4m3 from fp16, and
    # each tile's row sums in fp16 (at most block_n x 448 <= 57,344 < 65,504 for block_n <= 128).
    # Adds ~0.3 % rms to P, under e4m3's 2.7 %. Measured slower on an H100 (8-12 %,
    # benchmarks/results/attention_variants_h16.md). Why: sm_90 has no packed MUFU.EX2 --
    # ptxas turns each ex2.approx.f16x2 into two MUFU.EX2.F16 plus byte moves (SASS compiled
    # here), so the exponentials cost as much as in fp32 and the conversions come on top.
    half_exp: bool = False
    # FlashAttention-4's lazy rescaling: a tile's P is stored relative to a running maximum
    # that may be up to LAZY_SLACK (log2 units) too low, so that the accumulator, the row sums
    # and the maximum are rescaled only when some row of the block outgrows it (after the
    # first tiles, rarely) instead of every tile: about 72 of the ~500 instructions a thread
    # issues per 64x128 tile (an estimate from the register tiles, not a profile).
    # Stored P = 448 * 2^(s - m - slack) <= 448 still. Measured 3 % slower on an H100 (the
    # per-tile test costs what it saves; benchmarks/results/attention_variants_lazy.md).
    lazy_rescale: bool = False
    # FlashAttention-3's intra-warpgroup overlap: the next tile's Q.K^T is issued before this
    # tile's softmax, so that the tensor cores work while the softmax does (costs a second
    # score tile in registers: 64 more per thread at 64x128). Same numbers, another order of
    # instructions. Measured 37 % slower on an H100 at 64x128 (attention_variants_lazy.md):
    # the extra tile does not fit beside what two CTAs per SM leave each thread.
    qk_ahead: bool = False
    # The main loop as a warp-specialized Gluon kernel (kernels/attention_ws.py, sm_90 only):
    # a producer warpgroup issues the TMA copies into a num_stages-deep ring, two consumer
    # warpgroups of block_m = 64 queries each run the softmax (FlashAttention-3's layout).
    # Needs q_prepass, fold, tma, v_perm and 4 warps; same numbers as the Triton kernel.
    gluon_ws: bool = False
    # With gluon_ws: tile j's Q.K^T and tile j-1's P.V are in flight together and tile j's
    # softmax runs under the P.V (the accumulator is rescaled once it retires).
    pv_overlap: bool = False
    # With pv_overlap: the two consumers take turns issuing their wgmmas (FlashAttention-3's ping-pong).
    ping_pong: bool = False

    def describe(self) -> str:
        flags = [("promote", self.pv_promote), ("qpre", self.q_prepass), ("fold", self.fold),
                 ("tma", self.tma), ("vperm", self.v_perm),
                 ("lmma", self.l_mma), (f"r{self.maxnreg}", self.maxnreg > 0), ("ws", self.warp_spec),
                 ("h16", self.half_exp), ("lazy", self.lazy_rescale),
                 ("ahead", self.qk_ahead), ("gws", self.gluon_ws), ("ov", self.pv_overlap), ("pp", self.ping_pong)]
        tail = "".join(f"-{name}" for name, on in flags if on)
        return f"m{self.block_m}-n{self.block_n}-w{self.num_warps}-s{self.num_stages}{tail}"


# Fastest measured on an H100 (benchmarks/results/attention.md, 2026-12-06): 26.66 ms at
# 32,760 tokens (1.39x SDPA cuDNN), 144.38 ms at 75,600 (1.41x); the old default
# (m64-n128-w4-s3) 29.87 / 161.85 ms. 64-row tiles let 2 CTAs share an SM; Q quantized in a
# pre-pass, K/V tiles by TMA, the exponent's offset folded into its FMA, V permuted for
# the wgmma operand order. ``tma`` is dropped on GPUs without TMA (before sm_90): same numbers.
DEFAULT_CONFIG = AttnConfig(block_m=64, block_n=128, num_warps=4, num_stages=3, q_prepass=True, fold=True,
                            v_perm=True, tma=True)
# What the benchmark sweeps on an H100 (the fastest measured becomes DEFAULT_CONFIG;
# benchmarks/results/attention_sweep.md). Compiled for sm_90 with Triton 3.6: the first
# config's main loop issues 664 SASS instructions per warp and 64x128 tile, ``fold`` saves
# 60, ``vperm`` 49 (no SHFL/PRMT/SEL for P), ``lmma`` 57 more, none spills or serializes
# its wgmmas; measured, ``lmma`` (row sums on the tensor cores, promoted per tile so that
# they stay exact) is 1-2 ms slower at 32k tokens, ``tma`` 1.3 ms faster, ``qpre`` 0.6 ms.
# 64-row tiles with 4 warps need 220-255 registers, so 2 CTAs share an SM and overlap each
# other's softmax and MMAs; 128-row tiles with 8 warps: one CTA, whose two warpgroups meet
# at every tile's barrier.
_FAST = dict(fold=True, v_perm=True, l_mma=True)
CONFIGS = (
    AttnConfig(64, 128, 4, 3),
    AttnConfig(64, 128, 4, 3, fold=True, v_perm=True),
    AttnConfig(64, 128, 4, 3, q_prepass=True, fold=True, v_perm=True),
    AttnConfig(64, 128, 4, 3, q_prepass=True, pv_promote=True, fold=True, v_perm=True),
    AttnConfig(64, 128, 4, 3, **_FAST),
    AttnConfig(64, 128, 4, 3, q_prepass=True, **_FAST),
    AttnConfig(64, 128, 4, 4, q_prepass=True, **_FAST),
    AttnConfig(64, 128, 4, 3, q_prepass=True, tma=True, **_FAST),
    AttnConfig(64, 128, 4, 3, q_prepass=True, tma=True, fold=True, v_perm=True),
    AttnConfig(128, 128, 8, 3, q_prepass=True, **_FAST),
    AttnConfig(128, 128, 8, 3, q_prepass=True, fold=True, v_perm=True),
    AttnConfig(64, 64, 4, 3, q_prepass=True, maxnreg=168, **_FAST),
)


@dataclass
class QuantKV:
    """Keys and values as the main kernel reads them (padded to ``seq_pad`` tokens).

    ``k8`` int8 ``[B*H, seq_pad, D]`` (padded rows 0); ``k_scale`` fp32
    ``[B*H, seq_pad / k_block]``; ``v8t`` e4m3 ``[B*H, D, seq_pad]`` (transposed, padded
    columns 0); ``v_scale`` fp32 ``[B*H, D]``; ``v_mean`` fp32 ``[B*H, D]`` (zeros without
    V smoothing). Keys and values are ``k ~ (k8 * k_scale) + mu_k`` and
    ``v ~ v8 * v_scale + v_mean``; ``mu_k`` is dropped (softmax does not see it).
    ``v_perm``: token ``n`` of ``v8t`` is stored at column ``v_token_order(n)``.
    """

    k8: torch.Tensor
    k_scale: torch.Tensor
    v8t: torch.Tensor
    v_scale: torch.Tensor
    v_mean: torch.Tensor
    batch: int
    heads: int
    seq: int
    k_block: int
    v_perm: bool = False

    @property
    def head_dim(self) -> int:
        return self.k8.shape[-1]

    @property
    def seq_pad(self) -> int:
        return self.k8.shape[1]


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _bshd_view(x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, int, int, int, int]:
    """``x`` as a ``[B, S, H, D]`` view with a unit last stride, plus B, S, H, D."""
    if x.ndim != 4:
        raise ValueError(f"expected a 4-d tensor ({layout}), got shape {tuple(x.shape)}")
    if layout == "bhsd":
        x = x.transpose(1, 2)
    elif layout != "bshd":
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, s, h, d = x.shape
    return x, b, s, h, d


def check_head_dim(d: int) -> None:
    """The kernels need D a power of two in [32, 256] (tl.arange; |int32 dot| < 2^22)."""
    if d < 32 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two in [32, 256], got {d}")


def check_config(cfg: AttnConfig, k_block: int) -> None:
    for name in ("block_m", "block_n"):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if k_block % cfg.block_n:
        raise ValueError(f"block_n {cfg.block_n} must divide the K scale block {k_block}: "
                         "a key tile must have one scale")
    if cfg.v_perm and cfg.block_n % V_PERM_BLOCK:
        raise ValueError(f"v_perm needs block_n a multiple of {V_PERM_BLOCK}, got {cfg.block_n}: "
                         "use block_n >= 32 or v_perm=False")
    if cfg.qk_ahead and cfg.warp_spec:
        raise ValueError("qk_ahead and warp_spec are two forms of the key loop: set one of them")
    if cfg.pv_overlap and not cfg.gluon_ws:
        raise ValueError("pv_overlap is a schedule of the Gluon kernel: set gluon_ws too")
    if cfg.ping_pong and not cfg.pv_overlap:
        raise ValueError("ping_pong orders the overlapped schedule's wgmmas: set gluon_ws and pv_overlap too")
    if cfg.gluon_ws:
        _check_gluon_config(cfg)
    if cfg.half_exp and (cfg.block_n > HALF_EXP_MAX_BLOCK_N or cfg.l_mma):
        raise ValueError(f"half_exp sums a tile's P in fp16: needs block_n <= {HALF_EXP_MAX_BLOCK_N} "
                         f"(got {cfg.block_n}) and l_mma off (got {cfg.l_mma})")


def _check_gluon_config(cfg: AttnConfig) -> None:
    """What the warp-specialized Gluon kernel implements (kernels/attention_ws.py)."""
    needs = {"q_prepass": cfg.q_prepass, "fold": cfg.fold, "tma": cfg.tma, "v_perm": cfg.v_perm}
    missing = [name for name, on in needs.items() if not on]
    other = {"pv_promote": cfg.pv_promote, "l_mma": cfg.l_mma, "warp_spec": cfg.warp_spec, "half_exp": cfg.half_exp,
             "lazy_rescale": cfg.lazy_rescale, "qk_ahead": cfg.qk_ahead, "maxnreg": cfg.maxnreg > 0}
    extra = [name for name, on in other.items() if on]
    if missing or extra:
        raise ValueError(f"gluon_ws needs {missing} on and {extra} off (the Gluon kernel has one code path: "
                         "q_prepass, fold, tma, v_perm)")
    if (cfg.block_m, cfg.num_warps) != (WS_BLOCK_M, 4) or cfg.block_n not in (64, 128) or cfg.num_stages < 2:
        raise ValueError(f"gluon_ws runs {WS_BLOCK_M} queries per 4-warp consumer, block_n 64 or 128 and >= 2 "
                         f"stages; got {cfg.describe()}")


def int8_attention_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device`` (default: the current CUDA device)."""
    if not HAS_TRITON:
        return False, "Triton is not installed"
    if interpreting():
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        return False, f"tensors are on {dev}, the kernel runs on CUDA GPUs"
    return _cuda_status(dev.index if dev.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_status(index: int) -> tuple[bool, str]:
    """(FP8 tensor cores?, description) of CUDA device ``index`` (asked once: the backend checks every call)."""
    cap = torch.cuda.get_device_capability(index)
    name = f"{torch.cuda.get_device_name(index)} (sm_{cap[0]}{cap[1]})"
    if cap < (8, 9):
        return False, f"{name} has no FP8 tensor cores (needs sm_89+)"
    return True, name


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


# ---------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------
def _round_half_even(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # torch.round rounds half to even, as the kernels' magic-number add


def _fp32(v: float, device) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=device)


def _inverse_scale(top: float, amax: torch.Tensor) -> torch.Tensor:
    """``top / amax`` where ``amax > 0``, else 0, correctly rounded as the kernels compute it.

    (A tensor/tensor division: torch evaluates ``float / tensor`` as ``reciprocal * float``,
    which can be one ulp off and then flips an integer rounding.)
    """
    return torch.where(amax > 0, torch.full_like(amax, top) / amax.clamp_min(1e-30), torch.zeros_like(amax))


def _check_v_perm(v_perm: bool, k_block: int) -> None:
    if v_perm and k_block % V_PERM_BLOCK:
        raise ValueError(f"v_perm needs k_block a multiple of {V_PERM_BLOCK}, got {k_block}")


def quantize_kv_reference(k: torch.Tensor, v: torch.Tensor, layout: Layout = "bshd", k_block: int = K_BLOCK,
                          smooth_k: bool = True, smooth_v: bool = True, v_perm: bool | None = None) -> QuantKV:
    """What :func:`quantize_kv` writes, in plain PyTorch (fp32 math, same formulas).

    ``v_perm``: V's token order (default :data:`DEFAULT_CONFIG`'s; see :func:`v_token_order`).
    """
    v_perm = DEFAULT_CONFIG.v_perm if v_perm is None else v_perm
    _check_v_perm(v_perm, k_block)
    k, b, s, h, d = _bshd_view(k, layout)
    v, bv, sv, hv, dv = _bshd_view(v, layout)
    if (b, s, h, d) != (bv, sv, hv, dv):
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    dev = k.device
    s_pad = _ceil_to(s, k_block)
    kf = k.permute(0, 2, 1, 3).reshape(b * h, s, d).float()
    vf = v.permute(0, 2, 1, 3).reshape(b * h, s, d).float()
    inv_s = _fp32(1.0 / s, dev)
    if smooth_k:
        kf = kf - kf.sum(1, keepdim=True) * inv_s
    kp = torch.zeros(b * h, s_pad, d, dtype=torch.float32, device=dev)
    kp[:, :s] = kf
    kb = kp.view(b * h, s_pad // k_block, k_block, d)
    kamax = kb.abs().amax(dim=(2, 3))
    inv_k = _inverse_scale(INT8_MAX, kamax)
    k8 = _round_half_even(kb * inv_k[..., None, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    k_scale = kamax * _fp32(1.0 / INT8_MAX, dev)
    if smooth_v:
        v_mean = vf.sum(1) * inv_s
        vamax = torch.maximum(vf.amax(1) - v_mean, v_mean - vf.amin(1))
        vf = vf - v_mean[:, None, :]
    else:
        v_mean = torch.zeros(b * h, d, dtype=torch.float32, device=dev)
        vamax = torch.maximum(vf.amax(1), -vf.amin(1))
    inv_v = _inverse_scale(E4M3_MAX, vamax)
    v8 = (vf * inv_v[:, None, :]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    v8t = torch.zeros(b * h, d, s_pad, dtype=torch.float8_e4m3fn, device=dev)
    v8t[:, :, :s] = v8.transpose(1, 2)
    if v_perm:
        v8t[:, :, v_token_order(torch.arange(s_pad, device=dev))] = v8t.clone()
    return QuantKV(k8.view(b * h, s_pad, d).contiguous(), k_scale.contiguous(), v8t,
                   (vamax * _fp32(1.0 / E4M3_MAX, dev)).contiguous(), v_mean.contiguous(), b, h, s, k_block,
                   v_perm)


def quantize_q_reference(q: torch.Tensor, scale: float | None = None, layout: Layout = "bshd"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 Q per token: ``(q8 int8 [B*H, S, D], qs fp32 [B*H, S])`` with
    ``q * scale * log2(e) ~ q8 * qs`` (the main kernel's prologue)."""
    q, b, s, h, d = _bshd_view(q, layout)
    qf = q.permute(0, 2, 1, 3).reshape(b * h, s, d).float()
    amax = qf.abs().amax(-1)
    inv = _inverse_scale(INT8_MAX, amax)
    q8 = _round_half_even(qf * inv[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    qs = amax * _fp32(default_scale(d, scale) * LOG2E / INT8_MAX, q.device)
    return q8, qs


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 ``a * b + c`` rounded once (as ``tl.fma``): exact in fp64 for the kernel's operands."""
    return (a.double() * b.double() + c.double()).float()


def _exponent(qk: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, top: float, fold: bool) -> torch.Tensor:
    """``t = s - m + top`` (log2 of the stored P) from integer scores ``qk``, as the kernel computes it."""
    shift = m - _fp32(top, m.device)
    if not fold:
        return qk * sc[..., None] - shift[..., None]
    bias = _fma(sc, _fp32(_MAGIC_F, sc.device), shift)  # M c + m - top
    return _fma(qk + _MAGIC_F, sc[..., None], -bias[..., None])  # (qk + M) c - (M c + m - top)


def _block_any(flags: torch.Tensor, rows: int) -> torch.Tensor:
    """``flags [..., S]`` with each run of ``rows`` entries along the last dim set to its any()."""
    s = flags.shape[-1]
    pad = -s % rows
    f = torch.nn.functional.pad(flags, (0, pad)).unflatten(-1, (-1, rows)).any(-1, keepdim=True)
    return f.expand(*f.shape[:-1], rows).flatten(-2)[..., :s]


def attention_prepared_reference(q: torch.Tensor, kv: QuantKV, scale: float | None = None, layout: Layout = "bshd",
                                 block_n: int | None = None, out_dtype: torch.dtype | None = None,
                                 config: AttnConfig | None = None) -> torch.Tensor:
    """What :func:`attention_prepared` computes with ``config`` (default :data:`DEFAULT_CONFIG`;
    ``block_n`` overrides its key tile), tile by tile in ``block_n`` keys.

    The running maximum at which each tile's P is rounded to e4m3 is the kernel's, so only
    accumulation order and exp2's last bits differ from it.
    """
    cfg = config or DEFAULT_CONFIG
    block_n = block_n or cfg.block_n
    if kv.k_block % block_n:
        raise ValueError(f"block_n {block_n} must divide the K scale block {kv.k_block}")
    qv, b, s_q, h, d = _bshd_view(q, layout)
    if (b, h, d) != (kv.batch, kv.heads, kv.head_dim):
        raise ValueError(f"q {tuple(q.shape)} ({layout}) does not match the keys (B={kv.batch}, H={kv.heads}, "
                         f"D={kv.head_dim})")
    q8, qs = quantize_q_reference(qv, scale, "bshd")
    bh = b * h
    dev = q.device
    qd = q8.double()
    v8t = kv.v8t[:, :, v_token_order(torch.arange(kv.seq_pad, device=dev))] if kv.v_perm else kv.v8t
    m = torch.full((bh, s_q), -math.inf, dtype=torch.float32, device=dev)
    l = torch.zeros(bh, s_q, dtype=torch.float32, device=dev)
    acc = torch.zeros(bh, s_q, d, dtype=torch.float32, device=dev)
    for n0 in range(0, kv.seq, block_n):
        n1 = min(n0 + block_n, kv.seq)
        qk = (qd @ kv.k8[:, n0:n1].double().transpose(1, 2)).float()  # exact integers
        sc = qs * kv.k_scale[:, n0 // kv.k_block, None]
        m_tile = qk.amax(-1) * sc
        if cfg.lazy_rescale:  # per block of block_m rows, as the kernel's programs decide
            m_new = torch.where(_block_any(m_tile - m > LAZY_SLACK, cfg.block_m), torch.maximum(m, m_tile), m)
            t = _exponent(qk, sc, m_new, LOG2_P_SCALE - LAZY_SLACK, cfg.fold)
        else:
            m_new = torch.maximum(m, m_tile)
            t = _exponent(qk, sc, m_new, LOG2_P_SCALE, cfg.fold)
        if cfg.half_exp:  # exp2 of the fp16-rounded exponent, rounded to fp16
            p = torch.exp2(t.half().float()).half().float()
        else:
            p = torch.exp2(t)  # 448 * 2^(s - m)
        alpha = torch.exp2(m - m_new)
        p8 = p.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        l = l * alpha + (p8.float().sum(-1) if cfg.l_mma else p.sum(-1))
        v8 = v8t[:, :, n0:n1].transpose(1, 2)
        acc = acc * alpha[..., None] + (p8.double() @ v8.double()).float()
        m = m_new
    o = acc * (1.0 / l)[..., None] * kv.v_scale[:, None, :] + kv.v_mean[:, None, :]
    o = o.to(out_dtype or q.dtype).view(b, h, s_q, d)
    return o.transpose(1, 2) if layout == "bshd" else o


def attention_int8_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                             layout: Layout = "bshd", block_n: int | None = None, k_block: int = K_BLOCK,
                             smooth_k: bool = True, smooth_v: bool = True, config: AttnConfig | None = None
                             ) -> torch.Tensor:
    """The 8-bit attention in plain PyTorch: the definition the kernels implement.

    ``smooth_k=False`` / ``smooth_v=False`` switch the smoothing off (ablations, tests).
    Output: ``q``'s dtype and layout.
    """
    cfg = config or DEFAULT_CONFIG
    kv = quantize_kv_reference(k, v, layout, k_block, smooth_k, smooth_v, v_perm=cfg.v_perm)
    return attention_prepared_reference(q, kv, scale, layout, block_n, config=cfg)


def attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   layout: Layout = "bshd", dtype: torch.dtype = torch.float32, heads_per_step: int = 4
                   ) -> torch.Tensor:
    """Exact softmax attention in ``dtype`` (fp32 or fp64), ``[B, H, S, D]`` out (a few
    heads at a time: the score matrix of all heads would not fit at Wan sizes)."""
    qv, b, s_q, h, d = _bshd_view(q, layout)
    kv_, *_ = _bshd_view(k, layout)
    vv, _, _, _, _ = _bshd_view(v, layout)
    sm = default_scale(d, scale)
    out = torch.empty(b, h, s_q, d, dtype=dtype, device=q.device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would make the "exact" reference ~1e-3 off
    try:
        for h0 in range(0, h, heads_per_step):
            hs = slice(h0, min(h, h0 + heads_per_step))
            qq = qv[:, :, hs].transpose(1, 2).to(dtype)
            kk = kv_[:, :, hs].transpose(1, 2).to(dtype)
            vvv = vv[:, :, hs].transpose(1, 2).to(dtype)
            out[:, hs] = torch.softmax((qq @ kk.transpose(-1, -2)) * sm, dim=-1) @ vvv
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return out


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in fp64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _rne(x):
        """Nearest integer, ties to even, for |x| < 2^22 (the magic-number add)."""
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _round_e4m3(x):
        """``x`` (fp32, clamped to +-448) rounded to the nearest-even e4m3 value, as fp32.

        e4m3 keeps 3 mantissa bits: the step is 2^(e-3) for |x| in [2^e, 2^(e+1)), e >= -6,
        and 2^-9 below 2^-6 (subnormals). Scaling by the inverse step (a power of two,
        exact) makes the step 1; the magic-number add rounds; scaling back is exact. The
        result is representable, so any later cast to e4m3 is exact.
        """
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.maximum(e, -6) - 3
        return _rne(x * _exp2i(-e)) * _exp2i(e)

    @triton.jit
    def _inv_scale(amax, TOP: tl.constexpr):
        """``TOP / amax`` (IEEE-rounded, as the reference) where ``amax > 0``, else 0."""
        safe = tl.maximum(amax, 1e-30)  # no 1/0 in the masked-off lanes
        return tl.where(amax > 0, tl.math.div_rn(safe * 0.0 + TOP, safe), 0.0)

    # Sequence lengths are not specialized (divisibility): every length shares one compiled
    # kernel; padded lengths and strides (multiples of 16 at Wan sizes) still are.
    @triton.jit(do_not_specialize=["S"])
    def _kv_stats_kernel(k_ptr, v_ptr, part_ptr, S, H, tok_per_split,
                         skb, sks, skh, svb, svs, svh,
                         D: tl.constexpr, BT: tl.constexpr, NSPLIT: tl.constexpr):
        """Per (batch*head, split): partial sums of K and V and V's column max/min.

        ``part [B*H, NSPLIT, 4, D]`` fp32: (sum k, sum v, max v, min v) over the split's
        tokens. Splitting S over NSPLIT programs keeps every SM busy (B*H alone is 40).
        """
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        d = tl.arange(0, D)
        ksum = tl.zeros((D,), dtype=tl.float32)
        vsum = tl.zeros((D,), dtype=tl.float32)
        vmax = tl.full((D,), float("-inf"), dtype=tl.float32)
        vmin = tl.full((D,), float("inf"), dtype=tl.float32)
        start = sp * tok_per_split
        for t0 in range(start, start + tok_per_split, BT):
            s = t0 + tl.arange(0, BT)
            ok = s < S
            s64 = s.to(tl.int64)
            kt = tl.load(k_ptr + b * skb + s64[:, None] * sks + h * skh + d[None, :], mask=ok[:, None], other=0.0)
            vt = tl.load(v_ptr + b * svb + s64[:, None] * svs + h * svh + d[None, :], mask=ok[:, None], other=0.0)
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
            ksum += tl.sum(kt, 0)
            vsum += tl.sum(vt, 0)
            vmax = tl.maximum(vmax, tl.max(tl.where(ok[:, None], vt, float("-inf")), 0))
            vmin = tl.minimum(vmin, tl.min(tl.where(ok[:, None], vt, float("inf")), 0))
        base = part_ptr + (bh * NSPLIT + sp) * (4 * D)
        tl.store(base + d, ksum)
        tl.store(base + D + d, vsum)
        tl.store(base + 2 * D + d, vmax)
        tl.store(base + 3 * D + d, vmin)

    @triton.jit
    def _kv_finalize_kernel(part_ptr, stat_ptr, vs_ptr, vm_ptr, inv_s, D: tl.constexpr, NSPLIT: tl.constexpr,
                            SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr):
        """Per (batch*head): reduce the partial statistics once. ``stat [B*H, 2, D]``: K's mean
        and 448 / colmax|V - mu_v|; V's scale and mean go to ``vs``/``vm``."""
        bh = tl.program_id(0)
        d = tl.arange(0, D)
        sp = tl.arange(0, NSPLIT)
        pbase = part_ptr + bh * (NSPLIT * 4 * D) + sp[:, None] * (4 * D) + d[None, :]
        if SMOOTH_K:
            k_mean = tl.sum(tl.load(pbase), 0) * inv_s
        else:
            k_mean = tl.zeros((D,), dtype=tl.float32)
        vmax = tl.max(tl.load(pbase + 2 * D), 0)
        vmin = tl.min(tl.load(pbase + 3 * D), 0)
        if SMOOTH_V:
            v_mean = tl.sum(tl.load(pbase + D), 0) * inv_s
            vamax = tl.maximum(vmax - v_mean, v_mean - vmin)
        else:
            v_mean = tl.zeros((D,), dtype=tl.float32)
            vamax = tl.maximum(vmax, -vmin)
        tl.store(stat_ptr + bh * (2 * D) + d, k_mean)
        tl.store(stat_ptr + bh * (2 * D) + D + d, _inv_scale(vamax, 448.0))
        tl.store(vs_ptr + bh * D + d, vamax * (1.0 / 448.0))
        tl.store(vm_ptr + bh * D + d, v_mean)

    @triton.jit(do_not_specialize=["S"])
    def _kv_quant_kernel(k_ptr, v_ptr, stat_ptr, vm_ptr, k8_ptr, ks_ptr, v8_ptr, S, S_pad, H,
                         skb, sks, skh, svb, svs, svh,
                         D: tl.constexpr, KB: tl.constexpr, VPERM: tl.constexpr):
        """One K scale block (KB tokens) of one (batch, head): INT8 keys and e4m3 values.
        Padded tokens (>= S) are written as zeros."""
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        d = tl.arange(0, D)
        k_mean = tl.load(stat_ptr + bh * (2 * D) + d)
        inv_v = tl.load(stat_ptr + bh * (2 * D) + D + d)
        v_mean = tl.load(vm_ptr + bh * D + d)
        s = blk * KB + tl.arange(0, KB)
        ok = s < S
        s64 = s.to(tl.int64)
        kt = tl.load(k_ptr + b * skb + s64[:, None] * sks + h * skh + d[None, :], mask=ok[:, None], other=0.0)
        kt = tl.where(ok[:, None], kt.to(tl.float32) - k_mean[None, :], 0.0)
        kamax = tl.max(tl.max(tl.abs(kt), 1), 0)
        inv_k = _inv_scale(kamax, 127.0)
        tl.store(ks_ptr + bh * (S_pad // KB) + blk, kamax * (1.0 / 127.0))
        k8 = tl.minimum(tl.maximum(_rne(kt * inv_k), -127.0), 127.0)
        bh64 = bh.to(tl.int64)
        tl.store(k8_ptr + bh64 * S_pad * D + s64[:, None] * D + d[None, :], k8.to(tl.int8))

        vt = tl.load(v_ptr + b * svb + s64[:, None] * svs + h * svh + d[None, :], mask=ok[:, None], other=0.0)
        vt = tl.where(ok[:, None], vt.to(tl.float32) - v_mean[None, :], 0.0)
        v8 = _round_e4m3(vt * inv_v[None, :])
        v8 = v8.to(tl.float8e4nv)
        if VPERM:  # tokens in v_token_order: permuted in registers, so that the store stays contiguous
            v8 = tl.reshape(tl.permute(tl.reshape(v8, (KB // 32, 2, 2, 2, 2, 2, D)), (0, 1, 3, 4, 2, 5, 6)), (KB, D))
        # Transposed store: V^T [B*H, D, S_pad] (tokens contiguous, K-major for the P.V wgmma).
        tl.store(v8_ptr + bh64 * D * S_pad + d[None, :].to(tl.int64) * S_pad + s64[:, None], v8)

    @triton.jit
    def _rescale(acc, l_i, m_i, m_tile, LMMA: tl.constexpr):
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.math.exp2(m_i - m_new)
        if LMMA:  # l_i: [BM, 16] accumulator of P8 . ones
            l_i = l_i * alpha[:, None]
        else:
            l_i = l_i * alpha
        return acc * alpha[:, None], l_i, m_new

    @triton.jit
    def _exp2_f16(t, INTERPRET: tl.constexpr):
        """``2^t`` of fp16 ``t`` in fp16: one ``ex2.approx.f16x2`` per two values on the GPU."""
        if INTERPRET:  # no inline PTX in the interpreter
            return tl.math.exp2(t.to(tl.float32)).to(tl.float16)
        return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [t], dtype=tl.float16,
                                         is_pure=True, pack=2)

    @triton.jit
    def _wgmma_order(p8, BM: tl.constexpr, BN: tl.constexpr):
        """P's columns in :func:`v_token_order`: column n = (j1 j0 t1 t0 b) of each 32 goes to
        k = (j1 t1 t0 j0 b), which in registers is no move at all (see that function)."""
        p8 = tl.reshape(p8, (BM, BN // 32, 2, 2, 2, 2, 2))
        p8 = tl.permute(p8, (0, 1, 2, 4, 5, 3, 6))
        return tl.reshape(p8, (BM, BN))

    @triton.jit
    def _scores(q8, k_src, k_row, n0, D: tl.constexpr, BN: tl.constexpr, TMA: tl.constexpr):
        """Integer scores of one key tile: ``k_src`` is a descriptor of all K rows (TMA) or
        this head's K base pointer."""
        if TMA:
            k = k_src.load([k_row + n0, 0]).T  # [D, BN] int8
        else:
            offs_n = n0 + tl.arange(0, BN)
            k = tl.load(k_src + offs_n[None, :] * D + tl.arange(0, D)[:, None])  # [D, BN] int8, K-major
        return tl.dot(q8, k, out_dtype=tl.int32)  # exact

    @triton.jit
    def _softmax_pv(acc, l_i, m_i, ones, qk, qsc, v_src, ks_base, v_row, n0, S_k, S_kpad,
                    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, MASKED: tl.constexpr,
                    PV_PROMOTE: tl.constexpr, FOLD: tl.constexpr, TMA: tl.constexpr, VPERM: tl.constexpr,
                    LMMA: tl.constexpr, HALF_EXP: tl.constexpr, LAZY: tl.constexpr, SLACK: tl.constexpr,
                    TOP: tl.constexpr, INTERPRET: tl.constexpr):
        """The online softmax of one tile's scores and its P.V (see the module docstring)."""
        offs_n = n0 + tl.arange(0, BN)
        if TMA:  # first: the barrier wait stays out of the wgmma pipeline stage (ptxas would serialize)
            v = v_src.load([v_row, n0]).T  # [BN, D] e4m3 from V^T: K-major
        if MASKED:
            col_ok = offs_n < S_k
            qk = tl.where(col_ok[None, :], qk, -4194303)  # below any real score, inside the 2^22 trick range
        sc = qsc * tl.load(ks_base + n0 // KB)  # log2-domain units per integer unit, per row
        m_tile = tl.max(qk, 1).to(tl.float32) * sc
        if LAZY:  # rescale only when a row's maximum outgrew the reference by more than the slack
            if tl.max(m_tile - m_i, 0) > SLACK:
                acc, l_i, m_i = _rescale(acc, l_i, m_i, m_tile, LMMA)
        else:
            acc, l_i, m_i = _rescale(acc, l_i, m_i, m_tile, LMMA)
        shift = m_i - TOP  # stored P = 448 * 2^(s - m) (lazy: 2^(s - m - SLACK)); TOP = log2(448) (- SLACK)
        qkb = (qk + 0x4B400000).to(tl.float32, bitcast=True)  # 1.5 * 2^23 + qk, exact
        if FOLD:  # t = (M + qk) c - (M c + shift): one FMA per score
            bias = tl.fma(sc, 12582912.0, shift)
            t = tl.fma(qkb, sc[:, None], -bias[:, None])
        else:
            t = (qkb - 12582912.0) * sc[:, None] - shift[:, None]  # int32 -> fp32 exactly, then scale
        if MASKED:
            t = tl.where(col_ok[None, :], t, float("-inf"))
        if HALF_EXP:
            p = _exp2_f16(t.to(tl.float16), INTERPRET)
            l_i += tl.sum(p, 1).to(tl.float32)  # fp16 within the tile: <= BN x 448 < 65,504
        else:
            p = tl.math.exp2(t)  # 448 * 2^(s - m), in [0, 448]
            if not LMMA:
                l_i += tl.sum(p, 1)
        if not TMA:
            v = tl.load(v_src + tl.arange(0, D)[None, :] * S_kpad + offs_n[:, None])  # [BN, D] e4m3, K-major
        if INTERPRET:  # the interpreter's fp32 -> e4m3 cast truncates; the GPU's rounds to nearest even
            p8 = _round_e4m3(p.to(tl.float32)).to(tl.float8e4nv)
        else:
            p8 = p.to(tl.float8e4nv)
        if VPERM:
            p8 = _wgmma_order(p8, BM, BN)
        if PV_PROMOTE:
            acc = tl.dot(p8, v, acc, max_num_imprecise_acc=BN)
        else:
            acc = tl.dot(p8, v, acc)
        if LMMA:  # the row sums of the rounded P on the tensor cores (16: wgmma's smallest N here);
            # promoted per tile: l grows to ~S x 448, far past what Hopper's FP8 accumulator
            # (~22 bits) adds a tile's sum to without losing it (0.5 relative error at 32k keys)
            l_i = tl.dot(p8, ones, l_i, max_num_imprecise_acc=BN)
        return acc, l_i, m_i

    @triton.jit
    def _quant_q_rows(q_ptr, b, h, m64, m_ok, sqb, sqs, sqh, qk_c, D: tl.constexpr):
        """INT8 Q per token (rows beyond S_q: zeros); the softmax scale and log2(e) ride on its scale."""
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sqb + m64[:, None] * sqs + h * sqh + d[None, :], mask=m_ok[:, None], other=0.0)
        q = q.to(tl.float32)
        amax = tl.max(tl.abs(q), 1)
        inv = _inv_scale(amax, 127.0)
        q8 = tl.minimum(tl.maximum(_rne(q * inv[:, None]), -127.0), 127.0).to(tl.int8)
        return q8, amax * qk_c

    @triton.jit(do_not_specialize=["S_q"])
    def _q_quant_kernel(q_ptr, q8_ptr, qs_ptr, S_q, S_qpad, H, qk_c, sqb, sqs, sqh,
                        D: tl.constexpr, BM: tl.constexpr):
        """The ``q_prepass`` variant's Q pre-pass: ``q8 [B*H, S_qpad, D]``, ``qs [B*H, S_qpad]``."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        offs_m = pid_m * BM + tl.arange(0, BM)
        m64 = offs_m.to(tl.int64)
        q8, qsc = _quant_q_rows(q_ptr, (bh // H).to(tl.int64), (bh % H).to(tl.int64), m64, offs_m < S_q,
                                sqb, sqs, sqh, qk_c, D)
        bh64 = bh.to(tl.int64)
        d = tl.arange(0, D)
        tl.store(q8_ptr + bh64 * S_qpad * D + m64[:, None] * D + d[None, :], q8)
        tl.store(qs_ptr + bh64 * S_qpad + m64, qsc)

    @triton.jit(do_not_specialize=["S_q", "S_k"])
    def _attn_fwd_kernel(q_ptr, q8_ptr, qs_ptr, k8_ptr, ks_ptr, v8_ptr, vs_ptr, vm_ptr, o_ptr, ones_ptr,
                         S_q, S_qpad, S_k, S_kpad, H, qk_c,
                         sqb, sqs, sqh, sob, sos, soh,
                         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr,
                         PV_PROMOTE: tl.constexpr, Q_PRE: tl.constexpr, FOLD: tl.constexpr, TMA: tl.constexpr,
                         VPERM: tl.constexpr, LMMA: tl.constexpr, WS: tl.constexpr, HALF_EXP: tl.constexpr,
                         LAZY: tl.constexpr, SLACK: tl.constexpr, AHEAD: tl.constexpr, TOP: tl.constexpr,
                         INTERPRET: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        bh64 = bh.to(tl.int64)
        offs_m = pid_m * BM + tl.arange(0, BM)
        m_ok = offs_m < S_q
        m64 = offs_m.to(tl.int64)
        d = tl.arange(0, D)

        if Q_PRE:  # INT8 Q from the pre-pass (padded to S_qpad rows, a multiple of BM)
            q8 = tl.load(q8_ptr + bh64 * S_qpad * D + m64[:, None] * D + d[None, :])
            qsc = tl.load(qs_ptr + bh64 * S_qpad + m64)
        else:  # prologue: quantize this program's queries in registers
            q8, qsc = _quant_q_rows(q_ptr, b, h, m64, m_ok, sqb, sqs, sqh, qk_c, D)

        if TMA:  # descriptors of the [B*H*S_kpad, D] keys and [B*H*D, S_kpad] values
            k_src = k8_ptr
            v_src = v8_ptr
        else:
            k_src = k8_ptr + bh64 * S_kpad * D
            v_src = v8_ptr + bh64 * D * S_kpad
        ks_base = ks_ptr + bh64 * (S_kpad // KB)
        m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
        if LMMA:
            l_i = tl.zeros((BM, 16), dtype=tl.float32)
        else:
            l_i = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, D), dtype=tl.float32)
        if LMMA:  # loaded (not tl.full) so that Triton stages it in shared memory once, not every tile
            ones = tl.load(ones_ptr + tl.arange(0, BN)[:, None] * 16 + tl.arange(0, 16)[None, :])  # [BN, 16] e4m3
        else:
            ones = 0
        k_row = bh * S_kpad
        v_row = bh * D
        n_full = (S_k // BN) * BN
        if WS:  # the default stays on the plain loop it was measured with
            for n0 in tl.range(0, n_full, BN, warp_specialize=True):
                qk = _scores(q8, k_src, k_row, n0, D, BN, TMA)
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, ones, qk, qsc, v_src, ks_base, v_row, n0, S_k, S_kpad,
                                            D, BM, BN, KB, False, PV_PROMOTE, FOLD, TMA, VPERM, LMMA, HALF_EXP,
                                            LAZY, SLACK, TOP, INTERPRET)
        elif AHEAD:  # tile 0's scores first (K is padded: a valid read even when n_full == 0)
            qk = _scores(q8, k_src, k_row, 0, D, BN, TMA)
            for n0 in range(BN, n_full, BN):
                qk_next = _scores(q8, k_src, k_row, n0, D, BN, TMA)
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, ones, qk, qsc, v_src, ks_base, v_row, n0 - BN, S_k,
                                            S_kpad, D, BM, BN, KB, False, PV_PROMOTE, FOLD, TMA, VPERM, LMMA,
                                            HALF_EXP, LAZY, SLACK, TOP, INTERPRET)
                qk = qk_next
            if n_full > 0:
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, ones, qk, qsc, v_src, ks_base, v_row, n_full - BN, S_k,
                                            S_kpad, D, BM, BN, KB, False, PV_PROMOTE, FOLD, TMA, VPERM, LMMA,
                                            HALF_EXP, LAZY, SLACK, TOP, INTERPRET)
        else:
            for n0 in range(0, n_full, BN):
                qk = _scores(q8, k_src, k_row, n0, D, BN, TMA)
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, ones, qk, qsc, v_src, ks_base, v_row, n0, S_k, S_kpad,
                                            D, BM, BN, KB, False, PV_PROMOTE, FOLD, TMA, VPERM, LMMA, HALF_EXP,
                                            LAZY, SLACK, TOP, INTERPRET)
        if n_full < S_k:  # the ragged last tile, masked
            qk = _scores(q8, k_src, k_row, n_full, D, BN, TMA)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, ones, qk, qsc, v_src, ks_base, v_row, n_full, S_k, S_kpad,
                                        D, BM, BN, KB, True, PV_PROMOTE, FOLD, TMA, VPERM, LMMA, HALF_EXP, LAZY,
                                        SLACK, TOP, INTERPRET)

        vs = tl.load(vs_ptr + bh64 * D + d)
        vm = tl.load(vm_ptr + bh64 * D + d)
        if LMMA:
            l_i = tl.max(l_i, 1)  # 16 equal columns
        o = acc * (1.0 / l_i)[:, None] * vs[None, :] + vm[None, :]
        if INTERPRET:  # the interpreter truncates fp32 -> bf16; round to nearest even first
            if o_ptr.dtype.element_ty == tl.bfloat16:
                o = _round_bf16(o)
        tl.store(o_ptr + b * sob + m64[:, None] * sos + h * soh + d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None])


@functools.cache
def _ones_e4m3(device: torch.device, n: int) -> torch.Tensor:
    """``[n, 16]`` e4m3 ones: the B operand of the ``l_mma`` row sums."""
    return torch.ones(n, 16, device=device).to(torch.float8_e4m3fn)


def _has_tma(device: torch.device) -> bool:
    """TMA (tensor memory accelerator) copies exist from sm_90 (Hopper); the interpreter emulates them."""
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (9, 0)


def _gluon_runs_on(device: torch.device) -> bool:
    """The Gluon kernel needs a Hopper GPU (sm_90: wgmma, TMA, setmaxnreg) and no interpreter."""
    if not HAS_GLUON or interpreting() or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) == (9, 0)


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("wanquant's 8-bit attention needs Triton (pip install triton); the PyTorch reference "
                           "attention_int8_reference runs without it")


def _stats_splits(s: int) -> tuple[int, int]:
    """(NSPLIT, tokens per split): a power of two <= MAX_SPLITS splits of whole STATS_BLOCKs."""
    blocks = -(-s // STATS_BLOCK)
    nsplit = min(MAX_SPLITS, 1 << max(0, (blocks - 1).bit_length()))
    per = _ceil_to(-(-s // nsplit), STATS_BLOCK)
    return nsplit, per


def quantize_kv(k: torch.Tensor, v: torch.Tensor, layout: Layout = "bshd", k_block: int = K_BLOCK,
                smooth_k: bool = True, smooth_v: bool = True, v_perm: bool | None = None) -> QuantKV:
    """The K/V pre-pass on the GPU (two Triton kernels); :func:`quantize_kv_reference` is its definition.

    ``v_perm`` (V's token order) defaults to :func:`env_config`'s: the main kernel follows
    whatever order the returned :class:`QuantKV` has.
    """
    _require_triton()
    v_perm = env_config().v_perm if v_perm is None else v_perm
    _check_v_perm(v_perm, k_block)
    k, b, s, h, d = _bshd_view(k, layout)
    v, bv, sv, hv, dv = _bshd_view(v, layout)
    if (b, s, h, d) != (bv, sv, hv, dv):
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    check_head_dim(d)
    if k_block < 16 or k_block & (k_block - 1):
        raise ValueError(f"k_block must be a power of two >= 16, got {k_block}")
    dev = k.device
    s_pad = _ceil_to(s, k_block)
    nsplit, per = _stats_splits(s)
    part = torch.empty(b * h, nsplit, 4, d, dtype=torch.float32, device=dev)
    kst = (k.stride(0), k.stride(1), k.stride(2))
    vst = (v.stride(0), v.stride(1), v.stride(2))
    _kv_stats_kernel[(b * h, nsplit)](k, v, part, s, h, per, *kst, *vst, D=d, BT=STATS_BLOCK, NSPLIT=nsplit,
                                      num_warps=8)
    k8 = torch.empty(b * h, s_pad, d, dtype=torch.int8, device=dev)
    ks = torch.empty(b * h, s_pad // k_block, dtype=torch.float32, device=dev)
    v8t = torch.empty(b * h, d, s_pad, dtype=torch.float8_e4m3fn, device=dev)
    vs = torch.empty(b * h, d, dtype=torch.float32, device=dev)
    vm = torch.empty(b * h, d, dtype=torch.float32, device=dev)
    stat = torch.empty(b * h, 2, d, dtype=torch.float32, device=dev)
    _kv_finalize_kernel[(b * h,)](part, stat, vs, vm, 1.0 / s, D=d, NSPLIT=nsplit, SMOOTH_K=smooth_k,
                                  SMOOTH_V=smooth_v, num_warps=4)
    _kv_quant_kernel[(s_pad // k_block, b * h)](k, v, stat, vm, k8, ks, v8t, s, s_pad, h, *kst, *vst,
                                                D=d, KB=k_block, VPERM=v_perm, num_warps=8 if d >= 128 else 4)
    return QuantKV(k8, ks, v8t, vs, vm, b, h, s, k_block, v_perm)


def attention_prepared(q: torch.Tensor, kv: QuantKV, scale: float | None = None, layout: Layout = "bshd",
                       config: AttnConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit attention of ``q`` against keys/values from :func:`quantize_kv`.

    ``q``: ``[B, S_q, H, D]`` (or ``[B, H, S_q, D]``), any strides with a unit last one
    (e.g. a token slice of a larger buffer). ``out``: same shape and layout as ``q``,
    any float dtype (default: ``q``'s). Returns ``out``.
    """
    _require_triton()
    cfg = config or DEFAULT_CONFIG
    check_config(replace(cfg, v_perm=kv.v_perm), kv.k_block)  # the kernel follows kv's V order
    if cfg.tma and not _has_tma(q.device):
        cfg = replace(cfg, tma=False)
    if cfg.gluon_ws and not _gluon_runs_on(q.device):  # the Triton kernel: same numbers
        cfg = replace(cfg, gluon_ws=False, pv_overlap=False, ping_pong=False)
    qv, b, s_q, h, d = _bshd_view(q, layout)
    if (b, h, d) != (kv.batch, kv.heads, kv.head_dim):
        raise ValueError(f"q {tuple(q.shape)} ({layout}) does not match the keys (B={kv.batch}, H={kv.heads}, "
                         f"D={kv.head_dim})")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")
    ov, *_ = _bshd_view(out, layout)
    if ov.data_ptr() != out.data_ptr() or ov.stride(-1) != 1:
        raise ValueError("out needs a unit last stride")
    qk_c = default_scale(d, scale) * LOG2E / INT8_MAX
    rows = cfg.block_m * (WS_CONSUMERS if cfg.gluon_ws else 1)  # queries per program
    grid = (triton.cdiv(s_q, rows), b * h)
    qst = (qv.stride(0), qv.stride(1), qv.stride(2))
    s_qpad = grid[0] * rows
    if cfg.q_prepass:
        q8 = torch.empty(b * h, s_qpad, d, dtype=torch.int8, device=q.device)
        qs = torch.empty(b * h, s_qpad, dtype=torch.float32, device=q.device)
        _q_quant_kernel[(grid[0] * rows // cfg.block_m, grid[1])](qv, q8, qs, s_q, s_qpad, h, qk_c, *qst, D=d,
                                                                  BM=cfg.block_m, num_warps=4)
    else:
        q8, qs = kv.k8, kv.k_scale  # unused placeholders
    if cfg.gluon_ws:
        attention_ws_launch(q8, qs, kv, ov, s_q, s_qpad, cfg.block_n, cfg.num_stages, cfg.pv_overlap,
                            cfg.ping_pong, LOG2_P_SCALE)
        return out
    k_src, v_src = kv.k8, kv.v8t
    if cfg.tma:
        k_src = TensorDescriptor.from_tensor(kv.k8.view(-1, d), [cfg.block_n, d])
        v_src = TensorDescriptor.from_tensor(kv.v8t.view(-1, kv.seq_pad), [d, cfg.block_n])
    _attn_fwd_kernel[grid](
        qv, q8, qs, k_src, kv.k_scale, v_src, kv.v_scale, kv.v_mean, ov, _ones_e4m3(q.device, cfg.block_n),
        s_q, s_qpad, kv.seq, kv.seq_pad, h, qk_c,
        *qst, ov.stride(0), ov.stride(1), ov.stride(2),
        D=d, BM=cfg.block_m, BN=cfg.block_n, KB=kv.k_block, PV_PROMOTE=cfg.pv_promote, Q_PRE=cfg.q_prepass,
        FOLD=cfg.fold, TMA=cfg.tma, VPERM=kv.v_perm, LMMA=cfg.l_mma, WS=cfg.warp_spec, HALF_EXP=cfg.half_exp,
        LAZY=cfg.lazy_rescale, SLACK=LAZY_SLACK, AHEAD=cfg.qk_ahead,
        TOP=LOG2_P_SCALE - LAZY_SLACK if cfg.lazy_rescale else LOG2_P_SCALE, INTERPRET=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )
    return out


def attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   layout: Layout = "bshd", config: AttnConfig | None = None, k_block: int = K_BLOCK,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit attention (Triton): :func:`quantize_kv` then :func:`attention_prepared`."""
    cfg = config or DEFAULT_CONFIG
    return attention_prepared(q, quantize_kv(k, v, layout, k_block, v_perm=cfg.v_perm), scale, layout, cfg, out)


def env_config() -> AttnConfig:
    """:data:`DEFAULT_CONFIG`, or ``WANQUANT_ATTN_CONFIG=m128-n64-w4-s3[-promote][-qpre]`` (experiments)."""
    text = os.environ.get("WANQUANT_ATTN_CONFIG")
    if not text:
        return DEFAULT_CONFIG
    return parse_config(text)


def parse_config(text: str) -> AttnConfig:
    """Inverse of :meth:`AttnConfig.describe`."""
    parts = text.strip().split("-")
    form = "m128-n128-w8-s3[-promote][-qpre][-fold][-tma][-vperm][-lmma][-r168][-ws][-h16][-lazy][-ahead][-gws][-ov][-pp]"
    try:
        vals = {p[0]: int(p[1:]) for p in parts if p and p[0] in "mnwsr" and p[1:].isdigit()}
        known = {"promote", "qpre", "fold", "tma", "vperm", "lmma", "ws", "h16", "lazy", "ahead", "gws", "ov", "pp"}
        extra = [p for p in parts[4:] if p not in known and not (p[:1] == "r" and p[1:].isdigit())]
        if extra or len(parts) < 4:
            raise ValueError(f"unknown parts {extra}")
        return AttnConfig(vals["m"], vals["n"], vals["w"], vals["s"], pv_promote="promote" in parts,
                          q_prepass="qpre" in parts, fold="fold" in parts, tma="tma" in parts,
                          v_perm="vperm" in parts, l_mma="lmma" in parts,
                          maxnreg=vals.get("r", 0), warp_spec="ws" in parts, half_exp="h16" in parts,
                          lazy_rescale="lazy" in parts, qk_ahead="ahead" in parts, gluon_ws="gws" in parts,
                          pv_overlap="ov" in parts, ping_pong="pp" in parts)
    except (KeyError, ValueError) as e:
        raise ValueError(f"attention config {text!r} is not of the form {form}") from e
