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
  * the low-rank down projection ``(x / smooth) @ L1^T`` as bf16 ``[M_pad, NSPLIT * R]``:
    with ``NSPLIT = 2`` a hi/lo pair whose sum carries ~16 mantissa bits, so the
    low-rank branch is about fp32-accurate although its GEMMs run in bf16;
    optionally pre-multiplied by ``2^-s`` so a GEMM can put it into the accumulator
    before the row scale is applied (see :mod:`wanquant.kernels.gemm`).

It makes two passes over each row block: the row maximum must be known before any
value is written. The second pass re-reads the block, normally from L2.

Every kernel here has a PyTorch reference built from :mod:`wanquant.numerics.formats`.
Kernel code avoids the two things Triton's CPU interpreter does differently from the
GPU (fp32->bf16/fp8 conversions truncate there, bf16 dots are wrong there): values are
rounded explicitly with integer/float arithmetic before any narrowing conversion, so
the conversion itself is exact, and dots run in fp32 under the interpreter.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from wanquant.numerics.formats import (
    E2M1_EMAX,
    E8M0_MAX_EXP,
    E8M0_MIN_EXP,
    MXFP4,
    QuantFormat,
    ScaleRule,
    dequantize,
    floor_log2,
    mx_group_exponents,
    quantize,
)

try:  # triton is optional: the references below need only torch
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

GROUP = 32  # MX group size; the fast path supports MXFP4 with g32 only
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


class ActQuantOut(NamedTuple):
    """What the activation kernel writes (rows padded to ``M_pad``)."""

    q: torch.Tensor  # float8_e4m3fn [M_pad, K]
    row_scale: torch.Tensor  # fp32 [M_pad], 2^s
    lowrank: torch.Tensor | None  # bf16 [M_pad, NSPLIT * R_pad] (hi | lo), times 2^-s if scaled
    exps: torch.Tensor | None  # int8 [M_pad, K / 32] group exponents (debug output)


def _bf16_split(v: torch.Tensor, nsplit: int) -> list[torch.Tensor]:
    """``v`` (fp32) as ``nsplit`` bf16 terms whose sum approximates it (hi, then lo)."""
    hi = v.to(torch.bfloat16)
    if nsplit == 1:
        return [hi]
    return [hi, (v - hi.float()).to(torch.bfloat16)]


def act_quant_reference(
    x: torch.Tensor,
    inv_smooth: torch.Tensor,
    l1: torch.Tensor | None,
    clip_ratio: float,
    exp_offset: int,
    scale_rule: ScaleRule = "ocp_floor",
    nsplit: int = 2,
    scale_lowrank: bool = False,
    m_pad: int | None = None,
) -> ActQuantOut:
    """What :func:`act_quant` computes, from :mod:`wanquant.numerics.formats` (CPU, fp32).

    ``x [M, K]``; ``inv_smooth = 1 / smooth`` (fp32 [K]); ``l1 [r, K]`` (bf16) or None.
    The low-rank output is computed in fp64 from the same bf16 hi/lo split of ``x / s``
    that the kernel feeds its tensor cores, so it differs from the kernel's only by
    fp32 accumulation order.
    """
    m, k = x.shape
    m_pad = pad_rows(m) if m_pad is None else m_pad
    fmt = QuantFormat("mxfp4", GROUP, scale_rule)
    xs = x.float() * inv_smooth.float()
    qz = quantize(xs, fmt, clip_ratio, exp_offset)
    e = qz.scales.to(torch.int32) - 127
    s = row_exponents_from_group_exponents(e)
    q8 = fp8_rows_reference(dequantize(qz, fmt), s)

    out_q = torch.zeros(m_pad, k, dtype=torch.float8_e4m3fn)
    out_q[:m] = q8
    row_scale = torch.full((m_pad,), 2.0**ROW_EXP_MIN, dtype=torch.float32)
    row_scale[:m] = torch.exp2(s.double()).float()
    exps = torch.full((m_pad, k // GROUP), E8M0_MIN_EXP, dtype=torch.int8)
    exps[:m] = e.to(torch.int8)

    lowrank = None
    if l1 is not None and l1.shape[0] > 0:
        r_pad = padded_rank(l1.shape[0])
        l1p = torch.zeros(r_pad, k, dtype=torch.float64)
        l1p[: l1.shape[0]] = l1.double()
        parts = _bf16_split(xs, nsplit)
        lr = sum(p.double() for p in parts) @ l1p.T  # fp64 of the kernel's operands
        if scale_lowrank:
            lr = lr * torch.exp2(-s.double()).unsqueeze(-1)
        lowrank = torch.zeros(m_pad, nsplit * r_pad, dtype=torch.bfloat16)
        for i, part in enumerate(_bf16_split(lr.float(), nsplit)):
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
        """formats.mx_group_exponents on fp32 maxima (int32 result), read from the bits."""
        bits = (amax * clip_ratio).to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127 - 2  # floor(log2(a)) - E2M1_EMAX
        if SAFE_CEIL:
            # a > 6 * 2^e  <=>  a's significand > 1.5 (exact for normal a; subnormal a
            # ends at the -127 clamp either way for |exp_offset| <= 1)
            e += ((bits & 0x7FFFFF) > 0x400000).to(tl.int32)
        e = e + exp_offset
        return tl.minimum(tl.maximum(e, -127), 127)

    @triton.jit
    def _e2m1_magnitude(m):
        """Round magnitudes ``m >= 0`` to E2M1 values: nearest, ties to even, saturate at 6."""
        r = tl.where(m > 0.25, 0.5, 0.0)
        r = tl.where(m >= 0.75, 1.0, r)
        r = tl.where(m > 1.25, 1.5, r)
        r = tl.where(m >= 1.75, 2.0, r)
        r = tl.where(m > 2.5, 3.0, r)
        r = tl.where(m >= 3.5, 4.0, r)
        r = tl.where(m > 5.0, 6.0, r)
        return r

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
    def _act_quant_kernel(
        x_ptr, inv_s_ptr, l1t_ptr, q_ptr, sa_ptr, lr_ptr, exps_ptr,
        M, M_pad, K, stride_xm, clip_ratio, exp_offset,
        R: tl.constexpr, NSPLIT: tl.constexpr, HAS_LR: tl.constexpr, SCALE_LR: tl.constexpr,
        SAFE_CEIL: tl.constexpr, WRITE_EXPS: tl.constexpr, REVERSE: tl.constexpr,
        INTERPRET: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        row_ok = rows < M
        row_in = rows < M_pad
        rows64 = rows.to(tl.int64)
        cols0 = tl.arange(0, BK)
        nk = K // BK

        # ---- pass 1: row absmax (-> row exponent) and the low-rank down projection ----
        amax = tl.zeros((BM,), dtype=tl.float32)
        if HAS_LR:
            lr = tl.zeros((BM, R), dtype=tl.float32)
            rr = tl.arange(0, R)
        for kb in range(nk):
            cols = kb * BK + cols0
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None], other=0.0)
            xs = x.to(tl.float32) * tl.load(inv_s_ptr + cols)[None, :]
            amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=1))
            if HAS_LR:
                w = tl.load(l1t_ptr + cols[:, None] * R + rr[None, :])  # [BK, R] bf16
                hi = _round_bf16(xs)
                if INTERPRET:
                    lr = tl.dot(hi, w.to(tl.float32), lr, input_precision="ieee")
                else:
                    lr = tl.dot(hi.to(tl.bfloat16), w, lr)
                if NSPLIT == 2:
                    lo = _round_bf16(xs - hi)
                    if INTERPRET:
                        lr = tl.dot(lo, w.to(tl.float32), lr, input_precision="ieee")
                    else:
                        lr = tl.dot(lo.to(tl.bfloat16), w, lr)

        e_row = _mx_exponent(amax, clip_ratio, exp_offset, SAFE_CEIL)
        s = tl.maximum(e_row - 6, -100)  # HEADROOM, ROW_EXP_MIN
        tl.store(sa_ptr + rows, _exp2i(s), mask=row_in)
        if HAS_LR:
            if SCALE_LR:
                lr = lr * _exp2i(-s)[:, None]
            lr_hi = _round_bf16(lr)
            lr_base = lr_ptr + rows64[:, None] * (NSPLIT * R) + rr[None, :]
            tl.store(lr_base, lr_hi.to(tl.bfloat16), mask=row_in[:, None])
            if NSPLIT == 2:
                tl.store(lr_base + R, _round_bf16(lr - lr_hi).to(tl.bfloat16), mask=row_in[:, None])

        # ---- pass 2: group exponents, E2M1 rounding, e4m3 values relative to 2^s ----
        G: tl.constexpr = BK // 32
        for kb0 in range(nk):
            if REVERSE:  # most recently read columns first: better L2 reuse for long rows
                kb = nk - 1 - kb0
            else:
                kb = kb0
            cols = kb * BK + cols0
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None], other=0.0)
            xs = x.to(tl.float32) * tl.load(inv_s_ptr + cols)[None, :]
            xs3 = tl.reshape(xs, (BM, G, 32))
            ax3 = tl.abs(xs3)
            e = _mx_exponent(tl.max(ax3, axis=2), clip_ratio, exp_offset, SAFE_CEIL)  # [BM, G]
            mag = _e2m1_magnitude(ax3 * _exp2i(-e)[:, :, None])
            val = _to_e4m3_grid(mag, (e - s[:, None])[:, :, None])
            val = tl.where((xs3 < 0) & (val > 0), -val, val)  # -0 stays +0, as in formats
            out = tl.reshape(val, (BM, BK)).to(tl.float8e4nv)
            tl.store(q_ptr + rows64[:, None] * K + cols[None, :], out, mask=row_in[:, None])
            if WRITE_EXPS:
                gcols = kb * G + tl.arange(0, G)
                tl.store(exps_ptr + rows64[:, None] * (K // 32) + gcols[None, :], e.to(tl.int8), mask=row_in[:, None])


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
    l1t: torch.Tensor | None,
    clip_ratio: float,
    exp_offset: int,
    scale_rule: ScaleRule = "ocp_floor",
    nsplit: int = 2,
    scale_lowrank: bool = False,
    m_pad: int | None = None,
    write_exps: bool = False,
    block_m: int = 16,
    block_k: int = 512,
    num_warps: int = 8,
    reverse: bool = False,
    out: ActQuantOut | None = None,
) -> ActQuantOut:
    """Quantize ``x [M, K]`` (bf16 or fp32) to e4m3 rows; see the module docstring.

    ``l1t``: the low-rank down projection transposed and zero-padded, bf16 ``[K, R_pad]``
    (``R_pad = padded_rank(r)``), or None. ``out`` lets a caller reuse buffers.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if x.ndim != 2 or x.stride(1) != 1:
        raise ValueError("x must be a 2-D tensor with contiguous rows")
    m, k = x.shape
    if k % GROUP:
        raise ValueError(f"K={k} must be a multiple of {GROUP}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    m_pad = pad_rows(m) if m_pad is None else m_pad
    r = 0 if l1t is None else l1t.shape[1]
    dev = x.device
    if out is None:
        out = ActQuantOut(
            torch.empty(m_pad, k, dtype=torch.float8_e4m3fn, device=dev),
            torch.empty(m_pad, dtype=torch.float32, device=dev),
            torch.empty(m_pad, nsplit * r, dtype=torch.bfloat16, device=dev) if r else None,
            torch.empty(m_pad, k // GROUP, dtype=torch.int8, device=dev) if write_exps else None,
        )
    bk = _pick_bk(k, block_k)
    grid = (triton.cdiv(m_pad, block_m),)
    dummy = out.row_scale
    _act_quant_kernel[grid](
        x, inv_smooth, l1t if r else dummy, out.q, out.row_scale,
        out.lowrank if r else dummy, out.exps if write_exps else dummy,
        m, m_pad, k, x.stride(0), float(clip_ratio), int(exp_offset),
        R=max(r, 16), NSPLIT=nsplit, HAS_LR=r > 0, SCALE_LR=scale_lowrank,
        SAFE_CEIL=scale_rule == "safe_ceil", WRITE_EXPS=write_exps, REVERSE=reverse,
        INTERPRET=interpreting(), BM=block_m, BK=bk, num_warps=num_warps,
    )
    return out


__all__ = [
    "ActQuantOut", "GROUP", "HEADROOM", "ROW_EXP_MIN", "act_quant", "act_quant_reference",
    "fp8_rows_reference", "interpreting", "pad_rows", "padded_rank", "row_exponents_from_group_exponents",
    "E2M1_EMAX", "E8M0_MAX_EXP", "MXFP4", "floor_log2", "mx_group_exponents",
]
