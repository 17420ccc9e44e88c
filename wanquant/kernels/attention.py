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

Where the code is (this module re-exports the public names of the others, so
``attention.X`` reaches all of them):

* :mod:`~wanquant.kernels.attention_config`: the constants (:data:`K_BLOCK`, ...),
  :class:`AttnConfig` (every option, why it exists and what it measured),
  :data:`DEFAULT_CONFIG`, :data:`CONFIGS`, their checks and parsing (:func:`env_config`),
  :class:`QuantKV`, :func:`v_token_order`;
* :mod:`~wanquant.kernels.attention_reference`: the PyTorch references
  (:func:`quantize_kv_reference`, :func:`attention_prepared_reference`,
  :func:`attention_int8_reference`), exact attention (:func:`attention_fp32`) and
  :func:`relative_error`;
* :mod:`~wanquant.kernels.attention_triton`: the Triton kernels (``@triton.jit``);
* :mod:`~wanquant.kernels.attention_ws`: the main loop as a warp-specialized Gluon kernel
  (``gluon_ws`` configs);
* here: the launchers (:func:`quantize_kv`, :func:`attention_prepared`,
  :func:`attention_int8`) and :func:`int8_attention_status`.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from wanquant.kernels.act_quant import HAS_TRITON, interpreting
from wanquant.kernels.attention_config import (CONFIGS, DEFAULT_CONFIG, E4M3_MAX, HALF_EXP_MAX_BLOCK_N, INT8_MAX,
                                               K_BLOCK, LAZY_SLACK, LOG2_P_SCALE, LOG2E, MAX_SPLITS, P_SCALE,
                                               STATS_BLOCK, STATS_TILE, TRITON_MAX_STAGES, V_PERM_BLOCK, AttnConfig,
                                               Layout, QuantKV, _bshd_view, _ceil_to, _check_v_perm, check_config,
                                               check_head_dim, default_scale, env_config, parse_config,
                                               query_scale_factor, v_token_order)
from wanquant.kernels.attention_reference import (attention_fp32, attention_int8_reference,
                                                  attention_prepared_reference, quantize_kv_reference,
                                                  quantize_q_reference, relative_error)
from wanquant.kernels.attention_ws import HEAD_DIM as WS_HEAD_DIM
from wanquant.kernels.attention_ws import HAS_GLUON, attention_ws_launch

if HAS_TRITON:
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    from wanquant.kernels.attention_triton import (_attn_fwd_kernel, _kv_finalize_kernel, _kv_quant_kernel,
                                                   _kv_stats_kernel, _q_quant_kernel)

__all__ = [
    # attention_config
    "CONFIGS", "DEFAULT_CONFIG", "E4M3_MAX", "HALF_EXP_MAX_BLOCK_N", "INT8_MAX", "K_BLOCK", "LAZY_SLACK",
    "LOG2_P_SCALE", "LOG2E", "MAX_SPLITS", "P_SCALE", "STATS_BLOCK", "STATS_TILE", "TRITON_MAX_STAGES",
    "V_PERM_BLOCK", "AttnConfig", "Layout", "QuantKV", "check_config", "check_head_dim", "default_scale", "env_config", "parse_config", "query_scale_factor",
    "v_token_order",
    # attention_reference
    "attention_fp32", "attention_int8_reference", "attention_prepared_reference", "quantize_kv_reference",
    "quantize_q_reference", "relative_error",
    # here
    "attention_int8", "attention_prepared", "config_for", "int8_attention_status", "padded_queries", "quantize_kv",
    "quantize_q", "rope_attention_int8",
]


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
    _kv_stats_kernel[(b * h, nsplit)](k, v, part, s, h, per, *kst, *vst, D=d, BT=STATS_TILE, NSPLIT=nsplit,
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


def config_for(cfg: AttnConfig, head_dim: int, tma: bool, gluon: bool) -> AttnConfig:
    """What runs of ``cfg`` on a device that has (or lacks) TMA and Gluon's sm_90 kernel.

    The Gluon kernel's numbers are checked on the GPU at Wan's head dim only; elsewhere the
    Triton kernel runs the same config (same numbers) with at most :data:`TRITON_MAX_STAGES`:
    the Gluon ring's deeper slots are for its two wgmmas in flight, and four 64x128 K/V
    stages would not fit the ~100 KB of shared memory of an sm_89 SM.
    """
    if cfg.tma and not tma:
        cfg = replace(cfg, tma=False)
    if cfg.gluon_ws and (head_dim != WS_HEAD_DIM or not gluon):
        cfg = replace(cfg, gluon_ws=False, pv_overlap=False, defer_rescale=False, ping_pong=False, qk_ahead=False,
                      consumers=2, exp2_fma=0, tree_max=False, num_stages=min(cfg.num_stages, TRITON_MAX_STAGES))
    return cfg


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
    qv, b, s_q, h, d = _bshd_view(q, layout)
    cfg = config_for(cfg, head_dim=d, tma=_has_tma(q.device), gluon=_gluon_runs_on(q.device))
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
    qk_c = query_scale_factor(d, scale)
    s_qpad = padded_queries(s_q, cfg)
    if cfg.q_prepass:
        q8, qs = quantize_q(qv, s_qpad, scale, "bshd", cfg.block_m)
    else:
        q8, qs = kv.k8, kv.k_scale  # unused placeholders
    _main_kernel(qv, q8, qs, kv, ov, s_q, s_qpad, qk_c, cfg)
    return out


def quantize_q(q: torch.Tensor, s_qpad: int, scale: float | None = None, layout: Layout = "bshd",
               block_m: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The Q pre-pass on the GPU (``q_prepass`` configs): ``(q8 int8 [B*H, s_qpad, D], qs fp32
    [B*H, s_qpad])``, :func:`quantize_q_reference` with rows from ``S_q`` to ``s_qpad`` zero.
    ``s_qpad``: a multiple of ``block_m`` (:func:`padded_queries`)."""
    _require_triton()
    qv, b, s_q, h, d = _bshd_view(q, layout)
    if s_qpad < s_q or s_qpad % block_m:
        raise ValueError(f"s_qpad {s_qpad} must be a multiple of block_m {block_m} and >= the {s_q} queries")
    qk_c = query_scale_factor(d, scale)
    q8 = torch.empty(b * h, s_qpad, d, dtype=torch.int8, device=q.device)
    qs = torch.empty(b * h, s_qpad, dtype=torch.float32, device=q.device)
    qst = (qv.stride(0), qv.stride(1), qv.stride(2))
    _q_quant_kernel[(s_qpad // block_m, b * h)](qv, q8, qs, s_q, s_qpad, h, qk_c, *qst, D=d, BM=block_m, num_warps=4)
    return q8, qs


def padded_queries(s_q: int, cfg: AttnConfig) -> int:
    """Rows of the INT8 Q buffer for ``s_q`` queries under ``cfg`` (as it runs: :func:`config_for`):
    a whole number of programs' queries."""
    rows = cfg.block_m * (cfg.consumers if cfg.gluon_ws else 1)  # queries per program
    return triton.cdiv(s_q, rows) * rows


def _main_kernel(qv, q8, qs, kv: QuantKV, ov, s_q: int, s_qpad: int, qk_c: float, cfg: AttnConfig) -> torch.Tensor:
    """Launch the main kernel (``qv``: bf16 queries, read unless ``cfg.q_prepass``; then
    ``q8``/``qs`` of :func:`padded_queries` rows); writes ``ov`` (``[B, S, H, D]`` view)."""
    b, h, d = kv.batch, kv.heads, kv.head_dim
    rows = cfg.block_m * (cfg.consumers if cfg.gluon_ws else 1)
    grid = (s_qpad // rows, b * h)
    qst = (qv.stride(0), qv.stride(1), qv.stride(2))
    if cfg.gluon_ws:
        attention_ws_launch(q8, qs, kv, ov, s_q, s_qpad, cfg.block_n, cfg.num_stages, cfg.ws_overlap,
                            cfg.ping_pong, LOG2_P_SCALE, cfg.consumers, cfg.exp2_fma, cfg.tree_max)
        return ov
    k_src, v_src = kv.k8, kv.v8t
    if cfg.tma:
        k_src = TensorDescriptor.from_tensor(kv.k8.view(-1, d), [cfg.block_n, d])
        v_src = TensorDescriptor.from_tensor(kv.v8t.view(-1, kv.seq_pad), [d, cfg.block_n])
    _attn_fwd_kernel[grid](
        qv, q8, qs, k_src, kv.k_scale, v_src, kv.v_scale, kv.v_mean, ov, _ones_e4m3(ov.device, cfg.block_n),
        s_q, s_qpad, kv.seq, kv.seq_pad, h, qk_c,
        *qst, ov.stride(0), ov.stride(1), ov.stride(2),
        D=d, BM=cfg.block_m, BN=cfg.block_n, KB=kv.k_block, PV_PROMOTE=cfg.pv_promote, Q_PRE=cfg.q_prepass,
        FOLD=cfg.fold, TMA=cfg.tma, VPERM=kv.v_perm, LMMA=cfg.l_mma, WS=cfg.warp_spec, HALF_EXP=cfg.half_exp,
        LAZY=cfg.lazy_rescale, SLACK=LAZY_SLACK, AHEAD=cfg.qk_ahead,
        TOP=LOG2_P_SCALE - LAZY_SLACK if cfg.lazy_rescale else LOG2_P_SCALE, INTERPRET=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )
    return ov


def attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   layout: Layout = "bshd", config: AttnConfig | None = None, k_block: int = K_BLOCK,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit attention (Triton): :func:`quantize_kv` then :func:`attention_prepared`."""
    cfg = config or DEFAULT_CONFIG
    return attention_prepared(q, quantize_kv(k, v, layout, k_block, v_perm=cfg.v_perm), scale, layout, cfg, out)


def rope_attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                        k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
                        scale: float | None = None, config: AttnConfig | None = None) -> torch.Tensor:
    """Wan's self-attention core on the projections ``q, k, v [B, T, heads * D]``: the q/k
    RMS-norm + rotary (:mod:`wanquant.kernels.rope`), then 8-bit attention; ``[B, T, H, D]``.

    The same numbers as :func:`~wanquant.kernels.rope.qk_norm_rope` followed by
    :func:`attention_int8`, with one pass fewer over the queries: where the config takes INT8
    Q from a pre-pass (``q_prepass``, the default's), the rotary kernel writes that INT8 Q
    itself (:func:`~wanquant.kernels.rope.qk_norm_rope_int8_q`), so the rotated queries are
    neither written in 16 bits nor read back.
    """
    from wanquant.kernels.rope import qk_norm_rope, qk_norm_rope_int8_q

    _require_triton()
    cfg = config or DEFAULT_CONFIG
    check_config(cfg, K_BLOCK)
    b, t, c = q.shape
    vv = v.unflatten(2, (heads, -1))
    d = c // heads
    run = config_for(cfg, head_dim=d, tma=_has_tma(q.device), gluon=_gluon_runs_on(q.device))
    if not run.q_prepass:
        qr, kr = qk_norm_rope(q, k, q_weight, k_weight, cos, sin, heads, eps)
        return attention_int8(qr, kr, vv, scale, "bshd", cfg)
    qk_c = query_scale_factor(d, scale)
    s_qpad = padded_queries(t, run)
    q8, qs, kr = qk_norm_rope_int8_q(q, k, q_weight, k_weight, cos, sin, heads, eps, qk_c, s_qpad)
    kv = quantize_kv(kr, vv, "bshd", K_BLOCK, v_perm=cfg.v_perm)
    out = torch.empty(b, t, heads, d, dtype=q.dtype, device=q.device)
    return _main_kernel(out, q8, qs, kv, out, t, s_qpad, qk_c, run)

