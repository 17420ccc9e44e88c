"""LoRAs on the fast path, run by Triton's CPU interpreter (``TRITON_INTERPRET=1``).

A LoRA appended to the branch makes it wide (rank r + r_lora): the GEMM then runs the
low-rank term chunk by chunk over each output tile's live chunks, and the activation
kernel's first pass takes its own K step. These check, at small sizes: the chunked GEMM
against fp64, the split K step bit-exact against the reference, and the W4A4 layer with
LoRAs (load, strength, switch, unload) against its reference path. The GPU run of the
same at Wan shapes is tests/test_lora_gpu.py.
"""

from __future__ import annotations


import torch

from conftest import interp, run_interpreter_suite



def test_interpreter_suite():
    """This file's interpreter tests, in a child process with TRITON_INTERPRET=1."""
    run_interpreter_suite(__file__)


def _pieces(gen, spec, k):
    from wanquant.numerics.lora import LoraPiece

    return tuple(LoraPiece(row0, torch.randn(r, k, generator=gen) * 0.3, torch.randn(rows, r, generator=gen) * 0.3,
                           torch.randn(rows, generator=gen) * 0.1 if bias else None)
                 for row0, r, rows, bias in spec)


@interp
def test_chunked_gemm_vs_fp64():
    from test_runtime import random_params

    from wanquant.formats import MXFP4
    from wanquant.kernels import dispatch as D
    from wanquant.kernels import gemm as G
    from wanquant.runtime.linear import W4A4Linear

    gen = torch.Generator().manual_seed(11)
    n, k = 96, 64
    layer = W4A4Linear.from_params(random_params(n, k, 4, 3, gen), MXFP4, MXFP4)
    layer.set_lora("a", _pieces(gen, [(0, 16, 32, False), (64, 16, 32, False)], k), 0.9)
    p = layer.effective_params()
    cfg = G.GemmConfig(block_m=16, block_n=32, block_k=64, group_m=2, num_warps=4, num_stages=2)
    fast = D.FastW4A4.prepare(p, MXFP4, "cpu", backend="triton", gemm_config=cfg)
    assert fast.l2cat.shape[1] == 128 and fast.lr_chunks is not None  # rank 36 -> 64, hi|lo: chunked
    assert fast.lr_chunks[1].tolist() == [2, 2, 4]  # the k tile needs only the base chunk (hi, lo)
    x = (torch.randn(21, k, generator=gen) * 2).to(torch.bfloat16)
    aq = fast.quantize_input(x, 1.0, 0)
    w8 = fast.expand_weight()
    ref = G.gemm_reference(aq.q, aq.row_scale, w8, fast.w_row_scale, aq.lowrank, fast.l2cat, fast.bias,
                           l2_scaled=True)
    for table in (fast.lr_chunks, None):  # precomputed, or built by gemm_triton
        out = torch.full((aq.q.shape[0], n), float("nan"), dtype=torch.float32)
        G.gemm_triton(aq.q, aq.row_scale, w8, fast.w_row_scale, aq.lowrank, fast.l2cat, fast.bias, out=out,
                      config=cfg, lr_chunks=table)
        assert not torch.isnan(out).any()
        err = (out.double() - ref).abs()
        assert (err <= 1e-6 * ref.abs() + 1e-6 * ref.abs().max()).all(), float(err.max())


@interp
def test_split_k_step_of_the_first_pass_is_bit_exact():
    from wanquant.kernels import act_quant as A

    gen = torch.Generator().manual_seed(12)
    m, k, r = 19, 256, 40
    x = (torch.randn(m, k, generator=gen) * torch.exp(torch.randn(k, generator=gen))).to(torch.bfloat16)
    inv = 1.0 / (torch.rand(k, generator=gen) + 0.5)
    l1s = A.lowrank_weights(torch.randn(r, k, generator=gen) * 0.1, inv)
    ref = A.act_quant_reference(x, inv, l1s, 0.9, 0, "safe_ceil")
    for bk, bk1 in ((128, 32), (64, 64), (32, 128)):
        out = A.act_quant(x, inv, l1s, 0.9, 0, "safe_ceil", block_m=16, block_k=bk, block_k_lr=bk1, num_warps=4)
        assert torch.equal(out.q.view(torch.uint8), ref.q.view(torch.uint8)), (bk, bk1)
        assert torch.equal(out.row_scale, ref.row_scale)
        lr, lr_ref = out.lowrank.float(), ref.lowrank.float()
        assert (lr - lr_ref).abs().max() <= 1e-5 * lr_ref.abs().max(), (bk, bk1)


@interp
def test_layer_with_loras_on_the_fast_path(monkeypatch):
    from test_runtime import random_params

    from wanquant.formats import MXFP4
    from wanquant.kernels import dispatch
    from wanquant.kernels.gemm import GemmConfig
    from wanquant.runtime import linear
    from wanquant.runtime.linear import W4A4Linear

    monkeypatch.setattr(linear, "_fast_status", lambda device, w, a: (True, "interpreted fast path (test)"))
    small = dispatch.FastW4A4.prepare
    monkeypatch.setattr(dispatch.FastW4A4, "prepare", classmethod(
        lambda cls, p, afmt, dev: small.__func__(cls, p, afmt, dev, backend="triton",
                                                 gemm_config=GemmConfig(16, 32, 64, 2, 4, 2))))
    gen = torch.Generator().manual_seed(13)
    n, k = 96, 64
    params = random_params(n, k, 4, 3, gen)
    layer, fresh = W4A4Linear.from_params(params, MXFP4, MXFP4), W4A4Linear.from_params(params, MXFP4, MXFP4)
    x = (torch.randn(9, k, generator=gen) * 2).to(torch.bfloat16)

    def outputs(m):
        out = []
        for b in range(3):
            m.state.bin_index = b
            out.append(m(x))
        return out

    base = outputs(layer)
    assert layer.backend_reason == "interpreted fast path (test)"
    a = _pieces(gen, [(0, 16, 32, True), (32, 8, 32, False), (64, 16, 32, False)], k)
    b = _pieces(gen, [(32, 32, 32, True)], k)
    layer.set_lora("a", a, 0.8)
    with_a = outputs(layer)
    for bi in range(3):  # the LoRA's contribution on the fast path = on the reference path
        c, o = params.clip_table[bi].tolist()
        want = layer.forward_reference(x, c, int(o)).float() - W4A4Linear.from_params(
            params, MXFP4, MXFP4).forward_reference(x, c, int(o)).float()
        got = with_a[bi].float() - base[bi].float()
        assert (got - want).norm() <= 2e-2 * want.norm(), bi
    layer.set_lora_strength("a", 0.0)
    assert all(torch.equal(u, v) for u, v in zip(outputs(layer), base))  # strength 0 = base, bit for bit
    layer.set_lora_strength("a", 0.8)
    assert all(torch.equal(u, v) for u, v in zip(outputs(layer), with_a))
    layer.set_lora("b", b, 1.1, prepare=False)  # a switch: the branch is prepared once, here by the forward
    layer.remove_lora("a", prepare=False)
    assert layer._lowrank_stale
    fresh.set_lora("b", b, 1.1)
    assert all(torch.equal(u, v) for u, v in zip(outputs(layer), outputs(fresh)))  # switched = fresh
    layer.remove_lora("b")
    assert all(torch.equal(u, v) for u, v in zip(outputs(layer), base))  # unloaded = base
    assert layer._fast.rank == 4 and layer._fast.lr_chunks is None  # back to the measured base path
