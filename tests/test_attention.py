"""8-bit attention (wanquant.kernels.attention) and its use in Wan's self-attention, on the CPU.

* the PyTorch reference against exact attention (error bounds, what K/V smoothing buys);
* the Triton kernels against the reference, run by Triton's CPU interpreter in a child
  process (``TRITON_INTERPRET=1`` must be set before triton is imported), at small shapes;
* the diffusers backend on the tiny testbed model through the reference backend.

The GPU versions (Wan sizes, the compiled kernels) are in test_attention_gpu.py.
"""

from __future__ import annotations


import pytest
import torch

from conftest import INTERPRETING, interp, run_interpreter_suite
from wanquant.kernels import attention as K
from wanquant.kernels import attention_reference as R

not_interp = pytest.mark.skipif(INTERPRETING, reason="runs in the parent process")


def qkv(s: int = 256, h: int = 2, d: int = 64, b: int = 1, seed: int = 0, q_std: float = 1.0, k_std: float = 1.0,
        k_mean: float = 0.0, v_mean: float = 0.0, outliers: bool = False, dtype=torch.bfloat16):
    """``[B, S, H, D]`` q, k, v: Gaussian, with optional per-channel K/V offsets and outlier channels."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g) * q_std
    k = torch.randn(b, s, h, d, generator=g) * k_std + k_mean * torch.randn(b, 1, h, d, generator=g)
    v = torch.randn(b, s, h, d, generator=g) + v_mean * torch.randn(b, 1, h, d, generator=g)
    if outliers:
        ch = torch.ones(d)
        ch[:: d // 4] = 8.0
        q, k, v = q * ch, k * ch, v * ch
    return q.to(dtype), k.to(dtype), v.to(dtype)


def exact(q, k, v, layout="bshd"):
    """fp64 attention in ``layout``."""
    o = K.attention_fp32(q, k, v, layout=layout, dtype=torch.float64)
    return o.transpose(1, 2) if layout == "bshd" else o


# ---------------------------------------------------------------------------------
# Reference math (no Triton)
# ---------------------------------------------------------------------------------
@not_interp
def test_kv_quantization_reconstructs_keys_and_values():
    _, k, v = qkv(s=200, k_mean=3.0, v_mean=2.0)
    kv = K.quantize_kv_reference(k, v, k_block=64, v_perm=False)  # tokens in order
    assert kv.k8.shape == (2, 256, 64) and kv.k_scale.shape == (2, 4) and kv.v8t.shape == (2, 64, 256)
    assert kv.k8.abs().max() <= 127 and (kv.k8[:, 200:] == 0).all() and (kv.v8t[:, :, 200:].float() == 0).all()
    kf = k.float().permute(0, 2, 1, 3).reshape(2, 200, 64)
    vf = v.float().permute(0, 2, 1, 3).reshape(2, 200, 64)
    mu_k = kf.mean(1, keepdim=True)
    k_hat = kv.k8[:, :200].float() * kv.k_scale.repeat_interleave(64, 1)[:, :200, None]
    step = kv.k_scale.repeat_interleave(64, 1)[:, :200, None]
    assert ((k_hat - (kf - mu_k)).abs() <= step / 2 * (1 + 1e-5)).all()  # INT8: within half a step
    v_hat = kv.v8t[:, :, :200].float().transpose(1, 2) * kv.v_scale[:, None] + kv.v_mean[:, None]
    torch.testing.assert_close(kv.v_mean, vf.mean(1), rtol=1e-5, atol=1e-5)
    rel = ((v_hat - vf).abs() / (vf - kv.v_mean[:, None]).abs().clamp_min(1e-3)).amax()
    assert rel <= 2.0**-4 * 1.01 or ((v_hat - vf).abs() <= kv.v_scale[:, None] * 2.0**-9 * 448).all(), rel


@not_interp
def test_one_tile_reference_is_the_plain_definition():
    """With one key tile the online softmax is the plain one: INT8 scores, P = 448 * 2^(s - max)
    rounded to e4m3, l = sum of unrounded P, out = (P8 @ V8) / l * v_scale + v_mean."""
    q, k, v = qkv(s=96, h=1, d=32, k_mean=2.0, v_mean=1.0)
    kv = K.quantize_kv_reference(k, v, k_block=128, v_perm=False)
    q8, qs = K.quantize_q_reference(q)
    s = (q8.double() @ kv.k8[:, :96].double().transpose(1, 2)).float() * (qs * kv.k_scale[:, :1])[..., None]
    p = torch.exp2(s - s.amax(-1, keepdim=True) + K.LOG2_P_SCALE)
    p8 = p.to(torch.float8_e4m3fn).double()
    o = (p8 @ kv.v8t[:, :, :96].double().transpose(1, 2)) / p.sum(-1, keepdim=True).double()
    o = o * kv.v_scale[:, None] + kv.v_mean[:, None]
    got = K.attention_prepared_reference(q, kv, out_dtype=torch.float32, config=K.AttnConfig(64, 128, 4, 3))
    torch.testing.assert_close(got[:, :, 0], o.float(), rtol=1e-5, atol=1e-6)
    # the softmax scale is folded into Q's scale: qs * q8 ~ q * log2(e) / sqrt(D)
    torch.testing.assert_close(q8.float() * qs[..., None], q[0].float().transpose(0, 1) * K.LOG2E / 32**0.5,
                               rtol=0, atol=float(qs.max()) / 2 * 1.001)


@not_interp
@pytest.mark.parametrize("case,bound", [("gaussian", 0.045), ("peaked", 0.045), ("v_offset", 0.01),
                                        ("k_offset", 0.045), ("outliers", 0.055)])
def test_reference_error_vs_exact(case, bound):
    """Error budget: e4m3 P and V (3 mantissa bits, ~2.7 % rms each) dominate; on Gaussian
    inputs attention is nearly uniform, the output a small average of noisy values, so the
    relative error is ~3.6 %; bf16 SDPA is ~0.2 %. Inputs with a V offset (as real values have)
    are far better."""
    kw = {"gaussian": {}, "peaked": dict(q_std=2.0, k_std=2.0), "v_offset": dict(v_mean=5.0),
          "k_offset": dict(k_mean=8.0), "outliers": dict(outliers=True, k_mean=4.0)}[case]
    q, k, v = qkv(**kw)
    err = K.relative_error(K.attention_int8_reference(q, k, v), exact(q, k, v))
    assert err < bound, f"{case}: rel err {err:.4f}"


@not_interp
def test_k_smoothing_matters_for_offset_keys():
    """Keys with a large common offset: per-block INT8 without subtracting the mean spends its
    grid on the offset (which softmax ignores); with smoothing the error stays at the FP8 floor."""
    for seed in range(3):
        q, k, v = qkv(k_mean=8.0, seed=seed)
        ref = exact(q, k, v)
        smooth = K.relative_error(K.attention_int8_reference(q, k, v), ref)
        plain = K.relative_error(K.attention_int8_reference(q, k, v, smooth_k=False), ref)
        assert plain > 1.4 * smooth and smooth < 0.045, (seed, smooth, plain)


@not_interp
def test_v_smoothing_matters_for_offset_values():
    q, k, v = qkv(v_mean=5.0)
    ref = exact(q, k, v)
    smooth = K.relative_error(K.attention_int8_reference(q, k, v), ref)
    plain = K.relative_error(K.attention_int8_reference(q, k, v, smooth_v=False), ref)
    assert plain > 1.5 * smooth, (smooth, plain)


@not_interp
def test_v_token_order_maps_the_accumulator_layout_onto_the_operand_layout():
    """Hopper's m64nNk32 layouts: lane t % 4 = u holds accumulator columns 8j + 2u + b of each
    32, and wants FP8 A-operand columns 16h + 4u + i. v_token_order must be a permutation of
    each 32-token block that sends the first set onto the second, lane by lane, in order."""
    n = torch.arange(4 * 32)
    k = K.v_token_order(n)
    assert torch.equal(k.sort().values, n) and torch.equal(k // 32, n // 32)
    for u in range(4):
        held = torch.tensor([8 * j + 2 * u + b for j in range(4) for b in range(2)])
        wanted = torch.tensor([16 * h + 4 * u + i for h in range(2) for i in range(4)])
        assert torch.equal(K.v_token_order(held), wanted)
    assert K.v_token_order(37) == 32 + int(K.v_token_order(torch.tensor(5)))


@not_interp
def test_reference_variants_agree():
    """fold and v_perm change only roundings and the order of sums; l_mma normalizes by the
    sum of the rounded P, so constant values come back exactly (up to fp32)."""
    q, k, v = qkv(s=300, h=2, d=64, k_mean=2.0, v_mean=1.0)
    base = K.AttnConfig(64, 64, 4, 2)
    want = K.attention_int8_reference(q, k, v, config=base).float()
    for cfg in (K.AttnConfig(64, 64, 4, 2, v_perm=True), K.AttnConfig(64, 64, 4, 2, fold=True),
                K.AttnConfig(64, 64, 4, 2, fold=True, v_perm=True, l_mma=True),
                K.AttnConfig(64, 64, 4, 2, fold=True, v_perm=True, half_exp=True),
                K.AttnConfig(64, 64, 4, 2, fold=True, v_perm=True, l_mma=True, lazy_rescale=True)):
        got = K.attention_int8_reference(q, k, v, config=cfg).float()
        bound = 1e-6 if cfg == K.AttnConfig(64, 64, 4, 2, v_perm=True) else 3e-3
        assert K.relative_error(got, want) < bound, cfg.describe()
    const = torch.full_like(v, 0.75)
    for l_mma, bound in ((True, 1e-6), (False, 1.0)):
        cfg = K.AttnConfig(64, 64, 4, 2, l_mma=l_mma)
        kv = K.quantize_kv_reference(k, const, smooth_v=False)
        out = K.attention_prepared_reference(q, kv, out_dtype=torch.float32, config=cfg)
        assert (out - 0.75).abs().max() < bound * 0.75
    kv = K.quantize_kv_reference(k, const, smooth_v=False)
    plain = K.attention_prepared_reference(q, kv, out_dtype=torch.float32, config=K.AttnConfig(64, 64, 4, 2))
    assert (plain - 0.75).abs().max() > 1e-5  # without l_mma: off by sum(P8) / sum(P)


@not_interp
def test_reference_layouts_and_ragged_tiles_agree():
    q, k, v = qkv(s=200, h=3, d=64, b=2, k_mean=1.0)
    a = K.attention_int8_reference(q, k, v, block_n=64)
    bh = K.attention_int8_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bhsd",
                                    block_n=64)
    assert torch.equal(a, bh.transpose(1, 2))
    # tile size changes only where P is rounded (running max): fp8-noise-level differences
    c = K.attention_int8_reference(q, k, v, block_n=16)
    ref = exact(q, k, v)
    assert abs(K.relative_error(a, ref) - K.relative_error(c, ref)) < 0.01


@not_interp
def test_config_parsing_and_checks():
    for cfg in (*K.CONFIGS, K.DEFAULT_CONFIG, K.AttnConfig(32, 64, 4, 2, pv_promote=True, tma=True, maxnreg=128),
                K.AttnConfig(64, 128, 4, 3, q_prepass=True, tma=True, warp_spec=True),
                K.AttnConfig(64, 128, 4, 3, fold=True, half_exp=True),
                K.AttnConfig(64, 128, 4, 3, q_prepass=True, tma=True, lazy_rescale=True, **FAST),
                K.AttnConfig(64, 128, 4, 3, q_prepass=True, tma=True, lazy_rescale=True, qk_ahead=True),
                K.AttnConfig(64, 128, 4, 4, q_prepass=True, tma=True, fold=True, v_perm=True, gluon_ws=True,
                             pv_overlap=True),
                K.AttnConfig(64, 64, 4, 4, q_prepass=True, tma=True, fold=True, v_perm=True, gluon_ws=True,
                             pv_overlap=True, consumers=3),
                K.AttnConfig(64, 128, 4, 3, q_prepass=True, tma=True, fold=True, v_perm=True, gluon_ws=True,
                             pv_overlap=True, defer_rescale=True, exp2_fma=4, tree_max=True)):
        assert K.parse_config(cfg.describe()) == cfg
        K.check_config(cfg, K.K_BLOCK)
    with pytest.raises(ValueError, match="divide"):
        K.check_config(K.AttnConfig(128, 256, 8, 3), K.K_BLOCK)
    with pytest.raises(ValueError, match="v_perm needs block_n"):
        K.check_config(K.AttnConfig(64, 16, 4, 2, v_perm=True), K.K_BLOCK)
    with pytest.raises(ValueError, match="half_exp"):  # a 256-key tile's fp16 row sum could overflow
        K.check_config(K.AttnConfig(64, 256, 4, 2, half_exp=True), 256)
    with pytest.raises(ValueError, match="qk_ahead and warp_spec"):
        K.check_config(K.AttnConfig(64, 128, 4, 3, warp_spec=True, qk_ahead=True), K.K_BLOCK)
    gws = dict(q_prepass=True, tma=True, fold=True, v_perm=True, gluon_ws=True)
    with pytest.raises(ValueError, match="pv_overlap is a schedule of the Gluon kernel"):
        K.check_config(K.AttnConfig(64, 128, 4, 3, pv_overlap=True), K.K_BLOCK)
    with pytest.raises(ValueError, match=r"gluon_ws needs \['v_perm'\] on and \['l_mma'\] off"):
        K.check_config(K.AttnConfig(64, 128, 4, 3, **{**gws, "v_perm": False}, l_mma=True), K.K_BLOCK)
    with pytest.raises(ValueError, match="64 queries per 4-warp consumer"):
        K.check_config(K.AttnConfig(128, 128, 8, 3, **gws), K.K_BLOCK)
    with pytest.raises(ValueError, match="what their registers hold"):  # 3 x 160 registers: 64-key tiles
        K.check_config(K.AttnConfig(64, 128, 4, 3, **gws, consumers=3), K.K_BLOCK)
    with pytest.raises(ValueError, match="what their registers hold"):
        K.check_config(K.AttnConfig(64, 64, 4, 3, **gws, consumers=4), K.K_BLOCK)
    with pytest.raises(ValueError, match="ping_pong alternates two consumers"):
        K.check_config(K.AttnConfig(64, 64, 4, 3, **gws, pv_overlap=True, ping_pong=True, consumers=3), K.K_BLOCK)
    with pytest.raises(ValueError, match="consumers, exp2_fma and tree_max are options of the Gluon kernel"):
        K.check_config(K.AttnConfig(64, 64, 4, 3, consumers=3), K.K_BLOCK)
    with pytest.raises(ValueError, match="consumers, exp2_fma and tree_max are options of the Gluon kernel"):
        K.check_config(K.AttnConfig(64, 64, 4, 3, exp2_fma=4), K.K_BLOCK)
    with pytest.raises(ValueError, match=r"exp2_fma is one exponential in every \(2, 4, 8\)"):
        K.check_config(K.AttnConfig(64, 128, 4, 3, **gws, exp2_fma=3), K.K_BLOCK)
    with pytest.raises(ValueError, match="defer_rescale reorders the overlapped schedule"):
        K.check_config(K.AttnConfig(64, 128, 4, 3, **gws, defer_rescale=True), K.K_BLOCK)
    _, k, v = qkv(s=40)
    with pytest.raises(ValueError, match="v_perm needs k_block"):
        K.quantize_kv_reference(k, v, k_block=16, v_perm=True)
    for bad in ("fast", "m64-n64-w4-s2-turbo", "m64-n64-w4"):
        with pytest.raises(ValueError, match="form"):
            K.parse_config(bad)
    with pytest.raises(ValueError, match="head_dim"):
        K.check_head_dim(96)


# ---------------------------------------------------------------------------------

def test_config_for_a_device_without_the_gluon_kernel():
    gws = K.AttnConfig(64, 128, 4, 5, q_prepass=True, tma=True, fold=True, v_perm=True, gluon_ws=True,
                       pv_overlap=True, defer_rescale=True, ping_pong=True, exp2_fma=8, tree_max=True)
    assert K.config_for(gws, head_dim=128, tma=True, gluon=True) == gws
    for d, tma, gluon in ((128, True, False), (64, True, True), (128, False, False)):
        got = K.config_for(gws, head_dim=d, tma=tma, gluon=gluon)
        # the Triton kernel, same numbers: only the schedule's fields and the stage count change
        assert got == K.AttnConfig(64, 128, 4, K.TRITON_MAX_STAGES, q_prepass=True, tma=tma, fold=True, v_perm=True)
        K.check_config(got, K.K_BLOCK)
    three = K.AttnConfig(64, 64, 4, 6, q_prepass=True, tma=True, fold=True, v_perm=True, gluon_ws=True,
                         pv_overlap=True, consumers=3)
    assert K.config_for(three, head_dim=128, tma=True, gluon=False) == K.AttnConfig(
        64, 64, 4, K.TRITON_MAX_STAGES, q_prepass=True, tma=True, fold=True, v_perm=True)
    shallow = K.AttnConfig(64, 128, 4, 2, q_prepass=True, tma=True, fold=True, v_perm=True, gluon_ws=True)
    assert K.config_for(shallow, head_dim=128, tma=True, gluon=False).num_stages == 2
    triton_cfg = K.AttnConfig(64, 128, 4, 4, q_prepass=True, tma=True)  # not the Gluon kernel's: kept as asked
    assert K.config_for(triton_cfg, head_dim=128, tma=True, gluon=False) == triton_cfg

# Triton kernels in the interpreter
# ---------------------------------------------------------------------------------
def test_interpreter_suite():
    """This file's interpreter tests, in a child process with TRITON_INTERPRET=1."""
    run_interpreter_suite(__file__)


def _fused_qkv(s, h, d, b=1, seed=0, **kw):
    """q, k, v as strided views of one ``[B, S, 3, H, D]`` buffer (what a fused projection gives)."""
    q, k, v = qkv(s=s, h=h, d=d, b=b, seed=seed, **kw)
    buf = torch.stack([q, k, v], dim=2)
    return buf[:, :, 0], buf[:, :, 1], buf[:, :, 2]


@interp
@pytest.mark.parametrize("s,d,k_block,smooth,v_perm", [(200, 64, 64, True, False), (64, 128, 128, True, False),
                                                      (333, 32, 32, False, False), (200, 64, 64, True, True)])
def test_kv_prepass_matches_reference(s, d, k_block, smooth, v_perm):
    _, k, v = _fused_qkv(s, 2, d, b=2, k_mean=3.0, v_mean=1.0)
    assert not k.is_contiguous()
    got = K.quantize_kv(k, v, k_block=k_block, smooth_k=smooth, smooth_v=smooth, v_perm=v_perm)
    want = K.quantize_kv_reference(k, v, k_block=k_block, smooth_k=smooth, smooth_v=smooth, v_perm=v_perm)
    assert got.v_perm == want.v_perm == v_perm
    assert torch.equal(got.k8, want.k8)
    assert torch.equal(got.v8t.view(torch.uint8), want.v8t.view(torch.uint8))
    for name in ("k_scale", "v_scale", "v_mean"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-7, msg=name)


@interp
@pytest.mark.parametrize("s,d,b,s_qpad", [(200, 64, 2, 256), (64, 128, 1, 64), (33, 32, 1, 128)])
def test_q_prepass_matches_reference(s, d, b, s_qpad):
    """``quantize_q`` (the Q pre-pass kernel) is ``quantize_q_reference`` bit for bit, padded rows zero."""
    q, _, _ = _fused_qkv(s, 3, d, b=b)
    q8, qs = K.quantize_q(q, s_qpad)
    want8, wants = K.quantize_q_reference(q)
    assert q8.shape == (b * 3, s_qpad, d) and qs.shape == (b * 3, s_qpad)
    assert torch.equal(q8[:, :s], want8) and torch.equal(qs[:, :s], wants)
    assert not q8[:, s:].any() and not qs[:, s:].any()
    with pytest.raises(ValueError, match="multiple of block_m"):
        K.quantize_q(q, s_qpad + 1)


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


FAST = dict(fold=True, v_perm=True, l_mma=True)


@interp
@pytest.mark.parametrize("cfg", [K.AttnConfig(64, 64, 4, 2), K.AttnConfig(32, 32, 4, 2),
                                 K.AttnConfig(16, 64, 4, 2, pv_promote=True), K.AttnConfig(32, 64, 4, 2, q_prepass=True),
                                 K.AttnConfig(32, 64, 4, 2, **FAST),
                                 K.AttnConfig(64, 32, 4, 2, q_prepass=True, tma=True, maxnreg=168, **FAST),
                                 K.AttnConfig(32, 64, 4, 2, q_prepass=True, tma=True, fold=True, v_perm=True,
                                              warp_spec=True),
                                 K.AttnConfig(32, 64, 4, 2, q_prepass=True, fold=True, v_perm=True, half_exp=True),
                                 K.AttnConfig(32, 64, 4, 2, lazy_rescale=True),
                                 K.AttnConfig(32, 32, 4, 2, q_prepass=True, tma=True, lazy_rescale=True, **FAST),
                                 K.AttnConfig(32, 64, 4, 2, qk_ahead=True),
                                 K.AttnConfig(32, 32, 4, 2, q_prepass=True, tma=True, lazy_rescale=True, qk_ahead=True,
                                              fold=True, v_perm=True)],
                         ids=lambda c: c.describe())
def test_kernel_matches_reference(cfg):
    """Same quantization as the reference; only accumulation order and exp2's last bits differ."""
    q, k, v = _fused_qkv(200, 2, 64, b=2, k_mean=2.0, v_mean=0.5)  # 200: a ragged last tile
    kv = K.quantize_kv_reference(k, v, k_block=64, v_perm=cfg.v_perm)
    out = _poisoned(q.shape, torch.float32)
    K.attention_prepared(q, kv, config=cfg, out=out)
    want = K.attention_prepared_reference(q, kv, out_dtype=torch.float32, config=cfg)
    assert not out.isnan().any()
    # half_exp: each tile's row sum runs in fp16 (2^-11 per add), in another order than the reference's
    assert K.relative_error(out, want) < (2e-4 if cfg.half_exp else 1e-5)
    out16 = _poisoned(q.shape, torch.bfloat16)
    K.attention_prepared(q, kv, config=cfg, out=out16)
    assert K.relative_error(out16, want.bfloat16()) < 1e-3  # bf16 rounding of near-identical values
    assert K.relative_error(out, exact(q, k, v)) < 0.045


@interp
def test_kernel_query_chunks_and_layouts():
    """Queries of a token chunk (S_q != S_k, strided), [B, H, S, D] inputs, D = 128."""
    q, k, v = qkv(s=300, h=2, d=128, k_mean=1.0)
    kv = K.quantize_kv(k, v)
    cfg = K.AttnConfig(32, 64, 4, 2)
    chunk = q[:, 37:170]
    got = K.attention_prepared(chunk, kv, config=cfg, out=_poisoned(chunk.shape, torch.float32))
    want = K.attention_prepared_reference(chunk, kv, out_dtype=torch.float32, config=cfg)
    assert K.relative_error(got, want) < 1e-5
    full = K.attention_int8(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bhsd", config=cfg)
    assert full.shape == (1, 2, 300, 128) and full.dtype == torch.bfloat16
    want_full = K.attention_int8_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bhsd",
                                           config=cfg)
    assert K.relative_error(full, want_full) < 1e-3
    torch.testing.assert_close(full[:, :, 37:170].float(), got.transpose(1, 2), rtol=0, atol=float(got.abs().max()) / 128)


@interp
def test_kernel_degenerate_inputs():
    """All-zero queries (uniform attention), keys equal over tokens (all zero after smoothing),
    an all-zero value channel: finite, and as the reference."""
    q, k, v = qkv(s=70, h=2, d=32)
    q[:, 5] = 0
    k[:, :, 1] = k[:, :1, 1]  # head 1: every key the same
    v[..., 3] = 0
    kv = K.quantize_kv(k, v, k_block=32)
    cfg = K.AttnConfig(16, 32, 4, 2)
    out = K.attention_prepared(q, kv, config=cfg, out=_poisoned(q.shape, torch.float32))
    want = K.attention_prepared_reference(q, kv, out_dtype=torch.float32, config=cfg)
    assert torch.isfinite(out).all() and K.relative_error(out, want) < 1e-5
    torch.testing.assert_close(out[:, 5], v.float().mean(1), rtol=0.05, atol=0.05)  # zero query: mean of V
    assert (out[..., 3] == 0).all()
    # keys fewer than one tile: the look-ahead variant's loop is empty, only the masked tile runs
    kv = K.quantize_kv(k, v, k_block=128)
    cfg = K.AttnConfig(16, 128, 4, 2, qk_ahead=True)
    out = K.attention_prepared(q, kv, config=cfg, out=_poisoned(q.shape, torch.float32))
    want = K.attention_prepared_reference(q, kv, out_dtype=torch.float32, config=cfg)
    assert torch.isfinite(out).all() and K.relative_error(out, want) < 1e-5


# ---------------------------------------------------------------------------------
# Wan integration (diffusers backend), through the reference
# ---------------------------------------------------------------------------------
def _tiny_transformer(seed=0, heads=2, head_dim=64):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, rope_max_seq_len=64,
    ).float().eval()
    with torch.no_grad():  # non-trivial modulation and norms so attention matters
        for name, p in model.named_parameters():
            if "scale_shift_table" in name or name.endswith("norm_q.weight") or name.endswith("norm_k.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _run(model, frames=3, height=16, width=24, seed=1):
    g = torch.Generator().manual_seed(seed)  # 3 x 8 x 12 = 288 tokens: three key tiles, a ragged one
    x = torch.randn(1, 4, frames, height, width, generator=g)
    ctx = torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=ctx,
                     return_dict=False)[0]


@not_interp
def test_backend_on_self_attention_only_and_close_to_sdpa():
    from wanquant.model import attention as MA

    model = _tiny_transformer()
    ref = _run(model)
    assert MA.set_self_attention(model, "int8_reference") == 2
    assert MA.self_attention_mode(model) == "int8_reference"
    for block in model.blocks:
        assert block.attn1.processor._attention_backend.value == "wanquant_int8_reference"
        assert block.attn2.processor._attention_backend is None  # cross-attention untouched
    out = _run(model)
    assert torch.isfinite(out).all()
    err = K.relative_error(out, ref)
    assert 0 < err < 0.03, err
    MA.set_self_attention(model, "sdpa")
    assert MA.self_attention_mode(model) == "sdpa"
    assert torch.equal(_run(model), ref)


@not_interp
def test_chunked_block_quantizes_keys_once(monkeypatch):
    from wanquant.model import attention as MA
    from wanquant.model import block as chunking

    model = _tiny_transformer()
    MA.set_self_attention(model, "int8_reference")
    whole = _run(model)
    calls = []
    real = K.quantize_kv_reference
    monkeypatch.setattr(K, "quantize_kv_reference", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    chunking.enable_token_chunking(model, 100)  # 288 tokens: three query chunks per block
    chunked = _run(model)
    assert len(calls) == 2  # once per block, not once per chunk
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)


@not_interp
def test_unsupported_calls_fall_back_to_sdpa(caplog):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from wanquant.model import attention as MA

    backend = MA.backend_for("int8_reference")
    q, k, v = qkv(s=40, h=2, d=48, dtype=torch.float32)  # head_dim 48: not a power of two
    out = dispatch_attention_fn(q, k, v, backend=backend)
    torch.testing.assert_close(out.double(), exact(q, k, v), rtol=1e-4, atol=1e-5)
    assert "head_dim 48" in caplog.text


@not_interp
def test_int8_refuses_without_a_fp8_gpu():
    from wanquant.model import attention as MA

    if MA.int8_available()[0]:
        pytest.skip("this machine can run the int8 kernel")
    model = _tiny_transformer()
    with pytest.raises(MA.AttentionUnavailableError, match="FP8 tensor cores"):
        MA.set_self_attention(model, "int8")
    assert MA.self_attention_mode(model) == "sdpa"  # nothing was changed
    with pytest.raises(ValueError, match="one of"):
        MA.set_self_attention(model, "fp4")
    # a module set to int8 elsewhere and then run on CPU tensors: a clear error, no silent fallback
    model.blocks[0].attn1.processor._attention_backend = MA.backend_for("int8")
    with pytest.raises(MA.AttentionUnavailableError, match="cannot run"):
        _run(model)


@not_interp
@pytest.mark.slow
def test_tiny_pipeline_generates_with_int8_reference_attention():
    import dataclasses

    from conftest import TINY_SETTINGS, build_tiny_pipeline
    from PIL import Image

    from wanquant import api

    settings = dataclasses.replace(TINY_SETTINGS, num_inference_steps=4)
    image = Image.new("RGB", (32, 32), (120, 60, 200))
    pipe = build_tiny_pipeline()
    base = api.generate(pipe, image, "a cube", settings, seed=3)
    text = api.set_attention(pipe, "int8_reference")
    assert "8-bit" in text and "transformer_2" in text
    frames = api.generate(pipe, image, "a cube", settings, seed=3)
    a = torch.as_tensor(frames).float()
    b = torch.as_tensor(base).float()
    assert torch.isfinite(a).all()
    assert K.relative_error(a, b) < 0.05


@not_interp
def test_cli_has_the_attention_flag():
    from wanquant.cli import build_parser

    p = build_parser()
    base = ["generate", "--image", "x.png", "--prompt", "p", "--out", "o.mp4"]
    assert p.parse_args(base).attention == "auto"
    assert p.parse_args([*base, "--attention", "sdpa"]).attention == "sdpa"
    assert p.parse_args([*base, "--attention", "int8"]).attention == "int8"
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--attention", "fp4"])


@not_interp
def test_auto_attention_is_sdpa_off_hopper_and_says_why():
    from conftest import build_tiny_pipeline

    from wanquant import api
    from wanquant.model import attention as MA

    assert MA.resolve_mode("auto", "cpu") == ("sdpa", "auto: cpu device")
    assert MA.resolve_mode("int8", "cpu") == ("int8", "as asked")
    pipe = build_tiny_pipeline()
    text = api.set_attention(pipe, "auto", "cpu")
    assert "SDPA" in text and "auto: cpu device" in text
    assert MA.self_attention_mode(pipe.transformer) == "sdpa"
    with pytest.raises(ValueError, match="resolve"):
        MA.set_self_attention(pipe.transformer, "auto")


@not_interp
def test_block_any_matches_brute_force():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for rows, s in ((1, 5), (4, 13), (32, 64), (64, 40)):
        flags = torch.rand(3, s, generator=g) < 0.05
        got = R._block_any(flags, rows)
        want = torch.stack([torch.tensor([bool(f[(j // rows) * rows:(j // rows + 1) * rows].any()) for j in range(s)])
                            for f in flags])
        assert torch.equal(got, want)


def _growing_keys(s, h, d, seed):
    """Keys whose norm grows 6x over the first half of the sequence, then stays: row maxima
    rise tile after tile, then settle, so lazy rescaling rescales mid-stream, then skips."""
    q, k, v = _fused_qkv(s, h, d, seed=seed, k_mean=0.5)
    ramp = torch.cat([torch.linspace(0.5, 3.0, s // 2), torch.full((s - s // 2,), 3.0)])[None, :, None, None]
    return q, (k.float() * ramp).to(k.dtype), v


@not_interp
def test_lazy_rescale_reference_is_attention(monkeypatch):
    """The lazy reference against fp64 attention, on keys whose maxima grow then settle and on
    plain Gaussian keys: the same error as rescaling every tile, both at FP8's level; on the
    growing keys some blocks of rows rescale after the first tile and some skip."""
    seed = int(torch.randint(0, 2**31, ()))
    decided = []
    block_any = R._block_any
    monkeypatch.setattr(R, "_block_any", lambda f, rows: decided.append(block_any(f, rows)) or decided[-1])
    for i, (q, k, v) in enumerate((_growing_keys(384, 2, 64, seed), qkv(s=256, h=2, d=64, seed=seed))):
        eager = K.attention_int8_reference(q, k, v, config=K.AttnConfig(32, 32, 4, 2, **FAST)).float()
        lazy = K.attention_int8_reference(q, k, v, config=K.AttnConfig(32, 32, 4, 2, lazy_rescale=True, **FAST))
        ref = exact(q, k, v)
        assert K.relative_error(lazy.float(), ref) < 0.045
        assert abs(K.relative_error(lazy.float(), ref) - K.relative_error(eager, ref)) < 0.01
        if i == 0:
            later = torch.stack(decided[1:])  # [tiles - 1, B*H, S]
            assert later.any() and not later.all()


@interp
@pytest.mark.parametrize("cfg", [K.AttnConfig(32, 32, 4, 2, lazy_rescale=True),
                                 K.AttnConfig(32, 32, 4, 2, q_prepass=True, lazy_rescale=True, **FAST),
                                 K.AttnConfig(32, 32, 4, 2, lazy_rescale=True, qk_ahead=True)],
                         ids=lambda c: c.describe())
def test_lazy_kernel_matches_reference_when_maxima_grow(cfg):
    """Rescales in the middle of the key loop (growing keys) take the same branch as the reference."""
    q, k, v = _growing_keys(384, 2, 64, seed=int(torch.randint(0, 2**31, ())))
    kv = K.quantize_kv_reference(k, v, k_block=32, v_perm=cfg.v_perm)
    out = _poisoned(q.shape, torch.float32)
    K.attention_prepared(q, kv, config=cfg, out=out)
    want = K.attention_prepared_reference(q, kv, out_dtype=torch.float32, config=cfg)
    assert not out.isnan().any()
    assert K.relative_error(out, want) < 1e-5
