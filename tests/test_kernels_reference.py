"""CPU tests of the Hopper W4A4 kernels: reference math, and the Triton kernels themselves
run by Triton's CPU interpreter (``TRITON_INTERPRET=1``) at small sizes.

The GPU versions of these checks (full Wan shapes, cuBLAS) live in test_kernels_gpu.py.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from conftest import INTERPRETING, interp, run_interpreter_suite

from wanquant.formats import INT4, MXFP4, MXFP4Format, Quantized, pack_nibbles, unpack_nibbles
from wanquant.method.params import QuantizedLinearParams


if INTERPRETING:
    pytest.importorskip("triton")

_MODULES = ("act_quant", "weight_prep", "gemm", "dispatch")


@pytest.fixture(scope="module")
def K():
    """The kernel modules (act_quant, weight_prep, gemm, dispatch) as attributes."""
    pytest.importorskip("triton")
    return type("Kernels", (), {n: importlib.import_module(f"wanquant.kernels.{n}") for n in _MODULES})


def test_interpreter_suite():
    """This file's interpreter tests, in a child process with TRITON_INTERPRET=1."""
    run_interpreter_suite(__file__)


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    """bf16 activations with outlier channels, a lossless-only-with-headroom group, a lossy
    group, a near-zero group and an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(k, generator=g))
    x[:, torch.randint(0, k, (max(1, k // 64),), generator=g)] *= 40.0  # outlier channels
    if m >= 4 and k >= 128:
        x[1] = torch.randn(k, generator=g)  # no outliers in row 1, and one group ...
        x[1, 32:64] *= 2.0**-10  # ... ~10 binades down: exact only thanks to HEADROOM
        x[2, 64:96] *= 2.0**-17  # more than 14 below: keeps only its part above 2^-9 (lossy)
        x[3, 0:32] *= 2.0**-40  # far below: all zeros in e4m3
    if m >= 5:
        x[4] = 0.0
    return x.to(torch.bfloat16)


def _poisoned_act_out(K, m_pad: int, k: int, width: int):
    """Output buffers filled with NaN (0x7F is NaN in e4m3fn; 127 is an impossible exponent)."""
    return K.act_quant.ActQuantOut(
        torch.full((m_pad, k), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn),
        torch.full((m_pad,), float("nan")),
        torch.full((m_pad, width), float("nan"), dtype=torch.bfloat16) if width else None,
        torch.full((m_pad, k // 32), 127, dtype=torch.int8),
    )


# ---------------------------------------------------------------------------------
# Reference math (no Triton involved)
# ---------------------------------------------------------------------------------
def test_fp8_rows_reproduce_mx_values_exactly(K):
    """e4m3 value * 2^s == the MXFP4 fake-quantized value for every group within 14
    binades of the row max; further down, the e4m3 round-to-nearest-even of it."""
    x = _activations(9, 256, seed=1)
    inv = 1.0 / (torch.rand(256, generator=torch.Generator().manual_seed(2)) + 0.5)
    for rule in ("ocp_floor", "safe_ceil"):
        for clip, off in ((1.0, 0), (0.7, -1), (0.9, 1)):
            ref = K.act_quant.act_quant_reference(x, inv, None, clip, off, rule, m_pad=9)
            xs = x.float() * inv
            fq = MXFP4Format(32, rule).fake_quantize(xs, clip, off).double()
            s = torch.log2(ref.row_scale.double()).round()
            got = ref.q.double() * torch.exp2(s)[:, None]
            e = ref.exps.double()
            d = (e - s[:, None]).repeat_interleave(32, dim=1)
            exact = d >= -8
            assert torch.equal(got[exact], fq[exact])
            lossy = ~exact
            assert lossy.any(), "the test data must contain a lossy group"
            want = (fq * torch.exp2(-s)[:, None]).to(torch.float8_e4m3fn).double() * torch.exp2(s)[:, None]
            assert torch.equal(got[lossy], want[lossy])
            # the headroom keeps row 1's low group exact (it would be lossy with HEADROOM=0)
            assert (d[1, 32:64] < -2).all() and exact[1, 32:64].all(), d[1, 32:64]


def test_row_exponent_is_max_group_exponent(K):
    x = _activations(6, 128, seed=3).float()
    q = MXFP4.quantize(x, 0.8, 1)
    e = q.scales.to(torch.int32) - 127
    s = K.act_quant.row_exponents_from_group_exponents(e)
    assert torch.equal(s, (e.amax(1) - K.act_quant.HEADROOM).clamp_min(K.act_quant.ROW_EXP_MIN))
    assert s[4] == K.act_quant.ROW_EXP_MIN  # the all-zero row


def test_weight_reference_matches_dequantize(K):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 128, generator=g) * torch.exp(torch.randn(24, 1, generator=g))
    w[0, :32] *= 2.0**-20  # lossy group
    q = MXFP4.quantize(w)
    qw = pack_nibbles(q.codes)
    s_w = K.weight_prep.weight_row_exponents(q.scales)
    w8 = K.weight_prep.expand_weight_reference(qw, q.scales, s_w)
    deq = MXFP4.dequantize(q).double()
    got = w8.double() * torch.exp2(s_w.double())[:, None]
    assert torch.equal(got[1:], deq[1:])
    assert torch.equal(got[0, 32:], deq[0, 32:])
    assert not torch.equal(got[0, :32], deq[0, :32])


def test_fp8_dot_equals_mxfp4_dot(K):
    """The FP8 GEMM on the repacked operands is the MXFP4 x MXFP4 GEMM (fp64, exact region)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(7, 256, generator=g) * 3).to(torch.bfloat16)
    w = torch.randn(12, 256, generator=g)
    inv = torch.ones(256)
    a = K.act_quant.act_quant_reference(x, inv, None, 0.9, 0, m_pad=7)
    q = MXFP4.quantize(w)
    s_w = K.weight_prep.weight_row_exponents(q.scales)
    w8 = K.weight_prep.expand_weight_reference(pack_nibbles(q.codes), q.scales, s_w)
    y = K.gemm.gemm_reference(a.q, a.row_scale, w8, torch.exp2(s_w.float()))
    want = MXFP4.fake_quantize(x.float(), 0.9, 0).double() @ MXFP4.dequantize(q).double().T
    assert torch.allclose(y, want, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------
# Triton kernels in the interpreter
# ---------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize(
    "m,k,r,rule,clip,off,bm,bk,programs",
    [
        (1, 64, 0, "ocp_floor", 1.0, 0, 16, 64, None),
        (5, 128, 8, "safe_ceil", 0.7, -1, 16, 64, None),
        (33, 160, 32, "ocp_floor", 0.9, 1, 32, 32, None),
        (50, 160, 16, "ocp_floor", 0.9, 1, 16, 32, 2),  # 4 row blocks, 2 programs: each loops twice
        (20, 256, 16, "ocp_floor", 0.6, 0, 64, 128, None),
        (2, 5120, 32, "ocp_floor", 1.0, 0, 16, 512, None),
    ],
)
def test_act_kernel_bit_exact(K, m, k, r, rule, clip, off, bm, bk, programs):
    x = _activations(m, k, seed=m * 1000 + k)
    g = torch.Generator().manual_seed(k)
    inv = 1.0 / (torch.rand(k, generator=g) * 2 + 0.25)
    l1 = (torch.randn(r, k, generator=g) * 0.05).to(torch.bfloat16) if r else None
    l1s = K.act_quant.lowrank_weights(l1, inv) if r else None
    r_pad = K.act_quant.padded_rank(r)
    m_pad = K.act_quant.pad_rows(m)
    out = _poisoned_act_out(K, m_pad, k, 2 * r_pad)
    got = K.act_quant.act_quant(x, inv, l1s, clip, off, rule, write_exps=True, block_m=bm, block_k=bk, out=out,
                                programs=programs)
    ref = K.act_quant.act_quant_reference(x, inv, l1s, clip, off, rule)
    assert torch.equal(got.q.view(torch.uint8), ref.q.view(torch.uint8))  # codes and exponents
    assert torch.equal(got.exps, ref.exps)
    assert torch.equal(got.row_scale, ref.row_scale)
    if r:
        assert not torch.isnan(got.lowrank).any()
        hi_lo = got.lowrank.double()[:, :r_pad] + got.lowrank.double()[:, r_pad:]
        want = ref.lowrank.double()[:, :r_pad] + ref.lowrank.double()[:, r_pad:]
        assert ((hi_lo - want).norm() / want.norm().clamp_min(1e-30)) < 1e-6
        # and against the layer's own formula, (x * (1/smooth)) @ L1^T in fp32: ~2^-17 apart
        direct = (x.float() * inv) @ l1.float().T
        assert ((hi_lo[:m, :r] - direct.double()).norm() / direct.norm()) < 2e-5


@interp
@pytest.mark.parametrize(
    "m,k,r,bm,bk,bk1,programs",
    [
        (5, 128, 8, 16, 64, None, None),
        (33, 160, 0, 32, 32, None, None),  # no low-rank branch
        (50, 160, 16, 16, 32, None, 2),  # grid-stride: each program loops over two row blocks
        (20, 256, 32, 16, 128, 32, None),  # a wide branch's shorter K step: the maxima are ignored
    ],
)
def test_act_kernel_with_given_row_maxima(K, m, k, r, bm, bk, bk1, programs):
    """One pass over x with its row maxima given (as Inductor computes them where x is
    written): the same codes, exponents and row scales as the reference, and the low-rank
    projection of the two-pass kernel."""
    x = _activations(m, k, seed=int(torch.randint(0, 2**30, ())))
    g = torch.Generator().manual_seed(k + r)
    inv = 1.0 / (torch.rand(k, generator=g) * 2 + 0.25)
    l1 = (torch.randn(r, k, generator=g) * 0.05).to(torch.bfloat16) if r else None
    l1s = K.act_quant.lowrank_weights(l1, inv) if r else None
    m_pad = K.act_quant.pad_rows(m)
    width = 2 * K.act_quant.padded_rank(r)
    amax = K.act_quant.row_absmax_reference(x, inv)
    kw = dict(write_exps=True, block_m=bm, block_k=bk, block_k_lr=bk1, programs=programs)
    got = K.act_quant.act_quant(x, inv, l1s, 0.9, 0, "ocp_floor", out=_poisoned_act_out(K, m_pad, k, width),
                                row_amax=amax, **kw)
    two_pass = K.act_quant.act_quant(x, inv, l1s, 0.9, 0, "ocp_floor", out=_poisoned_act_out(K, m_pad, k, width),
                                     **kw)
    ref = K.act_quant.act_quant_reference(x, inv, l1s, 0.9, 0, "ocp_floor")
    assert torch.equal(got.q.view(torch.uint8), ref.q.view(torch.uint8))
    assert torch.equal(got.exps, ref.exps)
    assert torch.equal(got.row_scale, ref.row_scale)
    if r:
        assert not torch.isnan(got.lowrank).any()
        assert torch.equal(got.lowrank, two_pass.lowrank)  # the same dots in the same K order


@interp
@pytest.mark.parametrize("m,k,r,bm,bk", [(5, 128, 8, 16, 64), (40, 256, 32, 32, 128), (3, 160, 0, 16, 32)])
def test_act_kernel_quantizes_the_gelu_of_its_input(K, m, k, r, bm, bk):
    """``gelu_input``: the kernel quantizes torch's tanh GELU of x (rounded to bf16) without
    it being written. Its GELU is the same function in another form, so a few of the bf16
    values may round the other way: compared with the reference on torch's GELU output,
    almost every code agrees and the low-rank projection agrees to fp32 accuracy."""
    y = (torch.randn(m, k, generator=torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))) * 2)
    y[:, :4] *= 8.0  # both tails: gelu -> 0 (negative) and -> x (positive)
    y = y.to(torch.bfloat16)
    g = torch.Generator().manual_seed(k)
    inv = 1.0 / (torch.rand(k, generator=g) * 2 + 0.25)
    l1 = (torch.randn(r, k, generator=g) * 0.05).to(torch.bfloat16) if r else None
    l1s = K.act_quant.lowrank_weights(l1, inv) if r else None
    m_pad = K.act_quant.pad_rows(m)
    width = 2 * K.act_quant.padded_rank(r)
    got = K.act_quant.act_quant(y, inv, l1s, 0.9, 0, "ocp_floor", out=_poisoned_act_out(K, m_pad, k, width),
                                write_exps=True, block_m=bm, block_k=bk, gelu_input=True)
    x = torch.nn.functional.gelu(y.float(), approximate="tanh").to(torch.bfloat16)
    ref = K.act_quant.act_quant_reference(x, inv, l1s, 0.9, 0, "ocp_floor")
    same = got.q.view(torch.uint8) == ref.q.view(torch.uint8)
    assert same.float().mean() >= 0.999 and not torch.isnan(got.q.float()).any()
    assert (got.row_scale == ref.row_scale).float().mean() >= 0.9
    if r:
        hi_lo = got.lowrank.double()[:, :width // 2] + got.lowrank.double()[:, width // 2:]
        want = ref.lowrank.double()[:, :width // 2] + ref.lowrank.double()[:, width // 2:]
        assert ((hi_lo - want).norm() / want.norm()) < 1e-3


def test_gelu_input_refuses_given_row_maxima(K):
    x = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="row_amax with gelu_input"):
        K.act_quant.act_quant(x, torch.ones(64), None, 1.0, 0, row_amax=torch.ones(4), gelu_input=True)


def test_given_row_maxima_must_be_float32_per_row(K):
    x = torch.randn(4, 64).to(torch.bfloat16)
    inv = torch.ones(64)
    with pytest.raises(ValueError, match="row_amax must be contiguous float32"):
        K.act_quant.act_quant(x, inv, None, 1.0, 0, row_amax=torch.ones(4, dtype=torch.float64))


@interp
@pytest.mark.parametrize("n,k", [(40, 64), (16, 512), (33, 96), (8, 13824)])
def test_expand_kernel_bit_exact(K, n, k):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    w[0, :32] *= 2.0**-20
    q = MXFP4.quantize(w)
    for qw in (pack_nibbles(q.codes), torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)):
        s_w = K.weight_prep.weight_row_exponents(q.scales)
        out = torch.full((n, k), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
        K.weight_prep.expand_weight(qw, q.scales, s_w, out=out)
        ref = K.weight_prep.expand_weight_reference(qw, q.scales, s_w)
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


def _gemm_operands(K, m, n, k, r, seed):
    g = torch.Generator().manual_seed(seed)
    x = _activations(m, k, seed)
    inv = 1.0 / (torch.rand(k, generator=g) + 0.5)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g) * 0.5)
    q = MXFP4.quantize(w)
    l1 = (torch.randn(r, k, generator=g) * 0.05).to(torch.bfloat16)
    l2 = (torch.randn(n, r, generator=g) * 0.05).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    params = QuantizedLinearParams(pack_nibbles(q.codes), q.scales, 1.0 / inv, l1, l2, bias,
                                   torch.tensor([[1.0, 0.0], [0.8, -1.0]]))
    return x, params


def _small_gemm(K, seed: int, split: bool):
    """``(fast layer, its quantized input, e4m3 weight, a small tile config, N)`` of a 37x128 -> 48 layer."""
    n = 48
    x, p = _gemm_operands(K, 37, n, 128, 8, seed=seed)
    fast = K.dispatch.FastW4A4.prepare(p, MXFP4, "cpu", backend="triton")
    cfg = K.gemm.GemmConfig(block_m=32, block_n=16, block_k=64, group_m=2, num_warps=4, num_stages=2,
                            split_epilogue=split)
    return fast, fast.quantize_input(x, 1.0, 0), fast.expand_weight(), cfg, n


@interp
@pytest.mark.parametrize("split", [False, True])
def test_gemm_kernel_vs_fp64(K, split):
    fast, aq, w8, cfg, n = _small_gemm(K, 7, split)
    ref = K.gemm.gemm_reference(aq.q, aq.row_scale, w8, fast.w_row_scale, aq.lowrank, fast.l2cat, fast.bias,
                                l2_scaled=True)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2.0**-8)):
        out = torch.full((aq.q.shape[0], n), float("nan"), dtype=dtype)
        K.gemm.gemm_triton(aq.q, aq.row_scale, w8, fast.w_row_scale, aq.lowrank, fast.l2cat, fast.bias,
                           out=out, config=cfg)
        assert not torch.isnan(out).any()
        err = (out.double() - ref).abs()
        assert (err <= tol * ref.abs() + 1e-6 * ref.abs().max()).all()


@interp
@pytest.mark.parametrize("split", [False, True])
def test_gemm_gelu_epilogue_stores_the_gelu_and_its_row_maxima(K, split):
    """``GeluRowMax``: the stored values are an accurate GELU of the plain GEMM's bf16 output
    rounded to bf16 (torch's on almost all), and the row maxima are exactly those of what was
    stored."""
    fast, aq, w8, cfg, n = _small_gemm(K, 11, split)
    mp = aq.q.shape[0]
    plain = torch.full((mp, n), float("nan"), dtype=torch.bfloat16)
    K.gemm.gemm_triton(aq.q, aq.row_scale, w8, fast.w_row_scale, aq.lowrank, fast.l2cat, fast.bias, out=plain,
                       config=cfg)
    ism = 1.0 / (torch.rand(n, generator=torch.Generator().manual_seed(3)) + 0.5)
    g = torch.full((mp, n), float("nan"), dtype=torch.bfloat16)
    amax = torch.zeros(mp)
    K.gemm.gemm_triton(aq.q, aq.row_scale, w8, fast.w_row_scale, aq.lowrank, fast.l2cat, fast.bias, out=g,
                       config=cfg, gelu_rowmax=K.gemm.GeluRowMax(ism, amax))
    assert not torch.isnan(g).any()
    h = plain.double()
    assert (h < -3).any() and (h > 1).any()  # both tails of the GELU are exercised
    # the fp64 tanh GELU, 0.5 h (1 + tanh(u)) written without its cancellation for negative h
    want = h / (1 + torch.exp(-2 * math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    # bf16 rounding of an accurate fp32 value; below about 2^-100 anything (the GPU's approximate
    # division flushes reciprocals under 2^-126, so values near 1e-37 come out as 0)
    assert ((g.double() - want).abs() <= 2.0**-8 * want.abs() + 2.0**-100).all()
    torch_g, _ = K.gemm.gelu_rowmax_reference(plain, ism)
    assert (g != torch_g).float().mean() < 0.05  # torch's fp32 GELU: the same bf16 almost everywhere
    assert torch.equal(amax, K.act_quant.row_absmax_reference(g, ism))


def test_gemm_gelu_epilogue_checks_its_buffers(K):
    a8 = torch.zeros(4, 64, dtype=torch.float8_e4m3fn)
    s = torch.ones(4)
    w8 = torch.zeros(16, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="gelu_rowmax needs inv_smooth fp32 \\[16\\]"):
        K.gemm.gemm_triton(a8, s, w8, torch.ones(16), None, None, None,
                           gelu_rowmax=K.gemm.GeluRowMax(torch.ones(8), torch.zeros(4)))
    with pytest.raises(ValueError, match="writes bf16"):
        K.gemm.gemm_triton(a8, s, w8, torch.ones(16), None, None, None, out=torch.empty(4, 16),
                           gelu_rowmax=K.gemm.GeluRowMax(torch.ones(16), torch.zeros(4)))


def _layer_reference(x, p, clip, off):
    """The reference forward of a quantized layer (what W4A4Linear computes), in fp64."""
    xs = x.float() * (1.0 / p.smooth)
    xq = MXFP4.fake_quantize(xs, clip, off).double()
    w = MXFP4.dequantize(Quantized(unpack_nibbles(p.qweight), p.wscales)).double()
    return xq @ w.T + (xs.double() @ p.l1.double().T) @ p.l2.double().T + p.bias.double()


@interp
@pytest.mark.parametrize("m,k", [(1, 64), (21, 256), (3, 5120)])
def test_fast_layer_matches_reference(K, m, k):
    x, p = _gemm_operands(K, m, 32, k, 32, seed=m + k)
    fast = K.dispatch.FastW4A4.prepare(p, MXFP4, "cpu", backend="triton",
                                       gemm_config=K.gemm.GemmConfig(16, 16, 64, 2, 4, 2))
    for clip, off in p.clip_table.tolist():
        y = fast(x.view(1, m, k), clip, int(off))
        assert y.shape == (1, m, 32) and y.dtype == torch.bfloat16
        want = _layer_reference(x, p, clip, int(off))
        # bf16 output rounding (plus e4m3 loss in the deliberately lossy group: tiny)
        rel = (y[0].double() - want).norm() / want.norm()
        assert rel < 4e-3
    assert fast.memory_bytes() > p.qweight.numel()


@interp
def test_fast_layer_with_gelu_input_is_the_layer_on_the_gelu(K):
    x, p = _gemm_operands(K, 21, 32, 256, 32, seed=5)
    fast = K.dispatch.FastW4A4.prepare(p, MXFP4, "cpu", backend="triton",
                                       gemm_config=K.gemm.GemmConfig(16, 16, 64, 2, 4, 2))
    clip, off = p.clip_table[1].tolist()
    y = fast(x.view(1, 21, 256), clip, int(off), gelu_input=True)
    want = _layer_reference(torch.nn.functional.gelu(x, approximate="tanh"), p, clip, int(off))
    assert (y[0].double() - want).norm() / want.norm() < 4e-3
    assert (y[0].double() - _layer_reference(x, p, clip, int(off))).norm() / want.norm() > 0.1  # the GELU matters


def test_fast_path_status_reasons(K):
    ok, why = K.dispatch.fast_path_status(torch.device("cpu"), MXFP4, MXFP4)
    assert not ok and "CUDA" in why
    ok, why = K.dispatch.fast_path_status(torch.device("cuda"), INT4, INT4)
    assert not ok and "int4" in why
    ok, why = K.dispatch.fast_path_status(torch.device("cuda"), MXFP4Format(16), MXFP4Format(16))
    assert not ok and "group size" in why
    ok, why = K.dispatch.fast_path_status(torch.device("cuda"), MXFP4, INT4)  # each operand is checked
    assert not ok and "activation format int4" in why


def test_prepare_rejects_int4(K):
    x, p = _gemm_operands(K, 3, 16, 64, 4, seed=1)
    p.wscales = p.wscales.to(torch.bfloat16)
    with pytest.raises(ValueError, match="int4"):
        K.dispatch.FastW4A4.prepare(p, MXFP4, "cpu")
    p.wscales = p.wscales.to(torch.uint8)
    with pytest.raises(ValueError, match="activation format int4"):
        K.dispatch.FastW4A4.prepare(p, INT4, "cpu")


def test_act_launch_follows_measurements(K):
    """64-row blocks for few (M=8192) or many (M=75600) blocks, 128-row blocks at M=32760 (H100)."""
    cpu = torch.device("cpu")
    assert K.dispatch.act_launch_for(8192, cpu) == K.dispatch.ACT_LAUNCH_SMALL
    assert K.dispatch.act_launch_for(32760, cpu) == K.dispatch.ACT_LAUNCH_LARGE
    assert K.dispatch.act_launch_for(75600, cpu) == K.dispatch.ACT_LAUNCH_SMALL


def test_act_launch_names_parse_and_bad_ones_say_the_form(K, monkeypatch):
    assert K.dispatch.parse_act_launch("bm16-bk128-w4-s3-p2xSM") == ((16, 128, 4, 3), 2)
    assert K.dispatch.parse_act_launch("bm64-bk128-w8-s3") == ((64, 128, 8, 3), None)
    for bad in ("bm16-bk128", "bm16-bk128-w4-s3-p0xSM", "m16-bk128-w4-s3", "bm16-bk128-w4-s3-p2xSM-x"):
        with pytest.raises(ValueError, match="expected bm<rows>"):
            K.dispatch.parse_act_launch(bad)
    cpu = torch.device("cpu")
    monkeypatch.delenv(K.dispatch.ACT_LAUNCH_ENV, raising=False)
    assert K.dispatch.act_plan(75600, cpu) == (K.dispatch.act_launch_for(75600, cpu), None)
    assert K.dispatch.act_plan(75600, cpu, (32, 64, 4, 2)) == ((32, 64, 4, 2), None)  # an explicit launch wins
    monkeypatch.setenv(K.dispatch.ACT_LAUNCH_ENV, "bm16-bk128-w4-s3-p2xSM")
    assert K.dispatch.act_plan(75600, cpu) == ((16, 128, 4, 3), 2 * 132)
