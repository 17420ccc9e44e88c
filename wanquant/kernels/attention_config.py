"""The 8-bit attention's configuration (:mod:`wanquant.kernels.attention` describes the design).

Its constants, the input layouts, :class:`AttnConfig` (the main kernel's launch options,
each with why it exists and what it measured), :data:`DEFAULT_CONFIG` and the
:data:`CONFIGS` the benchmark sweeps, their checks and parsing, and :class:`QuantKV` (what
the K/V pre-pass hands the main kernel). No Triton here: the PyTorch references, the
launchers and the Gluon kernel's checks all read it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

from wanquant.kernels.attention_ws import BLOCK_M as WS_BLOCK_M
from wanquant.kernels.attention_ws import MAX_BLOCK_N as WS_MAX_BLOCK_N
from wanquant.kernels.exp2_fma import PACKS as EXP2_FMA_PACKS

Layout = Literal["bshd", "bhsd"]

LOG2E = 1.4426950408889634
INT8_MAX = 127.0
E4M3_MAX = 448.0
P_SCALE = E4M3_MAX  # P in [0, 1] is stored times 448: e4m3's whole range
LOG2_P_SCALE = math.log2(P_SCALE)
K_BLOCK = 128  # tokens per K scale; every main-loop tile (BLOCK_N) lies inside one such block
STATS_BLOCK = 128  # tokens per split unit of the K/V statistics kernel
# Tokens per load of the K/V statistics kernel: its four [STATS_TILE, D] fp32 accumulators
# take 75 registers per thread at 8 warps (ptxas, sm_90, D = 128): 3 CTAs per SM; 32 take 148.
STATS_TILE = 16
MAX_SPLITS = 32  # programs per (batch, head) in the statistics kernel
_MAGIC_F = 12582912.0  # 1.5 * 2^23: (x + M) - M rounds |x| < 2^22 to an integer, ties to even
_MAGIC_I = 0x4B400000  # the bits of 1.5 * 2^23
# lazy_rescale: how far (log2) a row's maximum may outgrow P's reference before a rescale.
# 2: on Gaussian scores 11 % of 64x128 tiles rescale at 8,192 keys (5 % of the last 32),
# and the error against exact attention moves from 3.96 % to 4.01 %.
LAZY_SLACK = 2.0
HALF_EXP_MAX_BLOCK_N = 128  # 128 x 448 < 65,504: a tile's fp16 row sum cannot overflow
V_PERM_BLOCK = 32  # tokens per block of the v_perm token order (one k32 step of the FP8 wgmma)
TRITON_MAX_STAGES = 3  # K/V stages of the Triton kernel where the Gluon one does not run (config_for)


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
    # instructions. In the Triton kernel, measured 37 % slower on an H100 at 64x128
    # (attention_variants_lazy.md): the extra tile does not fit beside what two CTAs per SM
    # leave each thread, and Triton waits for each wgmma right after issuing it. With
    # gluon_ws and pv_overlap (the Gluon kernel's 240 registers a consumer, explicit waits):
    # Q.K^T(j+1) and P.V(j-1) both run under tile j's softmax; not yet timed.
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
    # With gluon_ws: consumer warpgroups per program (64 queries each). Three give each SM
    # sub-partition a third warp to issue while the others wait (the kernel looks latency-
    # bound: KERNEL_NOTES.md), at 160 registers, which hold 64-key tiles only. Measured on
    # an H100 (results/attention_h100_c3.md): 144.45 / 145.09 ms (four / six stages) against
    # the two-consumer default's 143.66 at 75,600 tokens, so it stays an option.
    consumers: int = 2
    # With gluon_ws: one exponential in every exp2_fma (2, 4 or 8; 0: none) of each thread's
    # unmasked tiles is computed by a polynomial on the FP32 pipe instead of MUFU
    # (FlashAttention-4's emulation, kernels/exp2_fma.py; 7.5e-5 relative, under P's e4m3
    # rounding). MUFU takes as long per tile as the tensor cores and the kernel measures near
    # their sum, so a shorter MUFU queue per softmax may shorten the tile; it costs about eight
    # issued instructions per emulated exponential.
    exp2_fma: int = 0
    # With pv_overlap: tile j's accumulator rescale is issued after tile j+1's Q.K^T instead of
    # before it, so that it runs while that product does (64 FMUL per thread leave the chain
    # from one Q.K^T's wait to the next one's issue). Same operations, same bits.
    defer_rescale: bool = False
    # With gluon_ws: each row's maximum of a tile as a tree over the register bits of the
    # column before the lane shuffles (attention_ws._row_max_tree), a chain a few maxima deep
    # instead of fifteen. Integer maxima: the same bits. In the H100 stall profile of
    # 2026-12-07 the row maxima were 16 % of a consumer's time per tile; with the tree the
    # kernel is 3.2 % faster at 75,600 tokens (DEFAULT_CONFIG's comment).
    tree_max: bool = False

    @property
    def ws_overlap(self) -> int:
        """The Gluon kernel's schedule: 0 tile by tile, 1 overlapped, 2 overlapped with the
        rescale deferred, 3 overlapped with the next Q.K^T issued ahead of the softmax."""
        if not self.pv_overlap:
            return 0
        return 3 if self.qk_ahead else 2 if self.defer_rescale else 1

    def describe(self) -> str:
        flags = [("promote", self.pv_promote), ("qpre", self.q_prepass), ("fold", self.fold),
                 ("tma", self.tma), ("vperm", self.v_perm),
                 ("lmma", self.l_mma), (f"r{self.maxnreg}", self.maxnreg > 0), ("ws", self.warp_spec),
                 ("h16", self.half_exp), ("lazy", self.lazy_rescale),
                 ("ahead", self.qk_ahead), ("gws", self.gluon_ws), ("ov", self.pv_overlap),
                 ("dr", self.defer_rescale), ("tm", self.tree_max), ("pp", self.ping_pong),
                 (f"c{self.consumers}", self.consumers != 2), (f"e{self.exp2_fma}", self.exp2_fma > 0)]
        tail = "".join(f"-{name}" for name, on in flags if on)
        return f"m{self.block_m}-n{self.block_n}-w{self.num_warps}-s{self.num_stages}{tail}"


# Fastest measured: the Triton kernel's best tiles (64-row tiles, Q quantized in a pre-pass,
# K/V tiles by TMA, the exponent's offset folded into its FMA, V permuted for the wgmma
# operand order; on an H100, 2026-12-06: 26.66 ms at 32,760 tokens, 144.38 at 75,600) run as
# the warp-specialized Gluon kernel with Q.K^T(j) and P.V(j-1) in flight together
# (``gws-ov``): on an H200, 2026-12-07, 27.20 / 142.50 ms against the Triton kernel's
# 27.35 / 146.17 in the same run (benchmarks/results/attention_gluon.md). Three K/V stages: two
# H100 runs of 2026-12-07 (75,600 tokens) ranked three against four both ways (143.52 vs
# 139.31 ms, then 141.15 vs 144.26; five: 142.93): no difference beyond run-to-run noise.
# Two stages leave no prefetch slot beside the two tiles in flight: 229.78 ms. The row
# maxima as a tree (``tm``, same bits): on an H100, 2026-12-07 21:38, 25.15 / 135.53 ms
# against 140.00 without it at 75,600 tokens (four stages without it: 139.69), 1.45x / 1.47x
# SDPA cuDNN (benchmarks/results/attention.md). Where Gluon's Hopper API is missing or the
# GPU is not sm_90 the same config runs the Triton kernel (same numbers,
# :func:`~wanquant.kernels.attention.config_for`); ``tma`` is dropped before sm_90.
DEFAULT_CONFIG = AttnConfig(block_m=64, block_n=128, num_warps=4, num_stages=3, q_prepass=True, fold=True,
                            v_perm=True, tma=True, gluon_ws=True, pv_overlap=True, tree_max=True)
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
    if cfg.defer_rescale and not cfg.pv_overlap:
        raise ValueError("defer_rescale reorders the overlapped schedule: set gluon_ws and pv_overlap too")
    if cfg.ping_pong and not cfg.pv_overlap:
        raise ValueError("ping_pong orders the overlapped schedule's wgmmas: set gluon_ws and pv_overlap too")
    if cfg.gluon_ws:
        _check_gluon_config(cfg)
    elif cfg.consumers != 2 or cfg.exp2_fma or cfg.tree_max:
        raise ValueError("consumers, exp2_fma and tree_max are options of the Gluon kernel: set gluon_ws too")
    if cfg.half_exp and (cfg.block_n > HALF_EXP_MAX_BLOCK_N or cfg.l_mma):
        raise ValueError(f"half_exp sums a tile's P in fp16: needs block_n <= {HALF_EXP_MAX_BLOCK_N} "
                         f"(got {cfg.block_n}) and l_mma off (got {cfg.l_mma})")


def _check_gluon_config(cfg: AttnConfig) -> None:
    """What the warp-specialized Gluon kernel implements (kernels/attention_ws.py)."""
    needs = {"q_prepass": cfg.q_prepass, "fold": cfg.fold, "tma": cfg.tma, "v_perm": cfg.v_perm}
    missing = [name for name, on in needs.items() if not on]
    other = {"pv_promote": cfg.pv_promote, "l_mma": cfg.l_mma, "warp_spec": cfg.warp_spec, "half_exp": cfg.half_exp,
             "lazy_rescale": cfg.lazy_rescale, "maxnreg": cfg.maxnreg > 0}
    extra = [name for name, on in other.items() if on]
    if missing or extra:
        raise ValueError(f"gluon_ws needs {missing} on and {extra} off (the Gluon kernel has one code path: "
                         "q_prepass, fold, tma, v_perm)")
    if (cfg.block_m, cfg.num_warps) != (WS_BLOCK_M, 4) or cfg.block_n not in (64, 128) or cfg.num_stages < 2:
        raise ValueError(f"gluon_ws runs {WS_BLOCK_M} queries per 4-warp consumer, block_n 64 or 128 and >= 2 "
                         f"stages; got {cfg.describe()}")
    if cfg.consumers not in WS_MAX_BLOCK_N or cfg.block_n > WS_MAX_BLOCK_N[cfg.consumers]:
        raise ValueError(f"gluon_ws runs {' or '.join(map(str, WS_MAX_BLOCK_N))} consumers with block_n up to "
                         f"{WS_MAX_BLOCK_N} (what their registers hold); got {cfg.describe()}")
    if cfg.ping_pong and cfg.consumers != 2:
        raise ValueError("ping_pong alternates two consumers: use consumers=2")
    if cfg.qk_ahead and (not cfg.pv_overlap or cfg.ping_pong or cfg.defer_rescale):
        raise ValueError("qk_ahead in the Gluon kernel is its own overlapped schedule: set pv_overlap, "
                         "not ping_pong or defer_rescale")
    if cfg.qk_ahead and cfg.num_stages < 3:  # tiles j-1 (P.V), j and j+1 (Q.K^T) hold a slot each
        raise ValueError(f"qk_ahead in the Gluon kernel needs three K/V stages or more, got {cfg.num_stages}")
    if cfg.exp2_fma and cfg.exp2_fma not in EXP2_FMA_PACKS:
        raise ValueError(f"exp2_fma is one exponential in every {EXP2_FMA_PACKS} (or 0: none); got {cfg.exp2_fma}")


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def query_scale_factor(head_dim: int, scale: float | None) -> float:
    """What an INT8 query's row maximum is multiplied by for its scale: the softmax scale
    times log2(e) (the kernels exponentiate base 2) over 127."""
    return default_scale(head_dim, scale) * LOG2E / INT8_MAX


def _check_v_perm(v_perm: bool, k_block: int) -> None:
    if v_perm and k_block % V_PERM_BLOCK:
        raise ValueError(f"v_perm needs k_block a multiple of {V_PERM_BLOCK}, got {k_block}")


def env_config() -> AttnConfig:
    """:data:`DEFAULT_CONFIG`, or ``WANQUANT_ATTN_CONFIG=m128-n64-w4-s3[-promote][-qpre]`` (experiments)."""
    text = os.environ.get("WANQUANT_ATTN_CONFIG")
    if not text:
        return DEFAULT_CONFIG
    return parse_config(text)


def parse_config(text: str) -> AttnConfig:
    """Inverse of :meth:`AttnConfig.describe`."""
    parts = text.strip().split("-")
    form = ("m128-n128-w8-s3[-promote][-qpre][-fold][-tma][-vperm][-lmma][-r168][-ws][-h16][-lazy][-ahead][-gws][-ov]"
            "[-dr][-tm][-pp][-c3][-e4]")
    try:
        vals = {p[0]: int(p[1:]) for p in parts if p and p[0] in "mnwsrce" and p[1:].isdigit()}
        known = {"promote", "qpre", "fold", "tma", "vperm", "lmma", "ws", "h16", "lazy", "ahead", "gws", "ov", "dr", "tm",
                 "pp"}
        extra = [p for p in parts[4:] if p not in known and not (p[:1] in "rce" and p[1:].isdigit())]
        if extra or len(parts) < 4:
            raise ValueError(f"unknown parts {extra}")
        return AttnConfig(vals["m"], vals["n"], vals["w"], vals["s"], pv_promote="promote" in parts,
                          q_prepass="qpre" in parts, fold="fold" in parts, tma="tma" in parts,
                          v_perm="vperm" in parts, l_mma="lmma" in parts,
                          maxnreg=vals.get("r", 0), warp_spec="ws" in parts, half_exp="h16" in parts,
                          lazy_rescale="lazy" in parts, qk_ahead="ahead" in parts, gluon_ws="gws" in parts,
                          pv_overlap="ov" in parts, defer_rescale="dr" in parts, tree_max="tm" in parts,
                          ping_pong="pp" in parts,
                          consumers=vals.get("c", 2), exp2_fma=vals.get("e", 0))
    except (KeyError, ValueError) as e:
        raise ValueError(f"attention config {text!r} is not of the form {form}") from e
