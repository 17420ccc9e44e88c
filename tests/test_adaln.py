"""The residual + LayerNorm + AdaLN modulation kernel (``wanquant.kernels.adaln``): the
PyTorch reference against float64 math and against diffusers' block arithmetic, the Triton
kernel against the reference in the interpreter (child process), bad inputs."""

from __future__ import annotations

import pytest
import torch

from conftest import INTERPRETING, interp, run_interpreter_suite
from wanquant.kernels import adaln as A
from wanquant.kernels.rope import rounding_steps

not_interp = pytest.mark.skipif(INTERPRETING, reason="runs in the parent process")
STEPS = ("norm1", "norm2", "norm3")


def case(step, b=2, t=5, c=96, dtype=torch.bfloat16, seed=0):
    """Inputs of one of the block's three norm steps (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, t, c, generator=g) * 4 + 1).to(dtype)
    y = torch.randn(b, t, c, generator=g).to(dtype)
    mod = [torch.randn(b, 1, c, generator=g) * 0.3 for _ in range(3)]  # gate, scale, shift (fp32)
    w, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.1
    if step == "norm1":
        return dict(x=x, scale=mod[1], shift=mod[2])
    if step == "norm2":
        return dict(x=x, y=y, gate=mod[0], weight=w, bias=bias)
    return dict(x=x, y=y, scale=mod[1], shift=mod[2])


@not_interp
@pytest.mark.parametrize("step", STEPS)
def test_reference_is_diffusers_block_arithmetic_and_close_to_fp64(step):
    kw = case(step)
    x_new, n = A.residual_norm_reference(**kw)
    x, y = kw["x"], kw.get("y")
    # as WanTransformerBlock.forward writes it (diffusers 0.42.1)
    if step == "norm2":
        want_x = (x.float() + y * kw["gate"]).type_as(x)
    elif step == "norm3":
        want_x = x + y
    else:
        want_x = x
    ln = torch.nn.functional.layer_norm(want_x.float(), (x.shape[-1],), kw.get("weight"), kw.get("bias"), 1e-6)
    want_n = (ln * (1 + kw["scale"]) + kw["shift"] if "scale" in kw else ln).type_as(x)
    assert torch.equal(x_new, want_x) and torch.equal(n, want_n)
    h = x_new.double()  # float64 from the rounded residual: within one bf16 rounding
    n64 = (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    if "weight" in kw:
        n64 = n64 * kw["weight"].double() + kw["bias"].double()
    if "scale" in kw:
        n64 = n64 * (1 + kw["scale"].double()) + kw["shift"].double()
    assert ((n.double() - n64).abs() <= 2.0 ** -8 * n64.abs() + 1e-5).all()


@interp
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("kw", [dict(), dict(b=1, t=7, c=80, dtype=torch.float16), dict(b=3, t=3, c=128)])
def test_kernel_matches_reference(step, kw):
    args = case(step, **kw)
    want = A.residual_norm_reference(**args)
    got = A.residual_norm(**args, rows_per_program=2)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        steps = rounding_steps(g, w)  # mean and variance summed in another order: one step at most
        assert steps.max() <= 1 and (steps > 0).float().mean() <= 0.02
    if "y" in args:
        assert torch.equal(got[0], want[0])  # the residual has one rounding, the same


@interp
def test_kernel_broadcasts_one_modulation_row():
    args = case("norm1", b=2)
    args["scale"], args["shift"] = args["scale"][:1], args["shift"][:1]
    want = A.residual_norm_reference(**args)[1]
    assert rounding_steps(A.residual_norm(**args)[1], want).max() <= 1


def test_interpreter_suite():
    run_interpreter_suite(__file__)


@not_interp
def test_bad_inputs_name_the_problem():
    kw = case("norm2")
    with pytest.raises(ValueError, match="x's shape"):
        A.residual_norm_reference(kw["x"], kw["y"][:, :2], kw["gate"])
    with pytest.raises(ValueError, match="gate needs"):
        A.residual_norm_reference(kw["x"], None, kw["gate"])
    with pytest.raises(ValueError, match="together"):
        A.residual_norm_reference(kw["x"], weight=kw["weight"])
    with pytest.raises(ValueError, match=r"\[1 or B, 1, 96\]"):
        A.residual_norm_reference(kw["x"], kw["y"], kw["gate"][:, 0])
    if A.HAS_TRITON:
        with pytest.raises(ValueError, match="float32"):
            A.residual_norm(kw["x"], kw["y"], kw["gate"].bfloat16())
        with pytest.raises(ValueError, match="contiguous"):
            A.residual_norm(kw["x"].transpose(0, 1).contiguous().transpose(0, 1), kw["y"], kw["gate"])


@not_interp
def test_ops_registration():
    from wanquant.kernels import ops

    for step in STEPS:
        kw = case(step)
        if step == "norm1":
            torch.library.opcheck(ops.norm_modulate, (kw["x"], kw["scale"], kw["shift"], 1e-6))
        else:
            args = (kw["x"], kw["y"], kw.get("gate"), kw.get("weight"), kw.get("bias"), kw.get("scale"),
                    kw.get("shift"), 1e-6)
            torch.library.opcheck(ops.residual_norm, args)
            assert all(torch.equal(g, w) for g, w in zip(ops.residual_norm(*args), A.residual_norm_reference(*args)))


@not_interp
def test_fused_block_forward_is_the_stock_block_on_cpu_and_compiles(monkeypatch):
    import types

    from test_rope import _bf16_transformer, _forward

    from wanquant.model.compile import compile_blocks, uncompile_blocks
    from wanquant.model.fused_block import covered, fused_block_forward

    model = _bf16_transformer()
    stock = _forward(model)
    calls = []
    for block in model.blocks:
        block.forward = types.MethodType(fused_block_forward, block)
    from wanquant.kernels import ops

    real = ops.residual_norm
    with monkeypatch.context() as m:
        m.setattr(ops, "residual_norm", lambda *a: calls.append(1) or real(*a))
        fused = _forward(model)
    for block in model.blocks:
        del block.forward
    assert len(calls) == 4  # two per block
    assert torch.equal(fused, stock)  # the CPU ops are diffusers' arithmetic
    x = torch.zeros(1, 3, 64, dtype=torch.bfloat16)
    assert covered(model.blocks[0], x, torch.zeros(1, 6, 64)) and not covered(model.blocks[0], x.float(),
                                                                               torch.zeros(1, 6, 64))
    compile_blocks(model, backend="aot_eager", fullgraph=True, fused_norms=True)
    try:
        compiled = _forward(model)
    finally:
        uncompile_blocks(model)
    assert "forward" not in model.blocks[0].__dict__
    assert (compiled.float() - stock.float()).norm() <= 0.02 * stock.float().norm()
