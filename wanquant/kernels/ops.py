"""The fast paths as ``torch.library`` custom ops, so ``torch.compile`` traces through them.

``torch.compile`` cannot look inside a Triton launch wrapped in Python bookkeeping (launch
choice, scratch buffers, padded outputs): without help it breaks the graph at every W4A4
linear and every 8-bit attention, and the elementwise work between them (modulation,
norms, rotary, gates, residuals) stays unfused. Registered as opaque ops with a fake
(meta) implementation each, they become single nodes that Inductor schedules around:

* ``wanquant::w4a4_linear``: one :class:`~wanquant.kernels.dispatch.FastW4A4` call
  (activation quantization + weight expansion + FP8 GEMM with low-rank and bias), taking
  the layer's prepared operands as tensors; ``wanquant::w4a4_linear_gelu``: the same with
  the tanh GELU and the next layer's row maxima in the GEMM's epilogue;
* ``wanquant::attention_int8``: :func:`~wanquant.kernels.attention.attention_int8`
  (K/V pre-pass + main kernel), ``[B, S, H, D]`` in and out;
* ``wanquant::qk_norm_rope``: :func:`~wanquant.kernels.rope.qk_norm_rope`, Wan's q/k
  RMS-norm and rotary in one pass (Inductor's own fusion of it is 4x off its memory floor);
  ``wanquant::rope_attention_int8``: that and the 8-bit attention in one node (the rotary
  kernel writes the attention's INT8 queries);
* ``wanquant::norm_modulate`` and ``wanquant::residual_norm``:
  :func:`~wanquant.kernels.adaln.residual_norm` without and with a residual addend (the
  block's modulated LayerNorms; a candidate, see that module).

Each op's CPU implementation runs the PyTorch references of the same steps
(:func:`~wanquant.kernels.act_quant.act_quant_reference`,
:func:`~wanquant.kernels.weight_prep.expand_weight_reference`,
:func:`~wanquant.kernels.gemm.gemm_reference`,
:func:`~wanquant.kernels.attention.attention_int8_reference`), so graphs that use them
compile and run on CPU (tests, ``torch.library.opcheck``).

Why the clip setting is a tensor: a compiled block must serve all 40 blocks of an expert
(regional compilation). Python floats read from a layer would be guarded as constants,
and layers whose calibrated clip ratios differ would each force a recompile; the layer's
clip table as a host tensor plus the expert's bin index (the same for every layer) keeps
one graph for all blocks. Launch settings (GEMM tile, activation launch) are strings that
name entries of :data:`_LAUNCHES`, the same for every layer.
"""

from typing import Optional

import torch
from torch import Tensor

from wanquant.kernels import adaln as N
from wanquant.kernels import attention as A
from wanquant.kernels.act_quant import act_quant_reference, pad_rows, row_absmax_reference
from wanquant.kernels.gemm import GemmConfig, gemm_reference
from wanquant.kernels.rope import qk_norm_rope as _qk_norm_rope
from wanquant.kernels.rope import qk_norm_rope_reference
from wanquant.kernels.weight_prep import expand_weight_reference

# launch key -> (GEMM config, activation launch or None for "by M"), registered by launch_key().
_LAUNCHES: dict[str, tuple[GemmConfig, Optional[tuple[int, int, int, int]]]] = {}


def launch_key(gemm_config: GemmConfig, act_launch: Optional[tuple[int, int, int, int]]) -> str:
    """A string naming ``(gemm_config, act_launch)`` for :func:`w4a4_linear` (registered here)."""
    key = f"{gemm_config.describe()}|{'auto' if act_launch is None else 'x'.join(map(str, act_launch))}"
    _LAUNCHES.setdefault(key, (gemm_config, act_launch))
    return key


def _clip_of(clip_table: Tensor, bin_index: int) -> tuple[float, int]:
    if not 0 <= bin_index < clip_table.shape[0]:
        raise ValueError(f"bin {bin_index} outside the clip table's {clip_table.shape[0]} bins")
    ratio, offset = clip_table[bin_index].tolist()
    return float(ratio), int(round(offset))


# ---------------------------------------------------------------------------------------
# W4A4 linear
@torch.library.custom_op("wanquant::w4a4_linear", mutates_args=())
def w4a4_linear(x: Tensor, qweight: Tensor, wscales: Tensor, s_w: Tensor, w_row_scale: Tensor, inv_smooth: Tensor,
                l1s: Optional[Tensor], l2cat: Optional[Tensor], lr_idx: Optional[Tensor], lr_cnt: Optional[Tensor],
                bias: Optional[Tensor], clip_table: Tensor, bin_index: int, scale_rule: str, backend: str,
                launch: str, row_amax: Optional[Tensor] = None, gelu_input: bool = False) -> Tensor:
    """``y [..., N]`` of a W4A4 layer on its fast-path operands (see FastW4A4).

    ``clip_table``: the layer's ``[bins, 2]`` (ratio, exponent offset) table in host
    memory; ``bin_index`` picks the row. ``backend``: ``"triton"`` (``l2cat`` holds
    ``[L2|L2] * 2^-s_w``) or ``"cublas"`` (unscaled). ``launch``: a :func:`launch_key`.
    ``row_amax``: :func:`~wanquant.kernels.act_quant.row_absmax_reference` of ``x`` (fp32,
    one per row of ``x.reshape(-1, K)``), computed in the graph so that Inductor fuses it
    into the kernel that writes ``x``; the activation kernel then reads ``x`` once.
    ``gelu_input``: the layer computes ``gelu_tanh(x)`` W^T (the GELU done by the activation
    kernel; see :func:`~wanquant.kernels.act_quant.act_quant`).
    """
    raise NotImplementedError(f"wanquant::w4a4_linear has no implementation for {x.device.type} tensors")


@w4a4_linear.register_fake
def _(x, qweight, wscales, s_w, w_row_scale, inv_smooth, l1s, l2cat, lr_idx, lr_cnt, bias, clip_table, bin_index,
      scale_rule, backend, launch, row_amax=None, gelu_input=False):
    torch._check(x.shape[-1] == 2 * qweight.shape[1], lambda: "input features do not match the packed weight")
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@w4a4_linear.register_kernel("cuda")
def _(x, qweight, wscales, s_w, w_row_scale, inv_smooth, l1s, l2cat, lr_idx, lr_cnt, bias, clip_table, bin_index,
      scale_rule, backend, launch, row_amax=None, gelu_input=False):
    return _w4a4_cuda(x, qweight, wscales, s_w, w_row_scale, inv_smooth, l1s, l2cat, lr_idx, lr_cnt, bias, clip_table,
                      bin_index, scale_rule, backend, launch, row_amax, gelu_input)


def _w4a4_cuda(x, qweight, wscales, s_w, w_row_scale, inv_smooth, l1s, l2cat, lr_idx, lr_cnt, bias, clip_table,
               bin_index, scale_rule, backend, launch, row_amax, gelu_input, next_inv_smooth=None):
    """The fast path on CUDA: ``y``, or with ``next_inv_smooth`` ``(gelu(y), its row maxima)``."""
    from wanquant.kernels import dispatch as D
    from wanquant.kernels.act_quant import act_quant, padded_rank
    from wanquant.kernels.gemm import GeluRowMax, gelu_rowmax_reference, gemm_cublas, gemm_triton
    from wanquant.kernels.weight_prep import expand_weight

    clip_ratio, exp_offset = _clip_of(clip_table, bin_index)
    gemm_config, act_launch = _LAUNCHES[launch]
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    r_pad = 0 if l1s is None else l1s.shape[1] // 2
    launch, programs = D.act_plan(m, x.device, act_launch)
    bm, bk, bk1, nw, ns = D.fit_act_launch(launch, padded_rank(r_pad))
    aq = act_quant(x2, inv_smooth, l1s, clip_ratio, exp_offset, scale_rule, nsplit=D.NSPLIT, m_pad=pad_rows(m),
                   block_m=bm, block_k=bk, num_warps=nw, num_stages=ns, block_k_lr=bk1, programs=programs,
                   row_amax=None if row_amax is None else row_amax.reshape(m), gelu_input=gelu_input)
    w8 = expand_weight(qweight, wscales, s_w, out=D.weight_scratch(x.device, n * k).view(n, k))
    amax = None
    if backend == "triton":
        chunks = None if lr_idx is None else (lr_idx, lr_cnt)
        epilogue = None
        if next_inv_smooth is not None:
            amax = torch.zeros(aq.q.shape[0], dtype=torch.float32, device=x.device)
            epilogue = GeluRowMax(next_inv_smooth, amax)
        y = gemm_triton(aq.q, aq.row_scale, w8, w_row_scale, aq.lowrank, l2cat, bias, config=gemm_config,
                        lr_chunks=chunks, gelu_rowmax=epilogue)
    else:
        y = gemm_cublas(aq.q, aq.row_scale, w8, w_row_scale, aq.lowrank, l2cat, bias)
        if next_inv_smooth is not None:  # no fused epilogue on cuBLAS: the same numbers in PyTorch
            y, amax = gelu_rowmax_reference(y, next_inv_smooth)
    y = y[:m].reshape(*lead, n)
    y = y if x.dtype == torch.bfloat16 else y.to(x.dtype)
    return y if next_inv_smooth is None else (y, amax[:m])


@w4a4_linear.register_kernel("cpu")
def _(x, qweight, wscales, s_w, w_row_scale, inv_smooth, l1s, l2cat, lr_idx, lr_cnt, bias, clip_table, bin_index,
      scale_rule, backend, launch, row_amax=None, gelu_input=False):
    return _w4a4_cpu(x, qweight, wscales, s_w, w_row_scale, inv_smooth, l1s, l2cat, bias, clip_table, bin_index,
                     scale_rule, backend, row_amax, gelu_input)


def _w4a4_cpu(x, qweight, wscales, s_w, w_row_scale, inv_smooth, l1s, l2cat, bias, clip_table, bin_index, scale_rule,
              backend, row_amax, gelu_input):
    # The PyTorch references of the three steps on the same operands (fp64 GEMM, one bf16 rounding).
    clip_ratio, exp_offset = _clip_of(clip_table, bin_index)
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    x2 = x.reshape(-1, k).to(torch.bfloat16)
    if gelu_input:  # torch's GELU (the CUDA kernel's form is a step apart on a few values)
        x2 = torch.nn.functional.gelu(x2.float(), approximate="tanh").to(torch.bfloat16)
    m = x2.shape[0]
    if row_amax is not None and not torch.equal(row_amax.reshape(m), row_absmax_reference(x2, inv_smooth)):
        raise ValueError("row_amax differs from row_absmax_reference(x, inv_smooth): the kernel would mis-scale rows")
    aq = act_quant_reference(x2, inv_smooth, l1s, clip_ratio, exp_offset, scale_rule, nsplit=2, m_pad=pad_rows(m))
    w8 = expand_weight_reference(qweight, wscales, s_w)
    y = gemm_reference(aq.q, aq.row_scale, w8, w_row_scale, aq.lowrank, l2cat, bias, l2_scaled=backend == "triton")
    return y[:m].to(torch.bfloat16).reshape(*x.shape[:-1], n).to(x.dtype)


@torch.library.custom_op("wanquant::w4a4_linear_gelu", mutates_args=())
def w4a4_linear_gelu(x: Tensor, qweight: Tensor, wscales: Tensor, s_w: Tensor, w_row_scale: Tensor,
                     inv_smooth: Tensor, l1s: Optional[Tensor], l2cat: Optional[Tensor], lr_idx: Optional[Tensor],
                     lr_cnt: Optional[Tensor], bias: Optional[Tensor], clip_table: Tensor, bin_index: int,
                     scale_rule: str, backend: str, launch: str, row_amax: Optional[Tensor],
                     next_inv_smooth: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`w4a4_linear` followed by the tanh GELU (bf16), and the GELU's row maxima
    against the next layer's ``next_inv_smooth`` (fp32 ``[rows]``; what that layer's
    ``row_amax`` takes). The Triton GEMM does both in its epilogue
    (:class:`~wanquant.kernels.gemm.GeluRowMax`): no kernel of its own reads or writes the
    GELU's input. A feed-forward's up projection runs it (:mod:`wanquant.model.ffn_gelu`)."""
    raise NotImplementedError(f"wanquant::w4a4_linear_gelu has no implementation for {x.device.type} tensors")


@w4a4_linear_gelu.register_fake
def _(x, qweight, wscales, s_w, w_row_scale, inv_smooth, l1s, l2cat, lr_idx, lr_cnt, bias, clip_table, bin_index,
      scale_rule, backend, launch, row_amax, next_inv_smooth):
    torch._check(x.shape[-1] == 2 * qweight.shape[1], lambda: "input features do not match the packed weight")
    torch._check(next_inv_smooth.shape[0] == qweight.shape[0], lambda: "next_inv_smooth does not match the output")
    rows = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], qweight.shape[0]), x.new_empty(rows, dtype=torch.float32)


@w4a4_linear_gelu.register_kernel("cuda")
def _(x, qweight, wscales, s_w, w_row_scale, inv_smooth, l1s, l2cat, lr_idx, lr_cnt, bias, clip_table, bin_index,
      scale_rule, backend, launch, row_amax, next_inv_smooth):
    return _w4a4_cuda(x, qweight, wscales, s_w, w_row_scale, inv_smooth, l1s, l2cat, lr_idx, lr_cnt, bias, clip_table,
                      bin_index, scale_rule, backend, launch, row_amax, False, next_inv_smooth)


@w4a4_linear_gelu.register_kernel("cpu")
def _(x, qweight, wscales, s_w, w_row_scale, inv_smooth, l1s, l2cat, lr_idx, lr_cnt, bias, clip_table, bin_index,
      scale_rule, backend, launch, row_amax, next_inv_smooth):
    from wanquant.kernels.gemm import gelu_rowmax_reference

    y = _w4a4_cpu(x, qweight, wscales, s_w, w_row_scale, inv_smooth, l1s, l2cat, bias, clip_table, bin_index,
                  scale_rule, backend, row_amax, False)
    g, amax = gelu_rowmax_reference(y, next_inv_smooth)
    return g.to(x.dtype), amax


# ---------------------------------------------------------------------------------------
# 8-bit attention
@torch.library.custom_op("wanquant::attention_int8", mutates_args=())
def attention_int8(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], reference: bool) -> Tensor:
    """8-bit attention of ``[B, S, H, D]`` tensors (output contiguous, ``q``'s dtype).

    ``reference``: the PyTorch definition on any device; else the Triton kernels on CUDA
    (launch config: :func:`~wanquant.kernels.attention.env_config`), the reference on CPU.
    """
    raise NotImplementedError(f"wanquant::attention_int8 has no implementation for {q.device.type} tensors")


@attention_int8.register_fake
def _(q, k, v, scale, reference):
    torch._check(k.shape == v.shape, lambda: "k and v shapes differ")
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@attention_int8.register_kernel("cuda")
def _(q, k, v, scale, reference):
    if reference:
        return A.attention_int8_reference(q, k, v, scale=scale, layout="bshd").contiguous()
    ok, why = A.int8_attention_status(q.device)
    if not ok:
        raise RuntimeError(f"wanquant int8 attention cannot run: {why}")
    return A.attention_int8(q, k, v, scale=scale, layout="bshd", config=A.env_config())


@attention_int8.register_kernel("cpu")
def _(q, k, v, scale, reference):
    return A.attention_int8_reference(q, k, v, scale=scale, layout="bshd").contiguous()


# ---------------------------------------------------------------------------------------
# q/k RMS-norm + rotary
@torch.library.custom_op("wanquant::qk_norm_rope", mutates_args=())
def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, heads: int,
                 eps: float) -> tuple[Tensor, Tensor]:
    """``q, k [B, T, heads * D]`` -> RMS-normed, rotated ``[B, T, heads, D]`` (contiguous)."""
    raise NotImplementedError(f"wanquant::qk_norm_rope has no implementation for {q.device.type} tensors")


@qk_norm_rope.register_fake
def _(q, k, q_weight, k_weight, cos, sin, heads, eps):
    b, t, c = q.shape
    return q.new_empty(b, t, heads, c // heads), k.new_empty(b, t, heads, c // heads)


@qk_norm_rope.register_kernel("cuda")
def _(q, k, q_weight, k_weight, cos, sin, heads, eps):
    return _qk_norm_rope(q, k, q_weight, k_weight, cos, sin, heads, eps)


@qk_norm_rope.register_kernel("cpu")
def _(q, k, q_weight, k_weight, cos, sin, heads, eps):
    q, k = qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, heads, eps)
    return q.contiguous(), k.contiguous()


@torch.library.custom_op("wanquant::rope_attention_int8", mutates_args=())
def rope_attention_int8(q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                        sin: Tensor, heads: int, eps: float, reference: bool) -> Tensor:
    """Wan's self-attention core: ``q, k, v [B, T, heads * D]`` (the projections) -> q/k
    RMS-norm + rotary, then 8-bit attention, ``[B, T, heads, D]``: ``qk_norm_rope`` and
    ``attention_int8`` in one node, so the rotary kernel can hand the attention its INT8
    queries (:func:`~wanquant.kernels.attention.rope_attention_int8`). ``reference``: the
    PyTorch definitions of both (also what CPU runs)."""
    raise NotImplementedError(f"wanquant::rope_attention_int8 has no implementation for {q.device.type} tensors")


@rope_attention_int8.register_fake
def _(q, k, v, q_weight, k_weight, cos, sin, heads, eps, reference):
    torch._check(k.shape == q.shape and v.shape == q.shape, lambda: "q, k and v shapes differ")
    b, t, c = q.shape
    return q.new_empty(b, t, heads, c // heads)


def _rope_attention_reference(q, k, v, q_weight, k_weight, cos, sin, heads, eps):
    qr, kr = qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, heads, eps)
    vv = v.unflatten(2, (heads, -1))
    return A.attention_int8_reference(qr, kr, vv, layout="bshd").contiguous()


@rope_attention_int8.register_kernel("cuda")
def _(q, k, v, q_weight, k_weight, cos, sin, heads, eps, reference):
    if reference:
        return _rope_attention_reference(q, k, v, q_weight, k_weight, cos, sin, heads, eps)
    ok, why = A.int8_attention_status(q.device)
    if not ok:
        raise RuntimeError(f"wanquant int8 attention cannot run: {why}")
    return A.rope_attention_int8(q, k, v, q_weight, k_weight, cos, sin, heads, eps, config=A.env_config())


@rope_attention_int8.register_kernel("cpu")
def _(q, k, v, q_weight, k_weight, cos, sin, heads, eps, reference):
    return _rope_attention_reference(q, k, v, q_weight, k_weight, cos, sin, heads, eps)


# ---------------------------------------------------------------------------------------
# the block's residual + LayerNorm + modulation steps
@torch.library.custom_op("wanquant::norm_modulate", mutates_args=())
def norm_modulate(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> Tensor:
    """``LN(x) * (1 + scale) + shift`` in x's dtype (``x`` ``[B, T, C]``; ``scale``/``shift`` ``[B, 1, C]`` fp32)."""
    raise NotImplementedError(f"wanquant::norm_modulate has no implementation for {x.device.type} tensors")


@norm_modulate.register_fake
def _(x, scale, shift, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@norm_modulate.register_kernel("cuda")
def _(x, scale, shift, eps):
    return N.residual_norm(x.contiguous(), scale=scale, shift=shift, eps=eps)[1]


@norm_modulate.register_kernel("cpu")
def _(x, scale, shift, eps):
    return N.residual_norm_reference(x, scale=scale, shift=shift, eps=eps)[1].contiguous()


@torch.library.custom_op("wanquant::residual_norm", mutates_args=())
def residual_norm(x: Tensor, y: Tensor, gate: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                  scale: Optional[Tensor], shift: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """``x + y [* gate]`` (rounded to x's dtype) and its LayerNorm [``* w + b``] [``* (1 + scale) + shift``]."""
    raise NotImplementedError(f"wanquant::residual_norm has no implementation for {x.device.type} tensors")


@residual_norm.register_fake
def _(x, y, gate, weight, bias, scale, shift, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@residual_norm.register_kernel("cuda")
def _(x, y, gate, weight, bias, scale, shift, eps):
    return N.residual_norm(x.contiguous(), y.contiguous(), gate, weight, bias, scale, shift, eps)


@residual_norm.register_kernel("cpu")
def _(x, y, gate, weight, bias, scale, shift, eps):
    x_new, n = N.residual_norm_reference(x, y, gate, weight, bias, scale, shift, eps)
    return x_new.contiguous(), n.contiguous()


__all__ = ["attention_int8", "launch_key", "norm_modulate", "qk_norm_rope", "residual_norm", "rope_attention_int8",
           "w4a4_linear", "w4a4_linear_gelu"]
