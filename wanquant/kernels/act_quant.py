"""Activation side of the Hopper W4A4 path: MXFP4 quantization written as FP8 rows.

MXFP4 x MXFP4 maps exactly onto FP8 (e4m3) x FP8 with one fp32 scale per row
(DESIGN.md section 4). For a token row with MX group exponents ``e_g`` we store

    v = q * 2^(e_g - s)  in e4m3,     row scale 2^s,     s = max(e_row - HEADROOM, ROW_EXP_MIN)

where ``q`` is the E2M1 value of an element and ``e_row = max_g e_g``. E2M1 values times
``2^d`` are exact in e4m3 for ``-8 <= d <= 6`` (``6 * 2^6 = 384 <= 448``), so using
``HEADROOM = 6`` instead of 0 keeps groups up to 14 binades below the row maximum exact
(with 0 it would be 8). Groups further down keep only their part above 2^-9 (e4m3's
smallest subnormal step, rounded to nearest even); :func:`fp8_rows_reference` rounds
the same way and the tests check both regions.

One kernel reads ``x`` (bf16 ``[M, K]``) and writes, per row block:
  * the e4m3 values ``[M_pad, K]`` and the fp32 row scales ``2^s`` ``[M_pad]``;
  * the low-rank down projection ``(x / smooth) @ L1^T`` as bf16 ``[M_pad, NSPLIT * R]``.
    The smoothing is folded into the projection at load time (``L1s = L1 diag(1/s)``,
    kept as a bf16 hi/lo pair, :func:`lowrank_weights`), so the raw bf16 ``x`` tile is
    the tensor-core operand; the fp32 result is written as a hi/lo bf16 pair
    (``NSPLIT = 2``) whose sum carries ~16 mantissa bits. The low-rank branch is thus
    about fp32-accurate although all its GEMMs run in bf16.

It makes two passes over each row block: the row maximum must be known before any
value is written. The first pass also runs the low-rank dot; the second re-reads
``x`` and writes the e4m3 values.

Rounding in the second pass works at the row scale directly: with ``u = |x'| 2^-s`` and
a group shift ``d = e_g - s``, E2M1 rounding is round-to-nearest-even at spacing
``2^(max(floor(log2 u), d) - 1)`` (one mantissa bit; 2^(d-1) in the E2M1 subnormal
range), done by adding and subtracting ``1.5 * 2^(23 + spacing)``; saturation is
``min(., 6 * 2^d)``; the cast to e4m3 then rounds to nearest even (a no-op unless
``d < -8``). About 20 instructions per element in the second pass.

Every kernel here has a PyTorch reference built from :mod:`wanquant.formats.mxfp4`.
Kernel code avoids the two things Triton's CPU interpreter does differently from the
GPU (fp32->bf16/fp8 conversions truncate there, bf16 dots are wrong there): values are
rounded explicitly with integer/float arithmetic before any narrowing conversion, so
the conversion itself is exact, and dots run in fp32 under the interpreter.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from wanquant.formats.mxfp4 import E8M0_BIAS, E8M0_MIN_EXP, MXFP4Format, ScaleRule

try:  # triton is optional: the references below need only torch
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

GROUP = 32  # the MX group size these kernels implement (MXFP4 g32 only)
HEADROOM = 6  # 6 * 2^6 = 384 fits e4m3 (max 448); 2^7 would not
ROW_EXP_MIN = -100  # keeps 2^s and 2^-s normal in fp32 and bf16 for all-zero/tiny rows
SHIFT_MIN = -30  # shifts below about -13 give 0 in e4m3 already; clamping keeps 2^d normal
E4M3_SUBNORMAL_STEP_EXP = -9  # e4m3's smallest step is 2^-9
_RNE_MAGIC = 12582912.0  # 1.5 * 2^23: (t + M) - M rounds |t| < 2^22 to an integer, ties to even


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def padded_rank(rank: int) -> int:
    """Low-rank width used by the kernels: a power of two >= 16 (tl.dot needs >= 16)."""
    if rank <= 0:
        return 0
    return max(16, 1 << (rank - 1).bit_length())


def pad_rows(m: int, multiple: int = 16) -> int:
    """Row count of the activation buffers (cuBLAS FP8 wants 16-aligned operands)."""
    return max(multiple, -(-m // multiple) * multiple)


# ---------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------
def row_exponents_from_group_exponents(e: torch.Tensor) -> torch.Tensor:
    """Row exponent ``s = max(max_g e_g - HEADROOM, ROW_EXP_MIN)`` (int32) for ``e [..., G]``."""
    return (e.amax(dim=-1).to(torch.int32) - HEADROOM).clamp_min(ROW_EXP_MIN)


def fp8_rows_reference(values: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """e4m3 encoding of dequantized MX values ``values [M, K]`` relative to row exponents ``s``.

    Each element is ``q * 2^e_g``; it is stored as ``q * 2^(e_g - s)`` rounded to e4m3 by
    PyTorch's round-to-nearest-even cast (exact where ``e_g - s >= -8``). Zeros are +0.
    """
    scaled = values.to(torch.float64) * torch.exp2(-s.to(torch.float64)).unsqueeze(-1)  # exact in fp64
    q8 = scaled.to(torch.float8_e4m3fn)
    return torch.where(q8.float() == 0, torch.zeros_like(q8), q8)  # zeros are +0, as the kernels write them


def row_absmax_reference(x: torch.Tensor, inv_smooth: torch.Tensor) -> torch.Tensor:
    """``max_k |x[m, k] * (1/smooth)[k]|`` in fp32 ``[M]``: what the activation kernel's first
    pass finds (the product is one fp32 rounding and the maximum is exact, so any code that
    computes it this way gets the same bits)."""
    return (x.float() * inv_smooth.float()).abs().amax(dim=-1)


class ActQuantOut(NamedTuple):
    """What the activation kernel writes (rows padded to ``M_pad``)."""

    q: torch.Tensor  # float8_e4m3fn [M_pad, K]
    row_scale: torch.Tensor  # fp32 [M_pad], 2^s
    lowrank: torch.Tensor | None  # bf16 [M_pad, NSPLIT * R_pad]: (hi | lo) of (x / smooth) @ L1^T
    exps: torch.Tensor | None  # int8 [M_pad, K / 32] group exponents (debug output)


def bf16_split(v: torch.Tensor, nsplit: int) -> list[torch.Tensor]:
    """``v`` (fp32) as ``nsplit`` bf16 terms whose sum approximates it (hi, then lo)."""
    hi = v.to(torch.bfloat16)
    if nsplit == 1:
        return [hi]
    return [hi, (v - hi.float()).to(torch.bfloat16)]


def lowrank_weights(l1: torch.Tensor, inv_smooth: torch.Tensor, nsplit: int = 2) -> torch.Tensor:
    """The kernel's low-rank operand ``(L1 diag(1/smooth))^T``, bf16 ``[K, nsplit * R_pad]``.

    Folding the smoothing into L1 lets the raw bf16 input feed the tensor cores; the fp32
    product ``L1 * (1/smooth)`` is kept as hi | lo bf16 column blocks (~16 mantissa bits),
    which one dot of width ``nsplit * R_pad`` applies at once.
    """
    r, k = l1.shape
    r_pad = padded_rank(r)
    folded = torch.zeros(k, r_pad, dtype=torch.float32, device=l1.device)
    folded[:, :r] = (l1.float() * inv_smooth.float()[None, :]).T
    return torch.cat(bf16_split(folded, nsplit), dim=1).contiguous()


def lowrank_width(l1s: torch.Tensor | None, nsplit_w: int = 2) -> int:
    """R_pad of a :func:`lowrank_weights` operand (0 for None)."""
    return 0 if l1s is None else l1s.shape[1] // nsplit_w


def act_quant_reference(
    x: torch.Tensor,
    inv_smooth: torch.Tensor,
    l1s: torch.Tensor | None,
    clip_ratio: float,
    exp_offset: int,
    scale_rule: ScaleRule = "ocp_floor",
    nsplit: int = 2,
    m_pad: int | None = None,
) -> ActQuantOut:
    """What :func:`act_quant` computes, from :mod:`wanquant.formats.mxfp4` (CPU, fp32).

    ``x [M, K]``; ``inv_smooth = 1 / smooth`` (fp32 [K]); ``l1s`` from
    :func:`lowrank_weights` or None. The low-rank output is the fp64 product of the
    kernel's own operands (``x`` and ``l1s``), so it differs from the kernel's only by
    fp32 accumulation order.
    """
    m, k = x.shape
    m_pad = pad_rows(m) if m_pad is None else m_pad
    fmt = MXFP4Format(GROUP, scale_rule)
    xs = x.float() * inv_smooth.float()
    qz = fmt.quantize(xs, clip_ratio, exp_offset)
    e = qz.scales.to(torch.int32) - E8M0_BIAS
    s = row_exponents_from_group_exponents(e)
    q8 = fp8_rows_reference(fmt.dequantize(qz), s)

    out_q = torch.zeros(m_pad, k, dtype=torch.float8_e4m3fn)
    out_q[:m] = q8
    row_scale = torch.full((m_pad,), 2.0**ROW_EXP_MIN, dtype=torch.float32)
    row_scale[:m] = torch.exp2(s.double()).float()
    exps = torch.full((m_pad, k // GROUP), E8M0_MIN_EXP, dtype=torch.int8)
    exps[:m] = e.to(torch.int8)

    lowrank = None
    if l1s is not None:
        r_pad = lowrank_width(l1s)
        lr = x.double() @ (l1s[:, :r_pad].double() + l1s[:, r_pad:].double())  # fp64 of the kernel's operands
        lowrank = torch.zeros(m_pad, nsplit * r_pad, dtype=torch.bfloat16)
        for i, part in enumerate(bf16_split(lr.float(), nsplit)):
            lowrank[:m, i * r_pad : (i + 1) * r_pad] = part
    return ActQuantOut(out_q, row_scale, lowrank, exps)


# ---------------------------------------------------------------------------------
# Triton helpers shared with weight_prep.py
# ---------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _exp2i(e):
        """2^e as fp32 for integer e in [-126, 127], built from the exponent bits."""
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _mx_exponent(amax, clip_ratio, exp_offset, SAFE_CEIL: tl.constexpr):
        """formats.mxfp4.mx_group_exponents on fp32 maxima (int32 result), read from the bits."""
        bits = (amax * clip_ratio).to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127 - 2  # floor(log2(a)) - E2M1_EMAX
        if SAFE_CEIL:
            # a > 6 * 2^e  <=>  a's significand > 1.5 (exact for normal a; subnormal a
            # ends at the -127 clamp either way for |exp_offset| <= 1)
            e += ((bits & 0x7FFFFF) > 0x400000).to(tl.int32)
        e = e + exp_offset
        return tl.minimum(tl.maximum(e, -127), 127)

    @triton.jit
    def _to_e4m3_grid(q, d):
        """``q * 2^d`` (q an E2M1 magnitude, d <= 6 int) rounded onto e4m3's grid, as fp32.

        The product scaled by 2^9 is an integer whenever it is exact in e4m3; otherwise
        (d < -8) the magic-number add rounds it to nearest-even, as a hardware cast would.
        The returned value is exactly representable, so the narrowing cast is exact.
        """
        t = q * _exp2i(tl.maximum(d, -30) + 9)
        t = (t + 12582912.0) - 12582912.0
        return t * 0.001953125  # 2^-9

    @triton.jit
    def _round_bf16(v):
        """fp32 -> nearest-even bf16 value, kept in fp32 (finite inputs)."""
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _gelu_tanh_bf16(x):
        """The tanh GELU of a bf16 tile, in fp32 and rounded to bf16: torch's
        ``0.5 x (1 + tanh(u))``, ``u = sqrt(2 / pi) (x + 0.044715 x^3)``, written as
        ``x / (1 + e^(-2u))``: the same function without the cancellation of ``1 + tanh(u)``
        for negative x (there torch's fp32 result is the less accurate one; on Gaussian
        inputs 1.6 % of the bf16 values differ by one step, the 4-bit codes almost never)."""
        v = x.to(tl.float32)
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        return _round_bf16(v / (1.0 + tl.exp(-2.0 * u))).to(tl.bfloat16)

    @triton.jit
    def _lowrank_dot(x, l1s_ptr, cols, acc, RW: tl.constexpr, INTERPRET: tl.constexpr):
        """``acc + x @ L1s[cols]`` (fp32 accumulator ``[BM, RW]``)."""
        w = tl.load(l1s_ptr + cols[:, None] * RW + tl.arange(0, RW)[None, :])  # [BK, RW] bf16
        if INTERPRET:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
            return tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(x, w, acc)

    @triton.jit
    def _store_lowrank(acc, lr_ptr, rows64, row_in, R: tl.constexpr, NSPLIT_W: tl.constexpr,
                       NSPLIT: tl.constexpr, BM: tl.constexpr):
        lr = tl.sum(tl.reshape(acc, (BM, NSPLIT_W, R)), axis=1)  # x.hi + x.lo
        rr = tl.arange(0, R)
        lr_hi = _round_bf16(lr)
        lr_base = lr_ptr + rows64[:, None] * (NSPLIT * R) + rr[None, :]
        tl.store(lr_base, lr_hi.to(tl.bfloat16), mask=row_in[:, None])
        if NSPLIT == 2:
            tl.store(lr_base + R, _round_bf16(lr - lr_hi).to(tl.bfloat16), mask=row_in[:, None])

    @triton.jit
    def _act_quant_block(
        blk, x_ptr, inv_s_ptr, l1s_ptr, q_ptr, sa_ptr, lr_ptr, exps_ptr, amax_ptr,
        M, M_pad, K, stride_xm, clip_ratio, exp_offset,
        R: tl.constexpr, NSPLIT_W: tl.constexpr, NSPLIT: tl.constexpr, HAS_LR: tl.constexpr,
        SAFE_CEIL: tl.constexpr, WRITE_EXPS: tl.constexpr, AMAX_IN: tl.constexpr, GELU: tl.constexpr,
        INTERPRET: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BK1: tl.constexpr,
    ):
        """Row block ``blk`` of :func:`_act_quant_kernel` (GELU: ``x`` is the pre-activation;
        both passes quantize its GELU, so it is never written to memory)."""
        rows = blk * BM + tl.arange(0, BM)
        row_ok = rows < M
        row_in = rows < M_pad
        rows64 = rows.to(tl.int64)
        cols0 = tl.arange(0, BK)
        nk = K // BK

        # ---- pass 1: row absmax (-> row exponent) and the low-rank down projection ----
        # (its own K step BK1: a wide branch, LoRAs appended, needs a shorter weight tile
        # to fit the pipelined shared memory; see dispatch.fit_act_launch)
        # (AMAX_IN: the row maxima were computed by whoever wrote x, e.g. fused by Inductor
        # into the norm that produced it; the low-rank dot then runs in pass 2, at K step BK,
        # and x is read once.)
        RW: tl.constexpr = NSPLIT_W * R  # hi | lo column blocks of L1 diag(1/smooth)
        if HAS_LR:
            acc = tl.zeros((BM, RW), dtype=tl.float32)
        if AMAX_IN:
            amax = tl.load(amax_ptr + rows, mask=row_ok, other=0.0)
        else:
            amax = tl.zeros((BM,), dtype=tl.float32)
            cols1 = tl.arange(0, BK1)
            for kb in range(K // BK1):
                cols = kb * BK1 + cols1
                x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None], other=0.0)
                if GELU:
                    x = _gelu_tanh_bf16(x)
                xs = x.to(tl.float32) * tl.load(inv_s_ptr + cols)[None, :]
                amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=1))
                if HAS_LR:
                    acc = _lowrank_dot(x, l1s_ptr, cols, acc, RW, INTERPRET)

        e_row = _mx_exponent(amax, clip_ratio, exp_offset, SAFE_CEIL)
        s = tl.maximum(e_row - 6, -100)  # HEADROOM, ROW_EXP_MIN
        tl.store(sa_ptr + rows, _exp2i(s), mask=row_in)
        if HAS_LR and not AMAX_IN:
            _store_lowrank(acc, lr_ptr, rows64, row_in, R, NSPLIT_W, NSPLIT, BM)

        # ---- pass 2: group exponents, E2M1 rounding at the row scale, e4m3 values ----
        # (x is re-read; the next tile's load is issued before this one is processed so
        # that a load is always in flight: Triton pipelines only loops with dots.)
        G: tl.constexpr = BK // 32
        inv_row = _exp2i(-s)[:, None, None]
        x_ptrs = x_ptr + rows64[:, None] * stride_xm + cols0[None, :]
        x_next = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        inv_next = tl.load(inv_s_ptr + cols0)
        for kb in range(nk):
            cols = kb * BK + cols0
            x = x_next
            if GELU:
                x = _gelu_tanh_bf16(x)
            inv = inv_next
            k_next = tl.minimum(kb + 1, nk - 1) * BK  # the last iteration re-reads its own tile (cached)
            x_next = tl.load(x_ptrs + k_next, mask=row_ok[:, None], other=0.0)
            inv_next = tl.load(inv_s_ptr + k_next + cols0)
            if AMAX_IN and HAS_LR:
                acc = _lowrank_dot(x, l1s_ptr, cols, acc, RW, INTERPRET)
            xs3 = tl.reshape(x.to(tl.float32) * inv[None, :], (BM, G, 32))
            ax3 = tl.abs(xs3)
            e = _mx_exponent(tl.max(ax3, axis=2), clip_ratio, exp_offset, SAFE_CEIL)  # [BM, G]
            d = tl.maximum(e - s[:, None], -30)[:, :, None]  # group shift vs the row scale
            if AMAX_IN:  # a given maximum below the true one would overflow e4m3: saturate instead
                d = tl.minimum(d, 6)
            u = ax3 * inv_row  # exact: power-of-two scaling
            ub = u.to(tl.int32, bitcast=True) >> 23  # biased binade of u (u >= 0)
            sp = tl.maximum(ub, d + 127)  # biased exponent of (spacing * 2)
            magic = ((sp + 22) << 23 | 0x400000).to(tl.float32, bitcast=True)  # 1.5 * 2^(23 + spacing)
            r = (u + magic) - magic  # E2M1 round-to-nearest-even at this element's spacing
            r = tl.minimum(r, _exp2i(d) * 6.0)  # E2M1 saturates at 6
            if INTERPRET:  # e4m3's 2^-9 grid (1.5 * 2^14), changes only d < -8: the GPU's cast
                r = (r + 24576.0) - 24576.0  # rounds to nearest even itself, the interpreter's truncates
            val = tl.where((xs3 < 0) & (r > 0), -r, r)  # -0 stays +0, as in formats
            out = tl.reshape(val, (BM, BK)).to(tl.float8e4nv)
            tl.store(q_ptr + rows64[:, None] * K + cols[None, :], out, mask=row_in[:, None])
            if WRITE_EXPS:
                gcols = kb * G + tl.arange(0, G)
                tl.store(exps_ptr + rows64[:, None] * (K // 32) + gcols[None, :], e.to(tl.int8), mask=row_in[:, None])
        if AMAX_IN and HAS_LR:
            _store_lowrank(acc, lr_ptr, rows64, row_in, R, NSPLIT_W, NSPLIT, BM)

    @triton.jit
    def _act_quant_kernel(
        x_ptr, inv_s_ptr, l1s_ptr, q_ptr, sa_ptr, lr_ptr, exps_ptr, amax_ptr,
        M, M_pad, K, stride_xm, clip_ratio, exp_offset, NBLK,
        R: tl.constexpr, NSPLIT_W: tl.constexpr, NSPLIT: tl.constexpr, HAS_LR: tl.constexpr,
        SAFE_CEIL: tl.constexpr, WRITE_EXPS: tl.constexpr, AMAX_IN: tl.constexpr, GELU: tl.constexpr,
        GRID_STRIDE: tl.constexpr,
        INTERPRET: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BK1: tl.constexpr,
    ):
        # GRID_STRIDE: fewer programs than row blocks (``programs``), each looping over
        # blocks, so that the blocks in flight may fit in L2 and the second pass re-read x
        # from there. Without it the block is not wrapped in a loop: the loop costs
        # registers (more spills at 64-row blocks, in ptxas's counts for sm_90).
        if GRID_STRIDE:
            for blk in range(tl.program_id(0), NBLK, tl.num_programs(0)):
                _act_quant_block(blk, x_ptr, inv_s_ptr, l1s_ptr, q_ptr, sa_ptr, lr_ptr, exps_ptr, amax_ptr,
                                 M, M_pad, K, stride_xm, clip_ratio, exp_offset, R, NSPLIT_W, NSPLIT, HAS_LR,
                                 SAFE_CEIL, WRITE_EXPS, AMAX_IN, GELU, INTERPRET, BM, BK, BK1)
        else:
            _act_quant_block(tl.program_id(0), x_ptr, inv_s_ptr, l1s_ptr, q_ptr, sa_ptr, lr_ptr, exps_ptr, amax_ptr,
                             M, M_pad, K, stride_xm, clip_ratio, exp_offset, R, NSPLIT_W, NSPLIT, HAS_LR,
                             SAFE_CEIL, WRITE_EXPS, AMAX_IN, GELU, INTERPRET, BM, BK, BK1)


def _pick_bk(k: int, preferred: int = 512, minimum: int = GROUP) -> int:
    """Largest power of two <= preferred that divides ``k``; at least ``minimum``."""
    bk = preferred
    while k % bk:
        bk //= 2
    if bk < minimum:
        raise ValueError(f"{k} must be a multiple of {minimum}")
    return bk


def act_quant(
    x: torch.Tensor,
    inv_smooth: torch.Tensor,
    l1s: torch.Tensor | None,
    clip_ratio: float,
    exp_offset: int,
    scale_rule: ScaleRule = "ocp_floor",
    nsplit: int = 2,
    m_pad: int | None = None,
    write_exps: bool = False,
    block_m: int = 64,
    block_k: int = 128,
    num_warps: int = 8,
    num_stages: int = 3,
    out: ActQuantOut | None = None,
    block_k_lr: int | None = None,
    programs: int | None = None,
    row_amax: torch.Tensor | None = None,
    gelu_input: bool = False,
) -> ActQuantOut:
    """Quantize ``x [M, K]`` (bf16) to e4m3 rows; see the module docstring.

    ``l1s``: the folded low-rank projection from :func:`lowrank_weights` (bf16
    ``[K, 2 * R_pad]``), or None. ``out`` lets a caller reuse (or poison) buffers.
    ``block_k_lr``: the K step of the first pass (the low-rank dot), default ``block_k``.
    ``programs``: how many programs share the row blocks (default: one per block).
    ``row_amax``: fp32 ``[M]``, exactly :func:`row_absmax_reference` of ``x`` (not checked:
    a smaller value overflows e4m3), computed where ``x`` was written; then ``x`` is read
    once instead of twice. Ignored where the low-rank dot needs its own K step
    (``block_k_lr`` below ``block_k``: a wide branch).
    ``gelu_input``: ``x`` is the input of a tanh GELU; the kernel quantizes ``gelu(x)``
    rounded to bf16 (``_gelu_tanh_bf16``: torch's function, a step apart on a few values),
    so the GELU's output is never written (not with ``row_amax``: its maxima are of the
    GELU's output).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if x.ndim != 2 or x.stride(1) != 1 or x.dtype != torch.bfloat16:
        raise ValueError("x must be a bf16 2-D tensor with contiguous rows")
    m, k = x.shape
    if k % GROUP:
        raise ValueError(f"K={k} must be a multiple of {GROUP}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    m_pad = pad_rows(m) if m_pad is None else m_pad
    nsplit_w = 2
    r = lowrank_width(l1s, nsplit_w)
    if r and (l1s.shape[0] != k or not l1s.is_contiguous()):
        raise ValueError(f"l1s must be contiguous [{k}, 2 * R_pad] (lowrank_weights), got {tuple(l1s.shape)}")
    dev = x.device
    if out is None:
        out = ActQuantOut(
            torch.empty(m_pad, k, dtype=torch.float8_e4m3fn, device=dev),
            torch.empty(m_pad, dtype=torch.float32, device=dev),
            torch.empty(m_pad, nsplit * r, dtype=torch.bfloat16, device=dev) if r else None,
            torch.empty(m_pad, k // GROUP, dtype=torch.int8, device=dev) if write_exps else None,
        )
    bk = _pick_bk(k, block_k)
    bk1 = bk if block_k_lr is None else _pick_bk(k, block_k_lr)
    nblk = triton.cdiv(m_pad, block_m)
    if programs is not None and programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    grid = (nblk if programs is None else min(programs, nblk),)
    if row_amax is not None and gelu_input:
        raise ValueError("row_amax with gelu_input: the maxima would have to be of gelu(x), which is never written")
    if row_amax is not None:
        if row_amax.shape != (m,) or row_amax.dtype != torch.float32 or not row_amax.is_contiguous():
            raise ValueError(f"row_amax must be contiguous float32 [{m}], got {row_amax.dtype} {tuple(row_amax.shape)}")
        if r and bk1 != bk:
            row_amax = None
    dummy = out.row_scale
    _act_quant_kernel[grid](
        x, inv_smooth, l1s if r else dummy, out.q, out.row_scale,
        out.lowrank if r else dummy, out.exps if write_exps else dummy, dummy if row_amax is None else row_amax,
        m, m_pad, k, x.stride(0), float(clip_ratio), int(exp_offset), nblk,
        R=max(r, 16), NSPLIT_W=nsplit_w, NSPLIT=nsplit, HAS_LR=r > 0,
        SAFE_CEIL=scale_rule == "safe_ceil", WRITE_EXPS=write_exps, AMAX_IN=row_amax is not None,
        GELU=gelu_input, GRID_STRIDE=grid[0] < nblk,
        INTERPRET=interpreting(), BM=block_m, BK=bk, BK1=bk1, num_warps=num_warps, num_stages=num_stages,
    )
    return out


__all__ = [
    "ActQuantOut", "GROUP", "HEADROOM", "ROW_EXP_MIN", "act_quant", "act_quant_reference", "bf16_split",
    "fp8_rows_reference", "interpreting", "lowrank_weights", "lowrank_width", "pad_rows", "padded_rank",
    "row_absmax_reference", "row_exponents_from_group_exponents",
]
