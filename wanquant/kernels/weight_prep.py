"""Weight side of the Hopper W4A4 path: packed MXFP4 rows -> e4m3 rows + fp32 row scales.

Weights stay packed (4.25 bits per element) in GPU memory. Before each GEMM they are
expanded into a scratch buffer that all layers share: byte ``j`` of a row holds codes
``2j`` (low nibble) and ``2j+1`` (high nibble), group ``g`` covers codes ``32g..32g+31``
and has the E8M0 exponent ``wscales[n, g] - 127``. As for activations
(:mod:`wanquant.kernels.act_quant`), element ``q * 2^e_g`` is written as
``q * 2^(e_g - s_n)`` in e4m3 with ``s_n = max(max_g e_g - HEADROOM, ROW_EXP_MIN)``, and
the row scale ``2^s_n`` goes to the GEMM epilogue. This is one streaming pass (read
N*K*0.53 bytes, write N*K bytes), about 1 % of the GEMM at M >= 8k.
"""

from __future__ import annotations

import torch

from wanquant.formats import MXFP4, Quantized, unpack_nibbles
from wanquant.formats.mxfp4 import E8M0_BIAS
from wanquant.kernels.act_quant import (
    GROUP,
    HAS_TRITON,
    _pick_bk,
    interpreting,
    fp8_rows_reference,
    row_exponents_from_group_exponents,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from wanquant.kernels.act_quant import _exp2i, _to_e4m3_grid


def weight_row_exponents(wscales: torch.Tensor) -> torch.Tensor:
    """Row exponents ``s_n`` (int32 [N]) from E8M0 scale codes ``wscales`` (uint8 [N, K/32])."""
    if wscales.dtype != torch.uint8:
        raise TypeError(f"MX weight scales must be uint8 E8M0 codes, got {wscales.dtype}")
    return row_exponents_from_group_exponents(wscales.to(torch.int32) - E8M0_BIAS)


def expand_weight_reference(qweight: torch.Tensor, wscales: torch.Tensor, s_w: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`expand_weight`: e4m3 ``[N, K]`` from packed codes and scales."""
    s_w = weight_row_exponents(wscales) if s_w is None else s_w
    values = MXFP4.dequantize(Quantized(unpack_nibbles(qweight), wscales))
    return fp8_rows_reference(values, s_w)


if HAS_TRITON:

    @triton.jit
    def _e2m1_code_value(c, d, INTERPRET: tl.constexpr):
        """E2M1 code ``c`` (int32, 0..15) times ``2^d`` as fp32, built from bits (d in [-30, 6]).

        ``q * 2^d`` for ``q = (1 + f/2) 2^E`` has fp32 exponent field ``E + d + 127``
        and mantissa ``f << 22``; code 1 (0.5) has E = -1, f = 0. The value is exact in
        fp32; the narrowing cast to e4m3 rounds to nearest even on the GPU, which is the
        reference's rounding for the (rare) groups more than 8 binades below the row
        maximum. The interpreter's cast truncates, so there the value is first put on
        e4m3's grid explicitly.
        """
        m = c & 7
        frac = tl.where(m > 1, (m & 1) << 22, 0)
        bits = (((m >> 1) + d + 126) << 23) | frac | ((c & 8) << 28)
        val = tl.where(m == 0, 0.0, bits.to(tl.float32, bitcast=True))
        if INTERPRET:
            mag = _to_e4m3_grid(tl.abs(val) * _exp2i(-d), d)
            val = tl.where((c >= 8) & (mag > 0), -mag, mag)
        return val

    @triton.jit
    def _expand_kernel(qw_ptr, ws_ptr, sw_ptr, out_ptr, N, K, BN: tl.constexpr, BKH: tl.constexpr,
                       INTERPRET: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        jb = pid_k * BKH + tl.arange(0, BKH)  # byte index inside the packed row
        b = tl.load(qw_ptr + rows64[:, None] * (K // 2) + jb[None, :], mask=rmask[:, None], other=0).to(tl.int32)
        e = tl.load(ws_ptr + rows64[:, None] * (K // 32) + (jb // 16)[None, :], mask=rmask[:, None], other=127)
        s = tl.load(sw_ptr + rows, mask=rmask, other=0)
        d = tl.maximum(e.to(tl.int32) - 127 - s[:, None], -30)  # below -13 everything rounds to 0
        lo = _e2m1_code_value(b & 15, d, INTERPRET)
        hi = _e2m1_code_value(b >> 4, d, INTERPRET)
        vals = tl.reshape(tl.join(lo, hi), (BN, 2 * BKH))  # element 2j = low nibble of byte j
        cols = pid_k * (2 * BKH) + tl.arange(0, 2 * BKH)
        tl.store(out_ptr + rows64[:, None] * K + cols[None, :], vals.to(tl.float8e4nv), mask=rmask[:, None])


def expand_weight(
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    s_w: torch.Tensor,
    out: torch.Tensor | None = None,
    block_n: int = 32,
    block_kh: int = 256,
    num_warps: int = 4,
) -> torch.Tensor:
    """Expand packed MXFP4 ``qweight [N, K/2]`` with scales ``wscales [N, K/32]`` to e4m3 ``[N, K]``.

    ``s_w`` are the row exponents from :func:`weight_row_exponents` (int32 [N]). ``out``
    may be a view into a shared scratch buffer (contiguous, float8_e4m3fn).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    n, kh = qweight.shape
    k = 2 * kh
    if wscales.shape != (n, k // GROUP):
        raise ValueError(f"wscales has shape {tuple(wscales.shape)}, expected {(n, k // GROUP)}")
    if out is None:
        out = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=qweight.device)
    if out.shape != (n, k) or not out.is_contiguous():
        raise ValueError("out must be a contiguous [N, K] tensor")
    bkh = _pick_bk(kh, block_kh, minimum=GROUP // 2)
    grid = (triton.cdiv(n, block_n), kh // bkh)
    _expand_kernel[grid](qweight, wscales, s_w, out, n, k, BN=block_n, BKH=bkh, INTERPRET=interpreting(),
                         num_warps=num_warps)
    return out
