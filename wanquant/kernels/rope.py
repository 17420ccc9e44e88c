"""Wan's q/k pre-attention step in one pass: RMS-norm over all heads, then rotary.

Wan's self-attention normalises the projected queries and keys over the whole inner
dimension (``torch.nn.RMSNorm(heads * head_dim)``, affine) and then rotates each head's
channel pairs ``(2i, 2i+1)`` with diffusers' rotary tables: ``cos``/``sin`` of shape
``[1, T, 1, D]`` (float32: computed in float64, stored as float32) whose even (cos) and odd
(sin) entries are used. Compiled, this is one Inductor reduction kernel per block that
reads the de-interleaved pairs with strided scalar loads and took 3.2 ms at 75,600 tokens
on an H200, where moving its bytes takes about 0.8 ms. :func:`qk_norm_rope` does the same
arithmetic with contiguous loads:

* each program takes a few token rows (of ``q`` or of ``k``) one after the other, loading
  each row as a ``[heads, head_dim]`` tile (16-byte accesses) and splitting the pairs in
  registers (``reshape`` to ``[heads, head_dim / 2, 2]``, ``split``; ``join`` back for the
  store); a token's table row is loaded once for all heads, the norm weight once per
  program;
* the norm as ``torch``'s decomposition of ``_fused_rms_norm`` defines it (what Inductor
  compiles): fp32 ``x * rsqrt(mean(x^2) + eps) * w``, rounded once to the input dtype; the rotary as diffusers computes it: the rounded
  values times the tables in the tables' dtype, rounded once more.

Both roundings are done explicitly (round to nearest even on the bit pattern) before the
narrowing cast, which then is exact: Triton's CPU interpreter truncates on narrowing
casts, and with the explicit rounding the interpreter and the GPU give the same bits.
:func:`qk_norm_rope_reference` is the PyTorch definition (``F.rms_norm`` and diffusers'
rotary written out). :func:`qk_norm_rope_int8_q` is the same kernel writing the queries as
the 8-bit attention's INT8 Q (the attention's Q pre-pass done on the values in registers).
"""

from __future__ import annotations

import torch

from wanquant.kernels.act_quant import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from wanquant.kernels.attention_triton import _inv_scale, _rne

_DTYPES = (torch.bfloat16, torch.float16)
TABLE_DTYPES = (torch.float32, torch.float64)  # the rotary's arithmetic is done in this dtype, as in diffusers


def _check(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
           cos: torch.Tensor, sin: torch.Tensor, heads: int) -> tuple[int, int, int, int]:
    """``(B, T, H, D)`` of a valid call; raises ValueError naming the problem otherwise."""
    if q.ndim != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must be [B, T, heads * head_dim] of one shape, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    b, t, c = q.shape
    if heads <= 0 or c % heads or (c // heads) % 2:
        raise ValueError(f"inner dim {c} is not heads ({heads}) x an even head_dim")
    d = c // heads
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(w.shape)}")
    for name, tab in (("cos", cos), ("sin", sin)):
        if tab.ndim != 4 or tab.shape[1] != t or tab.shape[2] != 1 or tab.shape[3] != d or tab.shape[0] not in (1, b):
            raise ValueError(f"{name} must be [1 or B, T={t}, 1, head_dim={d}], got {tuple(tab.shape)}")
    return b, t, heads, d


def qk_norm_rope_reference(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``q, k [B, T, heads * D]`` -> normalised and rotated ``[B, T, heads, D]`` (input dtype)."""
    _check(q, k, q_weight, k_weight, cos, sin, heads)

    def one(x, w):
        # Written out rather than F.rms_norm: CUDA's eager kernel may round x * rstd before
        # the weight; torch's decomposition (what Inductor compiles, and the CPU) rounds once.
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = (xf * rstd * w.float()).to(x.dtype).unflatten(2, (heads, -1))
        y1, y2 = y.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[..., 0::2], sin[..., 1::2]
        out = torch.empty_like(y)
        out[..., 0::2] = y1 * c - y2 * s
        out[..., 1::2] = y1 * s + y2 * c
        return out

    return one(q, q_weight), one(k, k_weight)


def rounding_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b|`` of two 16-bit outputs in units of their dtype's spacing at ``max(|a|, |b|,
    2^-6)``: how far apart in rounding steps. The outputs are O(1) (normed values times
    weights near 1); the floor keeps a rotary sum that cancels to near zero, where fp32
    rounding alone may flip its sign, from counting as far."""
    mant = 7 if a.dtype == torch.bfloat16 else 10
    big = torch.maximum(a.float().abs(), b.float().abs()).clamp_min(2.0 ** -6)
    spacing = torch.ldexp(torch.ones_like(big), torch.frexp(big).exponent - 1 - mant)
    return ((a.float() - b.float()).abs() / spacing).ceil()


def pair_rounding_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of two rotated outputs ``[..., D]`` per channel pair ``(2i, 2i+1)``, in units
    of their dtype's spacing at the pair's length (at least 2^-6).

    The rotary turns each normalised pair by an angle, which keeps its length: a rounding
    step of the normalised values (the GPU's approximate rsqrt and contracted multiply-adds
    flip a few of them) stays one step at the pair's length, however much one coordinate
    cancels. Within one such step plus the output's own rounding: <= 2."""
    mant = 7 if a.dtype == torch.bfloat16 else 10
    pa, pb = (t.float().unflatten(-1, (-1, 2)) for t in (a, b))
    length = torch.maximum(pa.norm(dim=-1), pb.norm(dim=-1)).clamp_min(2.0 ** -6)
    spacing = torch.ldexp(torch.ones_like(length), torch.frexp(length).exponent - 1 - mant)
    return ((pa - pb).norm(dim=-1) / spacing).ceil()


if HAS_TRITON:

    @triton.jit
    def round_f32_to_16bit(v, MANT: tl.constexpr):
        """fp32 ``v`` rounded to nearest even at ``MANT`` stored mantissa bits (exact in the
        16-bit type afterwards)."""
        drop: tl.constexpr = 23 - MANT
        bits = v.to(tl.int32, bitcast=True)
        bits = bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)
        return (bits & ~((1 << drop) - 1)).to(tl.float32, bitcast=True)

    @triton.jit
    def round_f64_to_16bit(v, MANT: tl.constexpr):
        """fp64 ``v`` rounded to nearest even at ``MANT`` stored mantissa bits, as fp32
        (exact there: the 16-bit types' exponent ranges fit fp32's)."""
        drop: tl.constexpr = 52 - MANT
        bits = v.to(tl.int64, bitcast=True)
        bits = bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)
        return (bits & ~((1 << drop) - 1)).to(tl.float64, bitcast=True).to(tl.float32)

    @triton.jit
    def _qk_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, qs_ptr, n_rows, T, H, eps, S_pad, qk_c,
                             stride_xb, stride_xt, stride_cb, stride_ct, stride_sb, stride_st,
                             D2: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr, MANT: tl.constexpr,
                             F64: tl.constexpr, INT8: tl.constexpr):
        h = tl.arange(0, BLOCK_H)[:, None]
        col = h * (2 * D2) + tl.arange(0, 2 * D2)[None, :]  # [BLOCK_H, D]: row-contiguous loads
        mask = h < H
        tab = tl.arange(0, 2 * D2)
        w = tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)  # once for ROWS rows
        for i in range(ROWS):
            row = tl.program_id(0) * ROWS + i
            if row < n_rows:
                b = (row // T).to(tl.int64)  # a [2, 75,600, 15,360] q/k/v buffer passes 2^31 elements
                t = (row % T).to(tl.int64)
                x = tl.load(x_ptr + b * stride_xb + t * stride_xt + col, mask=mask, other=0.0).to(tl.float32)
                ms = tl.sum(x * x) / (H * 2 * D2)
                y = round_f32_to_16bit((x * (1.0 / tl.sqrt_rn(ms + eps))) * w, MANT)
                y1, y2 = tl.split(tl.reshape(y, [BLOCK_H, D2, 2]))  # the pairs (2i, 2i+1), [BLOCK_H, D2] each
                c, _ = tl.split(tl.reshape(tl.load(cos_ptr + b * stride_cb + t * stride_ct + tab), [D2, 2]))
                _, s = tl.split(tl.reshape(tl.load(sin_ptr + b * stride_sb + t * stride_st + tab), [D2, 2]))
                c = c[None, :]
                s = s[None, :]
                if F64:
                    y1 = y1.to(tl.float64)
                    y2 = y2.to(tl.float64)
                    o1 = round_f64_to_16bit(y1 * c - y2 * s, MANT)
                    o2 = round_f64_to_16bit(y1 * s + y2 * c, MANT)
                else:
                    c = c.to(tl.float32)
                    s = s.to(tl.float32)
                    o1 = round_f32_to_16bit(y1 * c - y2 * s, MANT)
                    o2 = round_f32_to_16bit(y1 * s + y2 * c, MANT)
                o = tl.reshape(tl.join(o1, o2), [BLOCK_H, 2 * D2])
                if INT8:  # the attention's Q pre-pass on the rounded values: [B*H, S_pad, D] int8 + scales
                    o = o.to(tl.float32)
                    amax = tl.max(tl.abs(o), 1)  # per head
                    inv = _inv_scale(amax, 127.0)
                    q8 = tl.minimum(tl.maximum(_rne(o * inv[:, None]), -127.0), 127.0).to(tl.int8)
                    bh = b * H + h  # [BLOCK_H, 1]
                    tl.store(out_ptr + (bh * S_pad + t) * (2 * D2) + tl.arange(0, 2 * D2)[None, :], q8, mask=mask)
                    tl.store(qs_ptr + bh * S_pad + t, (amax * qk_c)[:, None], mask=mask)
                else:
                    tl.store(out_ptr + row.to(tl.int64) * (H * 2 * D2) + col, o.to(out_ptr.dtype.element_ty), mask=mask)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float, num_warps: int = 8,
                 rows_per_program: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`qk_norm_rope_reference`: ``q``, ``k`` may be strided views
    (a fused q/k/v projection's chunks) with a unit last stride; outputs are contiguous.
    Each program does ``rows_per_program`` tokens, loading the norm weight once for them."""
    return _launch(q, k, q_weight, k_weight, cos, sin, heads, eps, num_warps, rows_per_program, None)


def qk_norm_rope_int8_q(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float, qk_c: float, s_pad: int,
                        num_warps: int = 8, rows_per_program: int = 4
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`qk_norm_rope` whose query output is the 8-bit attention's INT8 Q:
    ``(q8 int8 [B*H, s_pad, D], qs fp32 [B*H, s_pad], k [B, T, H, D])``, the first two what
    :func:`~wanquant.kernels.attention_reference.quantize_q_reference` gives for the rotated
    queries (``qk_c``: the softmax scale times log2(e) / 127), with rows from ``T`` to
    ``s_pad`` zero. The rotated queries are never written in 16 bits, nor read back by a
    pre-pass of the attention."""
    b, t, h, d = _check(q, k, q_weight, k_weight, cos, sin, heads)
    if s_pad < t:
        raise ValueError(f"s_pad {s_pad} is shorter than the {t} tokens")
    q8 = torch.empty(b * h, s_pad, d, dtype=torch.int8, device=q.device)
    qs = torch.empty(b * h, s_pad, dtype=torch.float32, device=q.device)
    q8[:, t:].zero_()
    qs[:, t:].zero_()
    q8, k = _launch(q, k, q_weight, k_weight, cos, sin, heads, eps, num_warps, rows_per_program, (q8, qs, qk_c))
    return q8, qs, k


def _launch(q, k, q_weight, k_weight, cos, sin, heads, eps, num_warps, rows_per_program, int8_q):
    b, t, h, d = _check(q, k, q_weight, k_weight, cos, sin, heads)
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must be bfloat16 or float16 of one dtype, got {q.dtype} and {k.dtype}")
    if cos.dtype not in TABLE_DTYPES or sin.dtype != cos.dtype:
        raise ValueError(f"the rotary tables must be float32 (diffusers' Wan tables) or float64, of one dtype; "
                         f"got {cos.dtype} and {sin.dtype}")
    if d & (d - 1):
        raise ValueError(f"head_dim {d} is not a power of two")
    if cos.stride(3) != 1 or sin.stride(3) != 1:
        raise ValueError("the rotary tables need a unit last stride")
    mant = 7 if q.dtype == torch.bfloat16 else 10
    block_h = triton.next_power_of_2(h)
    cs = [(tab.stride(0) if tab.shape[0] > 1 else 0, tab.stride(1)) for tab in (cos, sin)]  # per-video or shared
    grid = (triton.cdiv(b * t, rows_per_program),)
    outs = []
    for i, (x, w) in enumerate(((q, q_weight), (k, k_weight))):
        if x.stride(2) != 1:
            x = x.contiguous()
        int8 = i == 0 and int8_q is not None
        if int8:
            out, qs, qk_c = int8_q
            s_pad = out.shape[1]
        else:
            out, qs, qk_c, s_pad = torch.empty(b, t, h, d, dtype=x.dtype, device=x.device), x, 0.0, t
        _qk_norm_rope_kernel[grid](x, w, cos, sin, out, qs, b * t, t, h, float(eps), s_pad, float(qk_c),
                                   x.stride(0), x.stride(1), *cs[0], *cs[1], D2=d // 2, BLOCK_H=block_h,
                                   ROWS=rows_per_program, MANT=mant, F64=cos.dtype == torch.float64, INT8=int8,
                                   num_warps=num_warps)
        outs.append(out)
    return outs[0], outs[1]
