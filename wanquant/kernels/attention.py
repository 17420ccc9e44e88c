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
     on the integers (the scale is positive).
   * online softmax in fp32 (base 2). P is written as ``448 * 2^(s - m)`` (P's scale
     448 = e4m3's maximum is folded into the exponent: no multiply) and cast to e4m3;
     the row sum ``l`` uses the unrounded fp32 values. The 448 cancels in ``acc / l``.
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
from dataclasses import dataclass
from typing import Literal

import torch

from wanquant.kernels.act_quant import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

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

    def describe(self) -> str:
        acc = "-promote" if self.pv_promote else ""
        qpre = "-qpre" if self.q_prepass else ""
        return f"m{self.block_m}-n{self.block_n}-w{self.num_warps}-s{self.num_stages}{acc}{qpre}"


# Fastest measured on an H100 (benchmarks/results/attention.md, 2026-12-05): 30.1 ms at
# 32,760 tokens (1.23x SDPA cuDNN), 163.9 ms at 75,600 (1.21x); 64-row tiles let 2-3 CTAs
# share an SM. The -qpre variant measured the same within 1 %.
DEFAULT_CONFIG = AttnConfig(block_m=64, block_n=128, num_warps=4, num_stages=3)
# What the benchmark sweeps on an H100 (the fastest measured becomes DEFAULT_CONFIG).
# Compiled for sm_90 (Triton 3.9, no GPU needed): every config runs both products on wgmma
# with no register spills. 128-row tiles with 8 warps need ~215-250 registers a thread, so
# one CTA per SM, whose softmax and tensor-core work then alternate (Triton waits for the
# Q.K^T wgmma before the softmax); 64-row tiles with 4 warps need 160-255 registers for 128
# threads, so 2-3 CTAs share an SM and overlap each other's softmax and MMAs, at the cost
# of twice the K/V reads from L2.
CONFIGS = (
    AttnConfig(128, 128, 8, 3),
    AttnConfig(128, 128, 8, 2),
    AttnConfig(128, 64, 8, 3),
    AttnConfig(128, 128, 8, 3, q_prepass=True),
    AttnConfig(128, 128, 8, 3, pv_promote=True),
    AttnConfig(64, 128, 4, 3),
    AttnConfig(64, 128, 4, 2),
    AttnConfig(64, 128, 4, 2, q_prepass=True),
    AttnConfig(64, 128, 4, 3, q_prepass=True),
    AttnConfig(64, 64, 4, 3),
    AttnConfig(64, 64, 4, 3, q_prepass=True),
)


@dataclass
class QuantKV:
    """Keys and values as the main kernel reads them (padded to ``seq_pad`` tokens).

    ``k8`` int8 ``[B*H, seq_pad, D]`` (padded rows 0); ``k_scale`` fp32
    ``[B*H, seq_pad / k_block]``; ``v8t`` e4m3 ``[B*H, D, seq_pad]`` (transposed, padded
    columns 0); ``v_scale`` fp32 ``[B*H, D]``; ``v_mean`` fp32 ``[B*H, D]`` (zeros without
    V smoothing). Keys and values are ``k ~ (k8 * k_scale) + mu_k`` and
    ``v ~ v8 * v_scale + v_mean``; ``mu_k`` is dropped (softmax does not see it).
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


def quantize_kv_reference(k: torch.Tensor, v: torch.Tensor, layout: Layout = "bshd", k_block: int = K_BLOCK,
                          smooth_k: bool = True, smooth_v: bool = True) -> QuantKV:
    """What :func:`quantize_kv` writes, in plain PyTorch (fp32 math, same formulas)."""
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
    return QuantKV(k8.view(b * h, s_pad, d).contiguous(), k_scale.contiguous(), v8t,
                   (vamax * _fp32(1.0 / E4M3_MAX, dev)).contiguous(), v_mean.contiguous(), b, h, s, k_block)


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


def attention_prepared_reference(q: torch.Tensor, kv: QuantKV, scale: float | None = None, layout: Layout = "bshd",
                                 block_n: int = DEFAULT_CONFIG.block_n, out_dtype: torch.dtype | None = None
                                 ) -> torch.Tensor:
    """What :func:`attention_prepared` computes, tile by tile in ``block_n`` keys.

    The running maximum at which each tile's P is rounded to e4m3 is the kernel's, so
    only accumulation order and exp2's last bits differ from it.
    """
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
    m = torch.full((bh, s_q), -math.inf, dtype=torch.float32, device=dev)
    l = torch.zeros(bh, s_q, dtype=torch.float32, device=dev)
    acc = torch.zeros(bh, s_q, d, dtype=torch.float32, device=dev)
    shift = _fp32(LOG2_P_SCALE, dev)
    for n0 in range(0, kv.seq, block_n):
        n1 = min(n0 + block_n, kv.seq)
        qk = (qd @ kv.k8[:, n0:n1].double().transpose(1, 2)).float()  # exact integers
        sc = qs * kv.k_scale[:, n0 // kv.k_block, None]
        s = qk * sc[..., None]
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp2(s - (m_new - shift)[..., None])  # 448 * 2^(s - m)
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(-1)
        p8 = p.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        v8 = kv.v8t[:, :, n0:n1].transpose(1, 2)
        acc = acc * alpha[..., None] + (p8.double() @ v8.double()).float()
        m = m_new
    o = acc * (1.0 / l)[..., None] * kv.v_scale[:, None, :] + kv.v_mean[:, None, :]
    o = o.to(out_dtype or q.dtype).view(b, h, s_q, d)
    return o.transpose(1, 2) if layout == "bshd" else o


def attention_int8_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                             layout: Layout = "bshd", block_n: int = DEFAULT_CONFIG.block_n, k_block: int = K_BLOCK,
                             smooth_k: bool = True, smooth_v: bool = True) -> torch.Tensor:
    """The 8-bit attention in plain PyTorch: the definition the kernels implement.

    ``smooth_k=False`` / ``smooth_v=False`` switch the smoothing off (ablations, tests).
    Output: ``q``'s dtype and layout.
    """
    kv = quantize_kv_reference(k, v, layout, k_block, smooth_k, smooth_v)
    return attention_prepared_reference(q, kv, scale, layout, block_n)


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

    @triton.jit(do_not_specialize=["S"])
    def _kv_quant_kernel(k_ptr, v_ptr, part_ptr, k8_ptr, ks_ptr, v8_ptr, vs_ptr, vm_ptr,
                         S, S_pad, H, inv_s,
                         skb, sks, skh, svb, svs, svh,
                         D: tl.constexpr, KB: tl.constexpr, NSPLIT: tl.constexpr,
                         SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr):
        """One K scale block (KB tokens) of one (batch, head): INT8 keys and e4m3 values.

        Every program reduces the (small) partial statistics itself; the first also stores
        V's scale and mean. Padded tokens (>= S) are written as zeros.
        """
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
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
        inv_v = _inv_scale(vamax, 448.0)
        if blk == 0:
            tl.store(vs_ptr + bh * D + d, vamax * (1.0 / 448.0))
            tl.store(vm_ptr + bh * D + d, v_mean)

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
        # Transposed store: V^T [B*H, D, S_pad] (tokens contiguous, K-major for the P.V wgmma).
        tl.store(v8_ptr + bh64 * D * S_pad + d[None, :].to(tl.int64) * S_pad + s64[:, None],
                 v8.to(tl.float8e4nv))

    @triton.jit
    def _attn_tile(acc, l_i, m_i, q8, qsc, k_base, v_base, ks_base, n0, S_k, S_kpad,
                   D: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, MASKED: tl.constexpr,
                   PV_PROMOTE: tl.constexpr, INTERPRET: tl.constexpr):
        """One key tile of the online softmax (see the module docstring)."""
        offs_n = n0 + tl.arange(0, BN)
        d = tl.arange(0, D)
        k = tl.load(k_base + offs_n[None, :] * D + d[:, None])  # [D, BN] int8, D contiguous: K-major
        qk = tl.dot(q8, k, out_dtype=tl.int32)  # exact
        if MASKED:
            col_ok = offs_n < S_k
            qk = tl.where(col_ok[None, :], qk, -4194303)  # below any real score, inside the 2^22 trick range
        sc = qsc * tl.load(ks_base + n0 // KB)  # log2-domain units per integer unit, per row
        m_new = tl.maximum(m_i, tl.max(qk, 1).to(tl.float32) * sc)
        qkf = (qk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0  # int32 -> fp32, exact
        t = qkf * sc[:, None] - (m_new - 8.807354922057604)[:, None]  # log2(448 * 2^(s - m))
        if MASKED:
            t = tl.where(col_ok[None, :], t, float("-inf"))
        p = tl.math.exp2(t)  # in [0, 448]
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + d[None, :] * S_kpad + offs_n[:, None])  # [BN, D] e4m3 from V^T: K-major
        if INTERPRET:  # the interpreter's fp32 -> e4m3 cast truncates; the GPU's rounds to nearest even
            p8 = _round_e4m3(p).to(tl.float8e4nv)
        else:
            p8 = p.to(tl.float8e4nv)
        if PV_PROMOTE:
            acc = tl.dot(p8, v, acc, max_num_imprecise_acc=BN)
        else:
            acc = tl.dot(p8, v, acc)
        return acc, l_i, m_new

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
    def _attn_fwd_kernel(q_ptr, q8_ptr, qs_ptr, k8_ptr, ks_ptr, v8_ptr, vs_ptr, vm_ptr, o_ptr,
                         S_q, S_qpad, S_k, S_kpad, H, qk_c,
                         sqb, sqs, sqh, sob, sos, soh,
                         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr,
                         PV_PROMOTE: tl.constexpr, Q_PRE: tl.constexpr, INTERPRET: tl.constexpr):
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

        k_base = k8_ptr + bh64 * S_kpad * D
        v_base = v8_ptr + bh64 * D * S_kpad
        ks_base = ks_ptr + bh64 * (S_kpad // KB)
        m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, D), dtype=tl.float32)
        n_full = (S_k // BN) * BN
        for n0 in range(0, n_full, BN):
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q8, qsc, k_base, v_base, ks_base, n0, S_k, S_kpad,
                                       D, BN, KB, False, PV_PROMOTE, INTERPRET)
        if n_full < S_k:  # the ragged last tile, masked
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q8, qsc, k_base, v_base, ks_base, n_full, S_k, S_kpad,
                                       D, BN, KB, True, PV_PROMOTE, INTERPRET)

        vs = tl.load(vs_ptr + bh64 * D + d)
        vm = tl.load(vm_ptr + bh64 * D + d)
        o = acc * (1.0 / l_i)[:, None] * vs[None, :] + vm[None, :]
        if INTERPRET:  # the interpreter truncates fp32 -> bf16; round to nearest even first
            if o_ptr.dtype.element_ty == tl.bfloat16:
                o = _round_bf16(o)
        tl.store(o_ptr + b * sob + m64[:, None] * sos + h * soh + d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None])


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
                smooth_k: bool = True, smooth_v: bool = True) -> QuantKV:
    """The K/V pre-pass on the GPU (two Triton kernels); :func:`quantize_kv_reference` is its definition."""
    _require_triton()
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
    _kv_quant_kernel[(s_pad // k_block, b * h)](k, v, part, k8, ks, v8t, vs, vm, s, s_pad, h, 1.0 / s, *kst, *vst,
                                                D=d, KB=k_block, NSPLIT=nsplit, SMOOTH_K=smooth_k,
                                                SMOOTH_V=smooth_v, num_warps=8 if d >= 128 else 4)
    return QuantKV(k8, ks, v8t, vs, vm, b, h, s, k_block)


def attention_prepared(q: torch.Tensor, kv: QuantKV, scale: float | None = None, layout: Layout = "bshd",
                       config: AttnConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit attention of ``q`` against keys/values from :func:`quantize_kv`.

    ``q``: ``[B, S_q, H, D]`` (or ``[B, H, S_q, D]``), any strides with a unit last one
    (e.g. a token slice of a larger buffer). ``out``: same shape and layout as ``q``,
    any float dtype (default: ``q``'s). Returns ``out``.
    """
    _require_triton()
    cfg = config or DEFAULT_CONFIG
    check_config(cfg, kv.k_block)
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
    grid = (triton.cdiv(s_q, cfg.block_m), b * h)
    qst = (qv.stride(0), qv.stride(1), qv.stride(2))
    s_qpad = grid[0] * cfg.block_m
    if cfg.q_prepass:
        q8 = torch.empty(b * h, s_qpad, d, dtype=torch.int8, device=q.device)
        qs = torch.empty(b * h, s_qpad, dtype=torch.float32, device=q.device)
        _q_quant_kernel[grid](qv, q8, qs, s_q, s_qpad, h, qk_c, *qst, D=d, BM=cfg.block_m, num_warps=4)
    else:
        q8, qs = kv.k8, kv.k_scale  # unused placeholders
    _attn_fwd_kernel[grid](
        qv, q8, qs, kv.k8, kv.k_scale, kv.v8t, kv.v_scale, kv.v_mean, ov,
        s_q, s_qpad, kv.seq, kv.seq_pad, h, qk_c,
        *qst, ov.stride(0), ov.stride(1), ov.stride(2),
        D=d, BM=cfg.block_m, BN=cfg.block_n, KB=kv.k_block, PV_PROMOTE=cfg.pv_promote, Q_PRE=cfg.q_prepass,
        INTERPRET=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   layout: Layout = "bshd", config: AttnConfig | None = None, k_block: int = K_BLOCK,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit attention (Triton): :func:`quantize_kv` then :func:`attention_prepared`."""
    return attention_prepared(q, quantize_kv(k, v, layout, k_block), scale, layout, config, out)


def env_config() -> AttnConfig:
    """:data:`DEFAULT_CONFIG`, or ``WANQUANT_ATTN_CONFIG=m128-n64-w4-s3[-promote][-qpre]`` (experiments)."""
    text = os.environ.get("WANQUANT_ATTN_CONFIG")
    if not text:
        return DEFAULT_CONFIG
    return parse_config(text)


def parse_config(text: str) -> AttnConfig:
    """Inverse of :meth:`AttnConfig.describe`."""
    parts = text.strip().split("-")
    try:
        vals = {p[0]: int(p[1:]) for p in parts if p and p[0] in "mnws" and p[1:].isdigit()}
        return AttnConfig(vals["m"], vals["n"], vals["w"], vals["s"], pv_promote="promote" in parts,
                          q_prepass="qpre" in parts)
    except (KeyError, ValueError) as e:
        raise ValueError(f"attention config {text!r} is not of the form m128-n128-w8-s3[-promote][-qpre]") from e
