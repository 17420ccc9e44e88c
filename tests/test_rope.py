"""Wan's q/k RMS-norm + rotary in one kernel (``wanquant.kernels.rope``) and the processor
that runs it (``wanquant.model.processor``).

The PyTorch reference against float64 math; the Triton kernel against the reference in
the interpreter (child process, as in test_attention.py), on strided views of a fused
q/k/v buffer; the custom op's registration; the processor against diffusers' stock one.
GPU runs: tests/test_rope_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import INTERPRETING, interp, run_interpreter_suite
from wanquant.kernels import rope as R

not_interp = pytest.mark.skipif(INTERPRETING, reason="runs in the parent process")


def case(b=2, t=7, heads=5, d=16, dtype=torch.bfloat16, table_batch=1, seed=0, table_dtype=torch.float32):
    """q, k as chunks of one ``[B, T, 3 C]`` buffer; norm weights; diffusers-style rotary tables."""
    g = torch.Generator().manual_seed(seed)
    c = heads * d
    qkv = (torch.randn(b, t, 3 * c, generator=g) * 3).to(dtype)
    q, k, _ = qkv.chunk(3, dim=-1)
    wq, wk = (torch.rand(2, c, generator=g) + 0.5).to(dtype).unbind(0)
    freqs = torch.rand(d // 2, generator=g, dtype=torch.float64).repeat_interleave(2)  # cos[2i] == cos[2i+1]
    angle = torch.arange(t, dtype=torch.float64)[:, None] * freqs[None] + torch.rand(table_batch, 1, 1, generator=g,
                                                                                      dtype=torch.float64)
    return q, k, wq, wk, angle.cos()[:, :, None].to(table_dtype), angle.sin()[:, :, None].to(table_dtype), heads


def fp64_definition(x, w, cos, sin, heads, eps):
    """RMS-norm and rotary in float64 from the same inputs (no intermediate rounding)."""
    x = x.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    y = y.unflatten(-1, (heads, -1))
    y1, y2 = y[..., 0::2], y[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([y1 * c - y2 * s, y1 * s + y2 * c], dim=-1).flatten(-2)


ulp_steps = R.rounding_steps


@not_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_is_the_exact_math_within_its_roundings(dtype):
    q, k, wq, wk, cos, sin, heads = case(dtype=dtype, table_batch=2)
    got_q, got_k = R.qk_norm_rope_reference(q, k, wq, wk, cos, sin, heads, 1e-6)
    assert got_q.shape == (2, 7, 5, 16) and got_q.dtype == dtype
    ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
    for got, x, w in ((got_q, q, wq), (got_k, k, wk)):
        want = fp64_definition(x, w, cos, sin, heads, 1e-6)
        # two roundings (after the norm, after the rotary), each half an ulp, and the
        # rotary's sum of two rounded products: within 2 ulps of the largest term
        bound = 2 * ulp * (want.abs() + 2 * x.double().abs().max() / x.double().pow(2).mean().sqrt() * w.max())
        assert ((got.double() - want).abs() <= bound).all()
        assert (got.double() - want).abs().max() > 0  # it does round


@interp
@pytest.mark.parametrize("kw", [dict(), dict(b=1, t=3, heads=4, d=128, dtype=torch.float16),
                                dict(b=2, t=5, heads=3, d=32, table_batch=2), dict(b=1, t=9, heads=8, d=8),
                                dict(table_dtype=torch.float64)])
def test_kernel_matches_reference(kw):
    q, k, wq, wk, cos, sin, heads = case(**kw)
    assert not q.is_contiguous()
    want = R.qk_norm_rope_reference(q, k, wq, wk, cos, sin, heads, 1e-6)
    got = R.qk_norm_rope(q, k, wq, wk, cos, sin, heads, 1e-6)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
        # the mean square is summed in another order: rarely, one rounding step apart
        steps = ulp_steps(g, w)
        assert steps.max() <= 1 and (steps > 0).float().mean() <= 0.01


@interp
@pytest.mark.parametrize("kw", [dict(), dict(b=1, t=3, heads=4, d=128, dtype=torch.float16),
                                dict(b=2, t=5, heads=3, d=32, table_batch=2), dict(table_dtype=torch.float64)])
def test_kernel_writes_the_attentions_int8_queries(kw):
    """``qk_norm_rope_int8_q``: the queries come out as the 8-bit attention's Q pre-pass would
    make them of the kernel's own rotated queries (bit for bit), padded rows zero; the keys
    are the plain kernel's."""
    from wanquant.kernels.attention_config import query_scale_factor
    from wanquant.kernels.attention_reference import quantize_q_reference

    q, k, wq, wk, cos, sin, heads = case(**kw)
    rq, rk = R.qk_norm_rope(q, k, wq, wk, cos, sin, heads, 1e-6)
    b, t, h, d = rq.shape
    s_pad = t + 6
    qk_c = query_scale_factor(d, None)
    q8, qs, k2 = R.qk_norm_rope_int8_q(q, k, wq, wk, cos, sin, heads, 1e-6, qk_c, s_pad)
    want8, wants = quantize_q_reference(rq)
    assert q8.shape == (b * h, s_pad, d) and q8.dtype == torch.int8 and qs.shape == (b * h, s_pad)
    assert torch.equal(q8[:, :t], want8) and torch.equal(qs[:, :t], wants)
    assert not q8[:, t:].any() and not qs[:, t:].any()
    assert torch.equal(k2, rk)
    assert (want8.abs() == 127).any() and want8.float().std() > 20  # a real spread of codes


@interp
@pytest.mark.parametrize("kw", [dict(b=1, t=70, heads=2, d=32), dict(b=2, t=33, heads=1, d=64, table_batch=2)])
def test_fused_rope_attention_is_rope_then_attention(kw):
    """``rope_attention_int8`` (INT8 Q written by the rotary kernel) gives the output of the
    rotary kernel followed by the 8-bit attention, bit for bit (the default config's Q
    pre-pass path, and the Triton kernel, as on every GPU without Gluon)."""
    from wanquant.kernels import attention as A

    q, k, wq, wk, cos, sin, heads = case(**kw)
    v = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.dtype)
    assert A.DEFAULT_CONFIG.q_prepass
    got = A.rope_attention_int8(q, k, v, wq, wk, cos, sin, heads, 1e-6)
    qr, kr = R.qk_norm_rope(q, k, wq, wk, cos, sin, heads, 1e-6)
    want = A.attention_int8(qr, kr, v.unflatten(2, (heads, -1)))
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert torch.equal(got, want)


def test_interpreter_suite():
    run_interpreter_suite(__file__)


@not_interp
def test_bad_inputs_name_the_problem():
    q, k, wq, wk, cos, sin, heads = case()
    with pytest.raises(ValueError, match="one shape"):
        R.qk_norm_rope_reference(q, k[:, :3], wq, wk, cos, sin, heads, 1e-6)
    with pytest.raises(ValueError, match="even head_dim"):
        R.qk_norm_rope_reference(q, k, wq, wk, cos, sin, 7, 1e-6)
    with pytest.raises(ValueError, match="q_weight must have shape"):
        R.qk_norm_rope_reference(q, k, wq[:-1], wk, cos, sin, heads, 1e-6)
    with pytest.raises(ValueError, match="cos must be"):
        R.qk_norm_rope_reference(q, k, wq, wk, cos[:, :-1], sin, heads, 1e-6)
    if R.HAS_TRITON:
        with pytest.raises(ValueError, match="float64"):
            R.qk_norm_rope(q, k, wq, wk, cos.bfloat16(), sin.bfloat16(), heads, 1e-6)
        with pytest.raises(ValueError, match="bfloat16 or float16"):
            R.qk_norm_rope(q.float(), k.float(), wq, wk, cos, sin, heads, 1e-6)


@not_interp
def test_custom_op_registration():
    from wanquant.kernels import ops

    q, k, wq, wk, cos, sin, heads = case()
    torch.library.opcheck(ops.qk_norm_rope, (q, k, wq, wk, cos, sin, heads, 1e-6))
    got = ops.qk_norm_rope(q, k, wq, wk, cos, sin, heads, 1e-6)
    want = R.qk_norm_rope_reference(q, k, wq, wk, cos, sin, heads, 1e-6)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@not_interp
def test_fused_attention_op_registration():
    from wanquant.kernels import attention as A
    from wanquant.kernels import ops

    q, k, wq, wk, cos, sin, heads = case(t=20, heads=2, d=32)
    v = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(q.dtype)
    torch.library.opcheck(ops.rope_attention_int8, (q, k, v, wq, wk, cos, sin, heads, 1e-6, True))
    got = ops.rope_attention_int8(q, k, v, wq, wk, cos, sin, heads, 1e-6, False)  # CPU: the references
    qr, kr = R.qk_norm_rope_reference(q, k, wq, wk, cos, sin, heads, 1e-6)
    assert torch.equal(got, A.attention_int8_reference(qr, kr, v.unflatten(2, (heads, -1))))


def _bf16_transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, rope_max_seq_len=64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "scale_shift" in name:
                p.add_(torch.randn_like(p) * 0.3)
    keep = model._keep_in_fp32_modules  # as from_pretrained(torch_dtype=bf16) loads it; buffers keep their dtype
    for name, p in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            p.data = p.data.to(torch.bfloat16)
    assert model.rope.freqs_cos.dtype == torch.float32
    return model


def _forward(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 8, 12, generator=g).to(torch.bfloat16)
    ctx = torch.randn(1, 7, 32, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=ctx,
                     return_dict=False)[0]


@not_interp
def test_processor_swaps_in_with_int8_and_computes_what_stock_does(monkeypatch):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from wanquant.kernels import ops
    from wanquant.model import attention as MA
    from wanquant.model.processor import FusedRopeAttnProcessor

    model = _bf16_transformer()
    MA.set_self_attention(model, "int8_reference")
    want = _forward(model)  # stock processor? no: set above; compare with the stock class below
    assert all(type(b.attn1.processor) is FusedRopeAttnProcessor for b in model.blocks)
    assert all(type(b.attn2.processor) is WanAttnProcessor for b in model.blocks)  # cross-attention untouched
    calls = []
    for name in ("qk_norm_rope", "rope_attention_int8"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    fused = _forward(model)
    assert calls == ["qk_norm_rope"] * 2  # one per block
    calls.clear()
    MA.set_query_fusion(model, True)
    assert torch.equal(_forward(model), fused)  # the same numbers
    assert calls == ["rope_attention_int8"] * 2  # the rotary hands the attention its INT8 queries
    MA.set_query_fusion(model, False)
    for b in model.blocks:  # the stock class with the same backend: the same numbers (the CPU op is diffusers' math)
        backend = b.attn1.processor._attention_backend
        b.attn1.set_processor(WanAttnProcessor())
        b.attn1.processor._attention_backend = backend
    assert torch.equal(_forward(model), fused) and torch.equal(want, fused)
    MA.set_self_attention(model, "int8_reference")
    MA.set_self_attention(model, "sdpa")
    assert all(type(b.attn1.processor) is WanAttnProcessor for b in model.blocks)
    assert MA.self_attention_mode(model) == "sdpa"


@not_interp
def test_processor_compiles_without_graph_breaks():
    from wanquant.model import attention as MA

    model = _bf16_transformer()
    MA.set_self_attention(model, "int8_reference")
    eager = _forward(model)
    block = model.blocks[0]
    counts = torch._dynamo.utils.counters
    counts.clear()
    block.forward = torch.compile(block.forward, fullgraph=True)
    try:
        compiled = _forward(model)
    finally:
        del block.forward
    assert torch.isfinite(compiled).all()
    assert (compiled.float() - eager.float()).norm() <= 0.05 * eager.float().norm()


def test_pair_steps_bound_a_flipped_rounding_through_the_rotation():
    """One rounding step of a normalised value, rotated by any angle, stays <= 2 pair steps
    (its own step at the pair's length, plus the outputs' rounding), while a plain per-element
    metric counts it as many steps where a coordinate cancels."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    y = (torch.randn(4096, 2, generator=g, dtype=torch.float64) * 2).to(torch.bfloat16)
    y2 = y.clone()
    y2[:, 0] = torch.nextafter(y[:, 0], torch.full_like(y[:, 0], float("inf")))  # one bf16 step up
    angle = torch.rand(4096, generator=g, dtype=torch.float64) * 6.3
    c, s = angle.cos(), angle.sin()

    def rotate(v):
        v = v.double()
        return torch.stack([v[:, 0] * c - v[:, 1] * s, v[:, 0] * s + v[:, 1] * c], -1).to(torch.bfloat16)

    a, b = rotate(y), rotate(y2)
    steps = R.pair_rounding_steps(a.view(1, -1), b.view(1, -1))
    assert steps.max() <= 2 and steps.max() >= 1
    assert R.rounding_steps(a, b).max() > 2  # cancellation: the per-element metric would call it far
    assert R.pair_rounding_steps(a.view(1, -1), a.view(1, -1)).max() == 0
