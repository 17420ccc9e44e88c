"""GPU tests of the Hopper W4A4 kernels at Wan shapes (skipped without CUDA).

Every kernel output is poisoned (NaN) first and compared with its reference:
bit-exact e4m3 values, exponents and row scales; GEMMs against fp64 on the same operands;
the whole layer against the fp64 reference forward.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from wanquant.kernels import act_quant as A  # noqa: E402
from wanquant.kernels.act_quant import row_absmax_reference  # noqa: E402
from wanquant.kernels import dispatch as D  # noqa: E402
from wanquant.kernels import gemm as G  # noqa: E402
from wanquant.kernels import weight_prep as W  # noqa: E402
from wanquant.formats import MXFP4, Quantized, pack_nibbles, unpack_nibbles  # noqa: E402
from wanquant.method.params import QuantizedLinearParams  # noqa: E402

CUDA = torch.device("cuda")
FP8_OK = torch.cuda.get_device_capability() >= (8, 9)
needs_fp8 = pytest.mark.skipif(not FP8_OK, reason="needs FP8 tensor cores (sm_89+)")


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    """bf16 activations (CPU) with outlier channels, a deep group (lossy) and a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(k, generator=g) * 0.7)
    x[:, torch.randint(0, k, (k // 64,), generator=g)] *= 30.0
    if m > 3:
        x[1, 64:96] *= 2.0**-18
        x[2] = 0.0
    return x.to(torch.bfloat16)


@functools.lru_cache(maxsize=8)
def _params(n: int, k: int, r: int, seed: int) -> QuantizedLinearParams:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g) * 0.5) * 0.02
    w[0, 32:64] *= 2.0**-20  # a lossy group (more than 14 binades below its row maximum)
    q = MXFP4.quantize(w)
    return QuantizedLinearParams(
        pack_nibbles(q.codes), q.scales, torch.rand(k, generator=g) * 1.5 + 0.5,
        (torch.randn(r, k, generator=g) * 0.02).to(torch.bfloat16),
        (torch.randn(n, r, generator=g) * 0.02).to(torch.bfloat16),
        (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16),
        torch.tensor([[1.0, 0.0], [0.7, -1.0], [0.9, 1.0]]),
    )


@pytest.mark.parametrize("m", [1, 77, 1000])
@pytest.mark.parametrize("k", [5120, 13824])
@pytest.mark.parametrize("rule,clip,off,bm,bk", [("ocp_floor", 1.0, 0, 64, 128), ("safe_ceil", 0.7, -1, 32, 256)])
@pytest.mark.parametrize("given_amax", [False, True])
def test_act_kernel_bit_exact(m, k, rule, clip, off, bm, bk, given_amax):
    x = _x(m, k, seed=m + k)
    inv = 1.0 / (torch.rand(k, generator=torch.Generator().manual_seed(k)) * 1.5 + 0.5)
    r = 32
    l1 = (torch.randn(r, k, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    l1s = A.lowrank_weights(l1, inv)
    m_pad = A.pad_rows(m)
    out = A.ActQuantOut(
        torch.full((m_pad, k), 0x7F, dtype=torch.uint8, device=CUDA).view(torch.float8_e4m3fn),
        torch.full((m_pad,), float("nan"), device=CUDA),
        torch.full((m_pad, 2 * r), float("nan"), dtype=torch.bfloat16, device=CUDA),
        torch.full((m_pad, k // 32), 127, dtype=torch.int8, device=CUDA),
    )
    amax = A.row_absmax_reference(x.to(CUDA), inv.to(CUDA)) if given_amax else None  # one pass over x
    got = A.act_quant(x.to(CUDA), inv.to(CUDA), l1s.to(CUDA), clip, off, rule, write_exps=True,
                      block_m=bm, block_k=bk, out=out, row_amax=amax)
    torch.cuda.synchronize()
    ref = A.act_quant_reference(x, inv, l1s, clip, off, rule)
    # Equal e4m3 values (so equal codes and exponents). The one allowed difference is the
    # sign of zero: the GPU's cast keeps the sign of a lossy value that underflows to 0.
    assert torch.equal(got.q.float().cpu(), ref.q.float())
    assert not torch.isnan(got.q.float()).any()
    assert torch.equal(got.exps.cpu(), ref.exps)
    assert torch.equal(got.row_scale.cpu(), ref.row_scale)
    lr = got.lowrank.double().cpu()
    want = ref.lowrank.double()
    assert not torch.isnan(lr).any()
    rel = ((lr[:, :r] + lr[:, r:]) - (want[:, :r] + want[:, r:])).norm() / want[:, :r].norm().clamp_min(1e-30)
    assert rel < 1e-4, rel  # tensor-core fp32 accumulation (measured ~2e-5)


@pytest.mark.parametrize("m", [77, 1000])
def test_act_kernel_with_gelu_input(m):
    """The FFN's GELU applied on load: against the reference on torch's CUDA GELU output,
    almost every e4m3 value equal (the two GELU forms round a few bf16 values apart)."""
    k, r = 13824, 32
    g = torch.Generator().manual_seed(m)
    y = (torch.randn(m, k, generator=g) * 2).to(torch.bfloat16)
    inv = 1.0 / (torch.rand(k, generator=g) * 1.5 + 0.5)
    l1s = A.lowrank_weights((torch.randn(r, k, generator=g) * 0.02).to(torch.bfloat16), inv)
    m_pad = A.pad_rows(m)
    out = A.ActQuantOut(
        torch.full((m_pad, k), 0x7F, dtype=torch.uint8, device=CUDA).view(torch.float8_e4m3fn),
        torch.full((m_pad,), float("nan"), device=CUDA),
        torch.full((m_pad, 2 * r), float("nan"), dtype=torch.bfloat16, device=CUDA), None)
    got = A.act_quant(y.to(CUDA), inv.to(CUDA), l1s.to(CUDA), 0.9, 0, out=out, gelu_input=True)
    x = torch.nn.functional.gelu(y.to(CUDA), approximate="tanh").cpu()
    ref = A.act_quant_reference(x, inv, l1s, 0.9, 0)
    assert not torch.isnan(got.q.float()).any() and not torch.isnan(got.lowrank.float()).any()
    assert (got.q.view(torch.uint8).cpu() == ref.q.view(torch.uint8)).float().mean() >= 0.999
    assert (got.row_scale.cpu() == ref.row_scale).float().mean() >= 0.99


@pytest.mark.parametrize("n,k", [(512, 13824), (15360, 5120)])
def test_expand_kernel_bit_exact(n, k):
    p = _params(n, k, 1, seed=n)
    s_w = W.weight_row_exponents(p.wscales)
    out = torch.full((n, k), 0x7F, dtype=torch.uint8, device=CUDA).view(torch.float8_e4m3fn)
    W.expand_weight(p.qweight.to(CUDA), p.wscales.to(CUDA), s_w.to(CUDA), out=out)
    ref = W.expand_weight_reference(p.qweight, p.wscales, s_w)
    assert torch.equal(out.float().cpu(), ref.float())  # as above: +-0 may differ in lossy groups
    assert not torch.isnan(out.float()).any()
    lossy = out[0, 32:64].float().cpu()
    assert (lossy == 0).all()  # 20 binades below the row maximum: below e4m3's range


def _layer_ref64(x: torch.Tensor, p: QuantizedLinearParams, clip: float, off: int) -> torch.Tensor:
    """The reference forward on the GPU: fp32 quantization math, fp64 products."""
    x, smooth = x.to(CUDA), p.smooth.to(CUDA)
    xs = x.float() * (1.0 / smooth)
    xq = MXFP4.fake_quantize(xs, clip, off).double()
    w = MXFP4.dequantize(Quantized(unpack_nibbles(p.qweight.to(CUDA)), p.wscales.to(CUDA))).double()
    l1, l2, bias = p.l1.to(CUDA).double(), p.l2.to(CUDA).double(), p.bias.to(CUDA).double()
    return xq @ w.T + (xs.double() @ l1.T) @ l2.T + bias


GEMM_CONFIGS = [
    G.GemmConfig(),
    G.GemmConfig(split_epilogue=False),
    G.GemmConfig(block_k=64, num_stages=4, group_m=16),
]


@needs_fp8
@pytest.mark.parametrize("cfg", GEMM_CONFIGS, ids=lambda c: c.describe())
@pytest.mark.parametrize("m,k,n", [(77, 5120, 15360), (1000, 13824, 5120), (1, 5120, 5120)])
def test_triton_gemm_vs_fp64(cfg, m, k, n):
    p = _params(n, k, 32, seed=k)
    fast = D.FastW4A4.prepare(p, MXFP4, CUDA, backend="triton", gemm_config=cfg)
    aq = fast.quantize_input(_x(m, k, seed=3).to(CUDA), 0.9, 0)
    w8 = fast.expand_weight()
    ref = G.gemm_reference(aq.q, aq.row_scale, w8, fast.w_row_scale, aq.lowrank, fast.l2cat, fast.bias,
                           l2_scaled=True)
    out32 = torch.full((aq.q.shape[0], n), float("nan"), device=CUDA)
    G.gemm_triton(aq.q, aq.row_scale, w8, fast.w_row_scale, aq.lowrank, fast.l2cat, fast.bias, out=out32, config=cfg)
    out16 = torch.full((aq.q.shape[0], n), float("nan"), dtype=torch.bfloat16, device=CUDA)
    fast.gemm(aq, w8, out=out16)
    torch.cuda.synchronize()
    assert not torch.isnan(out32).any() and not torch.isnan(out16).any()
    rel32 = ((out32.double() - ref).norm() / ref.norm()).item()
    print(f"\n[fp8 gemm {cfg.describe()} M={m} K={k} N={n}] rel err before bf16 rounding: {rel32:.3e}")
    # Hopper's fast FP8 accumulation (what cuBLAS calls use_fast_accum) adds each MMA
    # chunk with reduced alignment precision; measured well under bf16's 2^-9.
    assert rel32 < 1e-3, rel32
    err16 = (out16.double() - ref).abs()
    assert (err16 <= 2.0**-8 * ref.abs() + 8 * rel32 * ref.abs().max()).all()


@needs_fp8
@pytest.mark.parametrize("m,k,n", [(77, 5120, 13824), (1000, 5120, 13824)])
def test_triton_gemm_gelu_epilogue(m, k, n):
    """GeluRowMax on the GPU: the stored GELU is an accurate fp32 GELU of the plain GEMM's
    bf16 output rounded to bf16, and the row maxima are exactly those of what was stored
    (what the next layer's one-pass activation kernel relies on)."""
    p = _params(n, k, 32, seed=m)
    fast = D.FastW4A4.prepare(p, MXFP4, CUDA, backend="triton")
    aq = fast.quantize_input((_x(m, k, seed=5) * 3).to(CUDA), 0.9, 0)
    w8 = fast.expand_weight()
    mp = aq.q.shape[0]
    plain = torch.full((mp, n), float("nan"), dtype=torch.bfloat16, device=CUDA)
    fast.gemm(aq, w8, out=plain)
    ism = (1.0 / (torch.rand(n, generator=torch.Generator().manual_seed(m)) + 0.5)).to(CUDA)
    g = torch.full((mp, n), float("nan"), dtype=torch.bfloat16, device=CUDA)
    amax = torch.zeros(mp, device=CUDA)
    G.gemm_triton(aq.q, aq.row_scale, w8, fast.w_row_scale, aq.lowrank, fast.l2cat, fast.bias, out=g,
                  config=fast.gemm_config, lr_chunks=fast.lr_chunks, gelu_rowmax=G.GeluRowMax(ism, amax))
    torch.cuda.synchronize()
    assert not torch.isnan(g).any()
    h = plain.double()
    assert (h < -3).any() and (h > 1).any()
    want = h / (1 + torch.exp(-2 * math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    # bf16 rounding of an accurate fp32 value; below about 2^-100 anything (the approximate
    # division flushes reciprocals under 2^-126, so values near 1e-37 come out as 0)
    bad = (g.double() - want).abs() > 2.0**-8 * want.abs() + 2.0**-100
    assert not bad.any(), (h[bad][:8].tolist(), g[bad][:8].tolist(), want[bad][:8].tolist())
    torch_g, torch_amax = G.gelu_rowmax_reference(plain, ism)
    print(f"\n[gelu epilogue M={m}] bf16 values differing from torch's GELU: {(g != torch_g).float().mean():.2%}")
    assert (g != torch_g).float().mean() < 0.05
    assert torch.equal(amax, row_absmax_reference(g, ism))


@needs_fp8
@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("m,k,n", [(1, 5120, 15360), (77, 13824, 5120), (1000, 5120, 13824)])
def test_fast_layer_vs_reference(backend, m, k, n):
    p = _params(n, k, 32, seed=m + n)
    fast = D.FastW4A4.prepare(p, MXFP4, CUDA, backend=backend)
    x = _x(m, k, seed=m)
    for clip, off in p.clip_table.tolist():
        y = fast(x.to(CUDA).view(1, m, k), clip, int(off))
        torch.cuda.synchronize()
        assert y.shape == (1, m, n) and y.dtype == torch.bfloat16 and not torch.isnan(y).any()
        want = _layer_ref64(x, p, clip, int(off))
        rel = ((y[0].double() - want).norm() / want.norm()).item()
        assert rel < 4e-3, rel  # bf16 output rounding dominates (~1.5e-3)
    assert fast.memory_bytes() < n * k  # less than even an FP8 copy of the weight


def test_fast_path_status_on_this_gpu():
    ok, why = D.fast_path_status(CUDA, MXFP4, MXFP4)
    assert ok == FP8_OK, why
