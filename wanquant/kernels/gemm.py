"""FP8 GEMM with per-token x per-channel scales, the low-rank branch and the bias.

    y[m, n] = 2^(s_a[m] + s_w[n]) * sum_k a8[m, k] w8[n, k] + (lr[m, :] @ l2cat[n, :]) + bias[n]

``a8``/``w8`` are the e4m3 rows from :mod:`wanquant.kernels.act_quant` and
:mod:`wanquant.kernels.weight_prep`; ``lr`` is the activation kernel's low-rank output
(hi | lo bf16 pair) and ``l2cat = [L2 | L2]`` so that one bf16 GEMM of width
``NSPLIT * R`` applies both halves.

Two implementations:

* :func:`gemm_triton`: one Triton kernel. The low-rank term goes into the accumulator
  *before* the FP8 main loop, divided by the two row scales (``l2cat`` is stored times
  ``2^-s_w``, the kernel multiplies by ``2^-s_a``; powers of two, so exact), and the
  epilogue multiplies everything by ``2^(s_a + s_w)`` and adds the bias. No second pass
  over the output. (A persistent TMA-descriptor variant was measured and dropped: within
  1 % of this one, and slower when flattened; see benchmarks/KERNEL_NOTES.md.)
  Widths above :data:`LR_SINGLE_MAX` (LoRAs appended to the branch, DESIGN.md section 9)
  run the low-rank term as a loop over :data:`LR_CHUNK`-column chunks, visiting per
  output tile only the chunks whose ``l2cat`` block is not all zero
  (:func:`lowrank_chunk_table`): a LoRA on one member of a fused q|k|v layer has a
  block-diagonal up projection, so each tile skips the other members' rank, and the
  power-of-two padding is skipped too. Chunking also bounds the shared memory the
  low-rank operands take at any rank.
* :func:`gemm_cublas`: ``torch._scaled_mm`` with rowwise scales (+ bias), then the
  low-rank term as an in-place bf16 ``addmm_`` (a second pass over the output).

:func:`gemm_reference` is the fp64 ground truth on the same operands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from wanquant.kernels.act_quant import HAS_TRITON, interpreting, row_absmax_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

    from wanquant.kernels.act_quant import _round_bf16


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of the Triton FP8 GEMM."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    # None: Hopper's fast FP8 accumulation (rel. error 1.5e-4..6e-4 before bf16 rounding);
    # an int: promote to fp32 every that many K (measured 6x slower in Triton 3.6).
    imprecise_acc: int | None = None
    split_epilogue: bool = True  # store the tile as two column halves (fewer live registers)

    def describe(self) -> str:
        acc = "fast" if self.imprecise_acc is None else f"promote{self.imprecise_acc}"
        split = "-split" if self.split_epilogue else ""
        return (f"{self.block_m}x{self.block_n}x{self.block_k}-w{self.num_warps}-s{self.num_stages}"
                f"-g{self.group_m}{split}-{acc}")


DEFAULT_CONFIG = GemmConfig()
# Low-rank widths (NSPLIT * R_pad) up to this run as one dot before the main loop (the base
# branch, rank <= 32: unchanged since it was measured); wider ones run chunk by chunk.
LR_SINGLE_MAX = 64
LR_CHUNK = 32  # columns per chunk: aligns with LoRA ranks that are multiples of 32 (and 16-rank bases pad to it)


def lowrank_chunk_table(l2cat: torch.Tensor, block_n: int, chunk: int = LR_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx [tiles, RC/chunk], count [tiles])`` int32: per ``block_n``-row tile of ``l2cat``
    the chunks of ``chunk`` columns holding a non-zero, in ascending order (then padding).

    Skipping an all-zero chunk leaves the result unchanged: it would add exact zeros.
    """
    n, rc = l2cat.shape
    if rc % chunk:
        raise ValueError(f"low-rank width {rc} is not a multiple of the chunk {chunk}")
    tiles = -(-n // block_n)
    live = torch.zeros(tiles * block_n, rc // chunk, dtype=torch.bool, device=l2cat.device)
    live[:n] = (l2cat != 0).view(n, rc // chunk, chunk).any(-1)
    live = live.view(tiles, block_n, rc // chunk).any(1)
    # A stable sort on "dead" puts the live chunk indices first, in ascending order.
    idx = torch.sort((~live).to(torch.int32), dim=1, stable=True).indices.to(torch.int32).contiguous()
    return idx, live.sum(1).to(torch.int32).contiguous()


class GeluRowMax(NamedTuple):
    """The epilogue of a layer that feeds a tanh GELU and then the next W4A4 layer (a
    feed-forward's up projection): the GEMM stores ``gelu(y)`` and fills ``amax`` with its
    row maxima against that layer's ``1/smooth`` (:func:`gelu_rowmax_reference`), so the
    GELU's own kernel (and its pass over the hidden layer) goes away."""

    inv_smooth: torch.Tensor  # fp32 [N]: the next layer's 1/smooth
    amax: torch.Tensor  # fp32 [M], zeros on entry (atomic maxima): the next layer's row maxima


def gelu_rowmax_reference(y: torch.Tensor, inv_smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, amax)``: torch's tanh GELU of ``y`` rounded to bf16, and
    :func:`~wanquant.kernels.act_quant.row_absmax_reference` of ``g`` (the definition the
    :class:`GeluRowMax` epilogue computes; its GELU is a bf16 step apart on a few values)."""
    g = torch.nn.functional.gelu(y.to(torch.bfloat16).float(), approximate="tanh").to(torch.bfloat16)
    return g, row_absmax_reference(g.reshape(-1, g.shape[-1]), inv_smooth)


def gemm_reference(
    a8: torch.Tensor,
    sa: torch.Tensor,
    w8: torch.Tensor,
    sw: torch.Tensor,
    lowrank: torch.Tensor | None = None,
    l2cat: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    l2_scaled: bool = False,
) -> torch.Tensor:
    """fp64 result of the GEMM on exactly the operands the kernels receive.

    ``l2_scaled``: ``l2cat`` holds ``[L2|L2] * 2^-s_w`` (the Triton layout); scaled back here.
    """
    y = (a8.double() * sa.double()[:, None]) @ (w8.double() * sw.double()[:, None]).T
    if lowrank is not None:
        l2 = l2cat.double()
        if l2_scaled:
            l2 = l2 * sw.double()[:, None]
        y = y + lowrank.double() @ l2.T
    if bias is not None:
        y = y + bias.double()
    return y


if HAS_TRITON:

    @triton.jit
    def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """Grouped ordering: GROUP_M row tiles share each weight tile while it is in L2."""
        in_group = GROUP_M * num_pid_n
        first_m = (tile_id // in_group) * GROUP_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile_id % in_group) % size_m
        pid_n = (tile_id % in_group) // size_m
        return pid_m, pid_n

    @triton.jit
    def _inv_pow2(v):
        """1 / v for a normal power of two v, exactly (negate the exponent bits)."""
        return ((254 << 23) - v.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)

    @triton.jit
    def _lowrank_init(lr_ptr, l2_ptr, sa_ptr, rm, rn, RC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      INTERPRET: tl.constexpr):
        """The low-rank term divided by both row scales: the starting accumulator.

        ``l2cat`` already holds ``L2 * 2^-s_w``; the ``2^-s_a`` factor is applied here
        (exact), so the epilogue's ``* 2^(s_a + s_w)`` restores it.
        """
        rk = tl.arange(0, RC)
        lr = tl.load(lr_ptr + rm.to(tl.int64)[:, None] * RC + rk[None, :])  # [BM, RC] bf16
        l2t = tl.load(l2_ptr + rn.to(tl.int64)[None, :] * RC + rk[:, None])  # [RC, BN] bf16
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if INTERPRET:  # the CPU interpreter's bf16 dot is wrong; bf16 products are exact in fp32
            acc = tl.dot(lr.to(tl.float32), l2t.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(lr, l2t, acc)
        return acc * _inv_pow2(tl.load(sa_ptr + rm))[:, None]

    @triton.jit
    def _lowrank_chunks(lr_ptr, l2_ptr, sa_ptr, idx_ptr, cnt_ptr, pid_n, rm, rn, rc, nch,
                        RCB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, INTERPRET: tl.constexpr):
        """:func:`_lowrank_init` over this tile's live ``RCB``-column chunks only (a runtime loop).

        The width ``rc`` and chunk count ``nch`` are runtime values: one compiled kernel
        serves every LoRA rank (loading a LoRA compiles nothing new here).
        """
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        rk0 = tl.arange(0, RCB)
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        count = tl.load(cnt_ptr + pid_n)
        for j in range(0, count):
            rk = tl.load(idx_ptr + pid_n * nch + j) * RCB + rk0
            lr = tl.load(lr_ptr + rm64[:, None] * rc + rk[None, :])  # [BM, RCB] bf16
            l2t = tl.load(l2_ptr + rn64[None, :] * rc + rk[:, None])  # [RCB, BN] bf16
            if INTERPRET:
                acc = tl.dot(lr.to(tl.float32), l2t.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(lr, l2t, acc)
        return acc * _inv_pow2(tl.load(sa_ptr + rm))[:, None]

    @triton.jit
    def _gelu_tanh(h, INTERPRET: tl.constexpr):
        """torch's tanh GELU ``0.5 h (1 + tanh(u))``, ``u = sqrt(2/pi) (h + 0.044715 h^3)``, of
        fp32 ``h`` as ``h / (1 + 2^(-2 u log2 e))``: the same function without the cancellation
        of ``1 + tanh(u)`` for negative ``h``. On the GPU with the approximate ``ex2`` and
        division (two MUFU operations and four FMA-pipe ones an element): a GEMM epilogue is not
        overlapped with the MMAs, so its length is the cost. Where ``2^t`` overflows, the
        approximate division by infinity gives the limit, -0."""
        t = h * (-2.302208198144325 - 0.10294324018001904 * h * h)
        if INTERPRET:
            return h / (1.0 + tl.exp2(t))
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [t], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return tl.inline_asm_elementwise("div.approx.ftz.f32 $0, $1, $2;", "=r,r,r", [h, 1.0 + e],
                                         dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _epilogue(acc, c_ptr, sa_ptr, sb_ptr, bias_ptr, ism_ptr, amax_ptr, offs_m, offs_n, rm, rn, M, N, stride_cm,
                  HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, GELU_AMAX: tl.constexpr):
        """acc * 2^(s_a + s_w) (+ bias), stored with masks (every in-range element written).

        ``GELU_AMAX``: the bf16 result goes through the tanh GELU (rounded to bf16 again)
        before the store, and each row's ``max |gelu * ism|`` (the next layer's activation
        row maxima, :func:`~wanquant.kernels.act_quant.row_absmax_reference`) is merged into
        ``amax_ptr`` by an atomic maximum (tiles of one row run in any order).
        """
        sa = tl.load(sa_ptr + rm)
        sb = tl.load(sb_ptr + rn)
        out = acc * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        if INTERPRET:  # the interpreter truncates fp32 -> bf16; round to nearest even first
            if c_ptr.dtype.element_ty == tl.bfloat16:
                out = _round_bf16(out)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        if GELU_AMAX:  # out is bf16-exact in the interpreter already (above)
            g = _gelu_tanh(out.to(tl.bfloat16).to(tl.float32), INTERPRET)
            if INTERPRET:
                g = _round_bf16(g)
            g = g.to(tl.bfloat16)
            tl.store(ptrs, g, mask=mask)
            a = tl.where(mask, tl.abs(g.to(tl.float32) * tl.load(ism_ptr + rn)[None, :]), 0.0)
            tl.atomic_max(amax_ptr + offs_m, tl.max(a, axis=1), mask=offs_m < M)
        else:
            tl.store(ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_tile(acc, c_ptr, sa_ptr, sb_ptr, bias_ptr, ism_ptr, amax_ptr, pid_m, pid_n, M, N, stride_cm,
                    HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, SPLIT_EPI: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, GELU_AMAX: tl.constexpr):
        """The epilogue on the whole tile, or on its two column halves in turn (fewer live registers)."""
        offs_m = pid_m * BM + tl.arange(0, BM)
        rm = tl.where(offs_m < M, offs_m, 0)
        if SPLIT_EPI:
            h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            offs_n = pid_n * BN + tl.arange(0, BN // 2)
            _epilogue(h0, c_ptr, sa_ptr, sb_ptr, bias_ptr, ism_ptr, amax_ptr, offs_m, offs_n, rm,
                      tl.where(offs_n < N, offs_n, 0), M, N, stride_cm, HAS_BIAS, INTERPRET, GELU_AMAX)
            offs_n = offs_n + BN // 2
            _epilogue(h1, c_ptr, sa_ptr, sb_ptr, bias_ptr, ism_ptr, amax_ptr, offs_m, offs_n, rm,
                      tl.where(offs_n < N, offs_n, 0), M, N, stride_cm, HAS_BIAS, INTERPRET, GELU_AMAX)
        else:
            offs_n = pid_n * BN + tl.arange(0, BN)
            _epilogue(acc, c_ptr, sa_ptr, sb_ptr, bias_ptr, ism_ptr, amax_ptr, offs_m, offs_n, rm,
                      tl.where(offs_n < N, offs_n, 0), M, N, stride_cm, HAS_BIAS, INTERPRET, GELU_AMAX)

    @triton.jit
    def _fp8_gemm_kernel(
        a_ptr, b_ptr, sa_ptr, sb_ptr, lr_ptr, l2_ptr, idx_ptr, cnt_ptr, bias_ptr, ism_ptr, amax_ptr, c_ptr,
        M, N, K, stride_cm, rc, nch,
        RC: tl.constexpr, HAS_LR: tl.constexpr, LR_CHUNKED: tl.constexpr, RCB: tl.constexpr, HAS_BIAS: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
        IMPRECISE_ACC: tl.constexpr, INTERPRET: tl.constexpr, SPLIT_EPI: tl.constexpr, GELU_AMAX: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n = tl.cdiv(N, BN)
        pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        # Out-of-range rows/columns read row 0 (always valid); their results are masked off.
        rm = tl.where(offs_m < M, offs_m, 0)
        rn = tl.where(offs_n < N, offs_n, 0)
        if HAS_LR:
            if LR_CHUNKED:
                acc = _lowrank_chunks(lr_ptr, l2_ptr, sa_ptr, idx_ptr, cnt_ptr, pid_n, rm, rn, rc, nch, RCB, BM, BN,
                                      INTERPRET)
            else:
                acc = _lowrank_init(lr_ptr, l2_ptr, sa_ptr, rm, rn, RC, BM, BN, INTERPRET)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * K + offs_k[None, :]
        b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * K + offs_k[:, None]
        for _ in range(0, K // BK):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=IMPRECISE_ACC)
            a_ptrs += BK
            b_ptrs += BK
        _store_tile(acc, c_ptr, sa_ptr, sb_ptr, bias_ptr, ism_ptr, amax_ptr, pid_m, pid_n, M, N, stride_cm,
                    HAS_BIAS, INTERPRET, SPLIT_EPI, BM, BN, GELU_AMAX)

def gemm_triton(
    a8: torch.Tensor,
    sa: torch.Tensor,
    w8: torch.Tensor,
    sw: torch.Tensor,
    lowrank: torch.Tensor | None,
    l2cat_scaled: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
    config: GemmConfig = DEFAULT_CONFIG,
    lr_chunks: tuple[torch.Tensor, torch.Tensor] | None = None,
    gelu_rowmax: GeluRowMax | None = None,
) -> torch.Tensor:
    """Fused FP8 GEMM + low-rank + bias (see the module docstring). Returns ``out [M, N]``.

    ``lowrank`` is the activation kernel's ``(hi | lo)``; ``l2cat_scaled`` is ``[L2|L2] * 2^-s_w``.
    ``out`` may be bf16 (the layer's output) or fp32 (tests: error before bf16 rounding).
    ``lr_chunks``: :func:`lowrank_chunk_table` of ``l2cat_scaled`` for ``config.block_n``
    (layers precompute it; built here when missing and the width exceeds LR_SINGLE_MAX).
    ``gelu_rowmax``: ``out`` holds ``gelu(y)`` (bf16) and ``gelu_rowmax.amax`` its row maxima
    (see :class:`GeluRowMax`).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    m, k = a8.shape
    n = w8.shape[0]
    if w8.shape[1] != k:
        raise ValueError(f"K mismatch: a8 {tuple(a8.shape)}, w8 {tuple(w8.shape)}")
    cfg = config
    bk = cfg.block_k
    while k % bk:
        bk //= 2
    if bk < 16:
        raise ValueError(f"K={k} must be a multiple of 16")
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=a8.device)
    if gelu_rowmax is not None:
        ism, amax = gelu_rowmax
        if out.dtype != torch.bfloat16:
            raise ValueError(f"the GELU epilogue writes bf16 (the next layer's input), not {out.dtype}")
        if ism.shape != (n,) or ism.dtype != torch.float32 or amax.shape != (m,) or amax.dtype != torch.float32:
            raise ValueError(f"gelu_rowmax needs inv_smooth fp32 [{n}] and amax fp32 [{m}], got "
                             f"{ism.dtype} {tuple(ism.shape)} and {amax.dtype} {tuple(amax.shape)}")
    has_lr = lowrank is not None and lowrank.shape[1] > 0
    rc = lowrank.shape[1] if has_lr else 16
    if has_lr and (rc & (rc - 1) or rc < 16):
        raise ValueError(f"low-rank width {rc} must be a power of two >= 16 (see act_quant.padded_rank)")
    chunked = has_lr and rc > LR_SINGLE_MAX
    if chunked:
        if lr_chunks is None:
            lr_chunks = lowrank_chunk_table(l2cat_scaled, cfg.block_n)
        want = (triton.cdiv(n, cfg.block_n), rc // LR_CHUNK)
        if tuple(lr_chunks[0].shape) != want or tuple(lr_chunks[1].shape) != want[:1]:
            raise ValueError(f"lr_chunks shapes {tuple(lr_chunks[0].shape)}, {tuple(lr_chunks[1].shape)} do not fit "
                             f"{want[0]} tiles of {cfg.block_n} and width {rc}: rebuild with lowrank_chunk_table")
    dummy = sa
    common = dict(
        # RC is a compile-time width only on the single-dot path; chunked widths are runtime values.
        RC=LR_CHUNK if chunked else rc, HAS_LR=has_lr, LR_CHUNKED=chunked, RCB=LR_CHUNK, HAS_BIAS=bias is not None,
        BM=cfg.block_m, BN=cfg.block_n, BK=bk,
        GROUP_M=cfg.group_m, IMPRECISE_ACC=cfg.imprecise_acc, INTERPRET=interpreting(), SPLIT_EPI=cfg.split_epilogue,
        GELU_AMAX=gelu_rowmax is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    ism, amax = gelu_rowmax if gelu_rowmax is not None else (dummy, dummy)
    args = (sa, sw, lowrank if has_lr else dummy, l2cat_scaled if has_lr else dummy,
            lr_chunks[0] if chunked else dummy, lr_chunks[1] if chunked else dummy,
            bias if bias is not None else dummy, ism, amax, out, m, n, k, out.stride(0), rc, rc // LR_CHUNK)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    _fp8_gemm_kernel[(tiles,)](a8, w8, *args, **common)
    return out


def scaled_mm_supports_bias(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` takes a bias together with rowwise scales here."""
    key = str(device)
    if key not in _BIAS_OK:
        a = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
        w = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
        s1, s2 = torch.ones(16, 1, device=device), torch.ones(1, 16, device=device)
        bias = torch.ones(16, dtype=torch.bfloat16, device=device)
        try:
            y = torch._scaled_mm(a, w.t(), s1, s2, bias=bias, out_dtype=torch.bfloat16)
            _BIAS_OK[key] = bool((y.float() == 33.0).all())
        except (RuntimeError, TypeError):
            _BIAS_OK[key] = False
    return _BIAS_OK[key]


_BIAS_OK: dict[str, bool] = {}


def gemm_cublas(
    a8: torch.Tensor,
    sa: torch.Tensor,
    w8: torch.Tensor,
    sw: torch.Tensor,
    lowrank: torch.Tensor | None,
    l2cat: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
    fast_accum: bool = True,
) -> torch.Tensor:
    """cuBLAS FP8 rowwise GEMM (+ bias), then ``out += lowrank @ l2cat^T`` in bf16.

    ``l2cat`` is unscaled here. Output bf16 ``[M, N]``; rounded to bf16 twice (after each GEMM).
    """
    m, n = a8.shape[0], w8.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=a8.device)
    fused_bias = bias is not None and scaled_mm_supports_bias(a8.device)
    torch._scaled_mm(
        a8, w8.t(), sa.view(-1, 1), sw.view(1, -1), bias=bias if fused_bias else None,
        out_dtype=torch.bfloat16, use_fast_accum=fast_accum, out=out,
    )
    if bias is not None and not fused_bias:
        out.add_(bias)
    if lowrank is not None and lowrank.shape[1] > 0:
        out.addmm_(lowrank, l2cat.t())
    return out
