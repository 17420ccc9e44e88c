"""GPU runs of the fused q/k RMS-norm + rotary (``wanquant.kernels.rope``), skipped without
CUDA: the compiled kernel against the PyTorch reference at Wan's head layout (40 x 128),
on strided views of a fused q/k/v buffer. The caching allocator is filled with NaN first,
so an output element the kernel fails to write shows. Speed: benchmarks/prepass_speed.py."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from test_rope import case  # noqa: E402
from wanquant.kernels import rope as R  # noqa: E402

pytestmark = pytest.mark.gpu


def _poison_allocator(nbytes: int) -> None:
    torch.full((nbytes // 4,), float("nan"), device="cuda")  # freed at once: later empties reuse it


@pytest.mark.parametrize("kw", [dict(b=1, t=1000, heads=40, d=128), dict(b=2, t=333, heads=40, d=128),
                                dict(b=1, t=257, heads=40, d=128, table_dtype=torch.float64),
                                dict(b=1, t=100, heads=12, d=64, dtype=torch.float16)])
def test_kernel_matches_reference_on_gpu(kw):
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in case(**kw, seed=7)]
    want = R.qk_norm_rope_reference(*args, 1e-6)
    _poison_allocator(8 * want[0].numel() * 2)
    got = R.qk_norm_rope(*args, 1e-6)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        steps = R.pair_rounding_steps(g, w)  # the GPU's rsqrt and FMAs flip a few roundings
        assert steps.max() <= 2 and (steps > 0).float().mean() <= 1e-2


def test_offsets_past_2_31_elements():
    """Two 70,000-token rows of a fused q/k/v buffer: 2.15e9 elements, past int32 offsets."""
    b, t, heads, d = 2, 70_000, 40, 128
    c = heads * d
    g = torch.Generator(device="cuda").manual_seed(3)
    qkv = torch.randn(b, t, 3 * c, device="cuda", generator=g, dtype=torch.bfloat16)
    q, k = qkv[..., :c], qkv[..., c:2 * c]
    w = torch.rand(2, c, device="cuda", generator=g).add_(0.5).to(torch.bfloat16)
    angle = torch.arange(t, device="cuda", dtype=torch.float64)[:, None] * torch.rand(
        d // 2, device="cuda", dtype=torch.float64, generator=g).repeat_interleave(2)[None]
    cos, sin = angle.cos()[None, :, None].float(), angle.sin()[None, :, None].float()
    got = R.qk_norm_rope(q, k, w[0], w[1], cos, sin, heads, 1e-6)
    tail = slice(t - 64, t)  # the rows whose offsets pass 2^31; the op is row by row
    want = R.qk_norm_rope_reference(q[1:, tail], k[1:, tail], w[0], w[1], cos[:, tail], sin[:, tail], heads, 1e-6)
    for gt, wt in zip(got, want):
        assert R.pair_rounding_steps(gt[1:, tail], wt).max() <= 2


@pytest.mark.parametrize("kw", [dict(b=1, t=16421, heads=40, d=128), dict(b=2, t=1000, heads=40, d=128),
                                dict(b=1, t=333, heads=12, d=64)])
def test_fused_rope_attention_is_rope_then_attention_on_gpu(kw):
    """The rotary kernel's INT8 queries give the unfused path's output bit for bit: the
    default config (Gluon kernel at head dim 128, Triton elsewhere), NaN-poisoned memory."""
    from wanquant.kernels import attention as A

    q, k, wq, wk, cos, sin, heads = (a.cuda() if isinstance(a, torch.Tensor) else a for a in case(**kw, seed=3))
    v = torch.randn(q.shape, device="cuda").to(q.dtype)
    qr, kr = R.qk_norm_rope(q, k, wq, wk, cos, sin, heads, 1e-6)
    want = A.attention_int8(qr, kr, v.unflatten(2, (heads, -1)))
    _poison_allocator(8 * want.numel() * 2)
    got = A.rope_attention_int8(q, k, v, wq, wk, cos, sin, heads, 1e-6)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    assert torch.equal(got, want), _mismatch(got, want)


def _mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    """Which elements differ and by how much (the first failure, 2026-12-07, said neither)."""
    diff = got.float() != want.float()
    idx = diff.nonzero()
    gap = (got.float() - want.float()).abs()
    return (f"{int(diff.sum())} of {diff.numel()} elements differ (max {gap.max().item():.3g}, "
            f"median of the differing {gap[diff].median().item():.3g}); first at {idx[:5].tolist()}")


@pytest.mark.parametrize("kw", [dict(b=1, t=16421, heads=40, d=128), dict(b=2, t=1000, heads=40, d=128)])
def test_int8_queries_are_the_q_prepass_of_the_rotated_queries_on_gpu(kw):
    """The rotary kernel's INT8 queries and scales are the attention's Q pre-pass of the plain
    kernel's rotated queries, bit for bit, on the GPU (the interpreter test shows it without
    FMA contraction). Localises the fused path's GPU mismatch of 2026-12-07: if this passes,
    the attention kernel is what differs between two runs on the same INT8 queries."""
    from wanquant.kernels import attention as A
    from wanquant.kernels.attention_config import query_scale_factor

    q, k, wq, wk, cos, sin, heads = (a.cuda() if isinstance(a, torch.Tensor) else a for a in case(**kw, seed=3))
    qr, kr = R.qk_norm_rope(q, k, wq, wk, cos, sin, heads, 1e-6)
    t, d = qr.shape[1], qr.shape[3]
    s_pad = A.padded_queries(t, A.config_for(A.DEFAULT_CONFIG, d, True, True))
    want8, wants = A.quantize_q(qr, s_pad)
    _poison_allocator(8 * want8.numel())
    q8, qs, k2 = R.qk_norm_rope_int8_q(q, k, wq, wk, cos, sin, heads, 1e-6, query_scale_factor(d, None),
                                       s_pad)
    torch.cuda.synchronize()
    assert torch.equal(k2, kr), _mismatch(k2, kr)
    assert torch.equal(qs, wants), _mismatch(qs, wants)
    assert torch.equal(q8, want8), _mismatch(q8, want8)
