"""A Wan block's residual + LayerNorm + AdaLN modulation steps in one pass per row.

Around its three sub-layers a Wan block (diffusers 0.42.1 ``WanTransformerBlock``) runs,
per token row of ``C`` channels (fp32 math, bf16 in and out):

1. ``n = LN(x) * (1 + scale) + shift``                      (norm1, before self-attention)
2. ``x = x + y * gate``;  ``n = LN(x) * w + b``              (norm2, before cross-attention)
3. ``x = x + y``;         ``n = LN(x) * (1 + scale) + shift``  (norm3, before the FFN)

where ``LN`` has no affine part unless ``w``/``b`` are given, ``gate``/``scale``/``shift``
are ``[B, 1, C]`` (one per video), and the updated ``x`` is rounded to bf16 before it is
normalised. Compiled, Inductor's kernels for 1 and 3 ran at 1.6-1.7x their read/write
floors on an H100 (``benchmarks/KERNEL_NOTES.md``). :func:`residual_norm` does any of the
three with each row read once (contiguous 16-byte accesses) and both outputs written once;
:func:`residual_norm_reference` is the PyTorch definition, written as diffusers writes it.

Roundings to the output dtype are done on the bit pattern before the cast (exact then), so
the CPU interpreter, which truncates on narrowing casts, gives the GPU's bits.

:mod:`wanquant.model.fused_block` calls it (as custom ops) when blocks are compiled with
``fused_norms=True``, off by default until measured: ``benchmarks/prepass_speed.py`` times
it against the same expressions eager and ``torch.compile``-d, and ``e2e_speed``'s
``w4a4_int8attn_fusednorms_compile`` mode times the step with it.
"""

from __future__ import annotations

import torch

from wanquant.kernels.act_quant import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from wanquant.kernels.rope import round_f32_to_16bit


def _check(x: torch.Tensor, y, gate, weight, bias, scale, shift) -> tuple[int, int, int]:
    """``(B, T, C)`` of a valid call; raises ValueError naming the problem otherwise."""
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, C], got {tuple(x.shape)}")
    b, t, c = x.shape
    if y is not None and y.shape != x.shape:
        raise ValueError(f"the residual addend must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if gate is not None and y is None:
        raise ValueError("a gate needs a residual addend y")
    if (weight is None) != (bias is None) or (scale is None) != (shift is None):
        raise ValueError("give the norm's weight and bias together, and the modulation's scale and shift together")
    for name, v in (("weight", weight), ("bias", bias)):
        if v is not None and v.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(v.shape)}")
    for name, v in (("gate", gate), ("scale", scale), ("shift", shift)):
        if v is not None and (v.ndim != 3 or v.shape[1:] != (1, c) or v.shape[0] not in (1, b)):
            raise ValueError(f"{name} must be [1 or B, 1, {c}] (one row per video), got {tuple(v.shape)}")
    return b, t, c


def residual_norm_reference(x: torch.Tensor, y: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                            weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                            scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                            eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_new, n)`` as the module docstring's steps (``x_new`` is ``x`` without ``y``)."""
    _check(x, y, gate, weight, bias, scale, shift)
    if y is not None:
        x = (x.float() + y * gate).type_as(x) if gate is not None else x + y
    n = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)
    if scale is not None:
        n = n * (1 + scale) + shift
    return x, n.type_as(x)


if HAS_TRITON:

    @triton.jit
    def _residual_norm_kernel(x_ptr, y_ptr, gate_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, xo_ptr, n_ptr,
                              n_rows, T, C, eps, stride_gate, stride_mod,
                              BLOCK_C: tl.constexpr, ROWS: tl.constexpr, MANT: tl.constexpr,
                              HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, AFFINE: tl.constexpr,
                              MODULATE: tl.constexpr):
        col = tl.arange(0, BLOCK_C)
        mask = col < C
        if AFFINE:
            w = tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
            bb = tl.load(b_ptr + col, mask=mask, other=0.0).to(tl.float32)
        for i in range(ROWS):
            row = tl.program_id(0) * ROWS + i
            if row < n_rows:
                video = row // T
                off = row.to(tl.int64) * C + col
                h = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
                if HAS_Y:
                    y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
                    if HAS_GATE:
                        y = y * tl.load(gate_ptr + video * stride_gate + col, mask=mask, other=0.0)
                    h = round_f32_to_16bit(h + y, MANT)
                    tl.store(xo_ptr + off, h.to(xo_ptr.dtype.element_ty), mask=mask)
                mean = tl.sum(h) / C
                d = tl.where(mask, h - mean, 0.0)
                n = d * (1.0 / tl.sqrt_rn(tl.sum(d * d) / C + eps))
                if AFFINE:
                    n = n * w + bb
                if MODULATE:
                    sc = tl.load(scale_ptr + video * stride_mod + col, mask=mask, other=0.0)
                    sh = tl.load(shift_ptr + video * stride_mod + col, mask=mask, other=0.0)
                    n = n * (1.0 + sc) + sh
                tl.store(n_ptr + off, round_f32_to_16bit(n, MANT).to(n_ptr.dtype.element_ty), mask=mask)


def residual_norm(x: torch.Tensor, y: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, eps: float = 1e-6,
                  num_warps: int = 8, rows_per_program: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`residual_norm_reference` (``x``, ``y`` bf16/fp16 and
    contiguous; ``gate``, ``scale``, ``shift``, ``weight``, ``bias`` float32)."""
    b, t, c = _check(x, y, gate, weight, bias, scale, shift)
    if x.dtype not in (torch.bfloat16, torch.float16) or (y is not None and y.dtype != x.dtype):
        raise ValueError(f"x and y must be bfloat16 or float16 of one dtype, got {x.dtype}"
                         f"{'' if y is None else f' and {y.dtype}'}")
    for name, v in (("gate", gate), ("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)):
        if v is not None and v.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 (diffusers keeps the modulation and norms in fp32), got {v.dtype}")
    if not x.is_contiguous() or (y is not None and not y.is_contiguous()):
        raise ValueError("x and y must be contiguous")
    if scale is not None and shift.shape != scale.shape:
        raise ValueError(f"scale and shift must have one shape, got {tuple(scale.shape)} and {tuple(shift.shape)}")
    x_new = torch.empty_like(x) if y is not None else x
    n = torch.empty_like(x)

    def ptr(v):  # an unused operand (its flag off) passes x, which the kernel does not read
        return x if v is None else v.contiguous()

    def row_stride(v):  # [B, 1, C] modulation rows: one per video, or one shared
        return c if v is not None and v.shape[0] > 1 else 0

    grid = (triton.cdiv(b * t, rows_per_program),)
    _residual_norm_kernel[grid](
        x, ptr(y), ptr(gate), ptr(weight), ptr(bias), ptr(scale), ptr(shift), x_new, n,
        b * t, t, c, float(eps), row_stride(gate), row_stride(scale),
        BLOCK_C=triton.next_power_of_2(c), ROWS=rows_per_program, MANT=7 if x.dtype == torch.bfloat16 else 10,
        HAS_Y=y is not None, HAS_GATE=gate is not None, AFFINE=weight is not None, MODULATE=scale is not None,
        num_warps=num_warps)
    return x_new, n
