"""torch.compile of Wan blocks (CPU): the custom ops' fake implementations and CPU
references, and a tiny quantized A14B-form expert that compiles with no graph break,
one graph for all its blocks (per timestep bin), and the eager reference's output.

The fast W4A4 path needs a GPU; here its operands are prepared with
``TRITON_INTERPRET=1`` (the preparation is plain PyTorch) and the op's CPU
implementation (the PyTorch references of the kernels) runs them. ``aot_eager`` traces
with fake tensors and functionalization, as Inductor does, without compiling C++.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

from benchmarks.common.a14b import TINY_EXPERT, build_expert
from test_runtime import random_params
from wanquant.formats import MXFP4
from wanquant.kernels import ops
from wanquant.kernels.attention import attention_fp32, relative_error
from wanquant.kernels.dispatch import FastW4A4
from wanquant.method.config import wanquant_preset
from wanquant.method.layer import reference_forward
from wanquant.model.attention import set_self_attention
from wanquant.model.compile import compile_blocks, is_compiled, uncompile_blocks
from wanquant.model.wan import bind_expert
from wanquant.numerics.lora import LoraPiece
from wanquant.runtime import linear
from wanquant.runtime.expert import quantized_layers, set_backend
from wanquant.runtime.state import TimestepBins


def _fast(params, monkeypatch, backend="triton"):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # FastW4A4.prepare is plain PyTorch; it only checks this
    f = FastW4A4.prepare(params, MXFP4, "cpu", backend=backend)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return f


def _op_args(f, x, clip_cpu, bin_index):
    idx, cnt = f.lr_chunks if f.lr_chunks is not None else (None, None)
    return (x, f.qweight, f.wscales, f.s_w, f.w_row_scale, f.inv_smooth, f.l1s, f.l2cat, idx, cnt, f.bias,
            clip_cpu, bin_index, MXFP4.scale_rule, f.backend, ops.launch_key(f.gemm_config, f.act_launch))


@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("shape,dtype", [((5, 64), torch.bfloat16), ((2, 7, 64), torch.float32)])
def test_w4a4_op_matches_layer_reference(seed, monkeypatch, backend, shape, dtype):
    gen = torch.Generator().manual_seed(seed)
    params = random_params(48, 64, 4, 3, gen)
    f = _fast(params, monkeypatch, backend)
    clip_cpu = params.clip_table.double()
    x = (torch.randn(*shape, generator=gen) * 2).to(dtype)
    for b in range(3):
        y = ops.w4a4_linear(*_op_args(f, x, clip_cpu, b))
        assert y.shape == (*shape[:-1], 48) and y.dtype == dtype
        c, o = params.clip_table[b].tolist()
        want = reference_forward(params, x.reshape(-1, 64).to(torch.bfloat16), MXFP4, MXFP4, c, int(o))
        err = (y.reshape(-1, 48).double() - want.double()).norm() / want.double().norm()
        assert err < 1e-2, (b, float(err))  # bf16 output rounding; different bins differ by far more
    # The fake implementation agrees with the real one (shape, dtype, strides), schema, aot dispatch.
    torch.library.opcheck(torch.ops.wanquant.w4a4_linear.default, _op_args(f, x, clip_cpu, 1))


def test_w4a4_op_rejects_bad_bin(seed, monkeypatch):
    params = random_params(32, 64, 4, 3, torch.Generator().manual_seed(seed))
    f = _fast(params, monkeypatch)
    with pytest.raises(ValueError, match="bin 3 outside"):
        ops.w4a4_linear(*_op_args(f, torch.randn(4, 64).bfloat16(), params.clip_table.double(), 3))


@pytest.mark.parametrize("s_q,s_k", [(200, 200), (96, 300)])
def test_attention_op_cpu_is_8bit_attention(seed, s_q, s_k):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, s_q, 2, 32, generator=gen).bfloat16()
    k = torch.randn(1, s_k, 2, 32, generator=gen).bfloat16()
    v = (torch.randn(1, s_k, 2, 32, generator=gen) + 1.0).bfloat16()  # a channel offset, as real values have
    out = ops.attention_int8(q, k, v, None, False)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    exact = attention_fp32(q, k, v).transpose(1, 2)
    assert relative_error(out, exact) < 0.03
    torch.library.opcheck(torch.ops.wanquant.attention_int8.default, (q, k, v, 0.2, True))


# ---------------------------------------------------------------------------------------
# a tiny quantized expert, compiled block by block
@pytest.fixture
def expert(seed, monkeypatch):
    torch.manual_seed(seed)
    model = build_expert(TINY_EXPERT, True, torch.device("cpu"), wanquant_preset())
    bind_expert(model, TimestepBins(1000.0, 900.0, (1 / 3, 2 / 3)))
    for i, layer in enumerate(quantized_layers(model).values()):  # a different clip table per layer
        layer.clip_table.copy_(torch.tensor([[1.0, 0.0], [0.9 - 0.02 * i, 0.0], [0.8, 1.0]]))
        layer.refresh()
    monkeypatch.setattr(linear, "_fast_status", lambda device, w, a: (True, "interpreted fast path (test)"))
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(hidden_states=torch.randn(1, 36, 3, 8, 8, generator=gen).bfloat16(),
                  encoder_hidden_states=torch.randn(1, 16, TINY_EXPERT["text_dim"], generator=gen).bfloat16())
    yield model, inputs
    torch._dynamo.reset()


def _run(model, inputs, t):
    with torch.no_grad():
        return model(**inputs, timestep=torch.tensor([t]), return_dict=False)[0].float()


def _prepare_fast(model, monkeypatch):
    set_backend(model, "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for layer in quantized_layers(model).values():
        layer.prepare_for_compile("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert {layer._resolved for layer in quantized_layers(model).values()} == {"fast"}


@pytest.mark.parametrize("attention", ["sdpa", "int8_reference"])
def test_quantized_block_compiles_once_without_graph_breaks(expert, monkeypatch, attention):
    model, inputs = expert
    set_self_attention(model, attention)
    set_backend(model, "reference")
    want = {t: _run(model, inputs, t) for t in (950.0, 905.0)}  # bins 1 and 2
    _prepare_fast(model, monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(model, backend="aot_eager", fullgraph=True) == TINY_EXPERT["num_layers"]
    got = _run(model, inputs, 950.0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # both blocks, each layer with its own clip table
    assert relative_error(got, want[950.0]) < 2e-2
    got = _run(model, inputs, 905.0)
    assert counters["stats"]["unique_graphs"] == 2  # a new bin: one more graph, again for both blocks
    assert relative_error(got, want[905.0]) < 2e-2
    assert relative_error(want[950.0], want[905.0]) > 5 * relative_error(got, want[905.0])  # the bins do differ
    uncompile_blocks(model)
    assert not is_compiled(model) and all("forward" not in b.__dict__ for b in model.blocks)


def test_compiled_block_follows_lora_changes(expert, monkeypatch):
    model, inputs = expert
    layer = model.blocks[1].ffn.net[2]
    gen = torch.Generator().manual_seed(1)
    piece = LoraPiece(0, torch.randn(8, layer.in_features, generator=gen) / math.sqrt(layer.in_features),
                      torch.randn(layer.out_features, 8, generator=gen), None)
    _prepare_fast(model, monkeypatch)
    compile_blocks(model, backend="aot_eager", fullgraph=True)
    before = _run(model, inputs, 950.0)
    layer.set_lora("style", (piece,), strength=1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the pre-forward hook re-prepares the branch
    got = _run(model, inputs, 950.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    uncompile_blocks(model)
    set_backend(model, "reference")
    want = _run(model, inputs, 950.0)
    assert relative_error(got, want) < 2e-2
    assert relative_error(before, want) > 10 * relative_error(got, want)
    assert not counters["graph_break"]


def test_bf16_block_compiles_with_int8_attention(seed):
    torch.manual_seed(seed)
    model = build_expert(TINY_EXPERT, False, torch.device("cpu"), wanquant_preset())
    set_self_attention(model, "int8_reference")
    inputs = dict(hidden_states=torch.randn(1, 36, 3, 8, 8).bfloat16(),
                  encoder_hidden_states=torch.randn(1, 16, TINY_EXPERT["text_dim"]).bfloat16())
    want = _run(model, inputs, 500.0)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend="aot_eager", fullgraph=True)
    got = _run(model, inputs, 500.0)
    torch._dynamo.reset()
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    assert relative_error(got, want) < 1e-2


# ---------------------------------------------------------------------------------------
# user surface
def test_cli_refuses_compile_with_memory_policy_before_loading(capsys, tmp_path, monkeypatch):
    from PIL import Image

    import wanquant.api as wq
    from wanquant.cli import main

    monkeypatch.setattr(wq, "load_base_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    capsys.readouterr()
    assert main(["generate", "--image", str(tmp_path / "a.png"), "--prompt", "a red circle", "--out",
                 str(tmp_path / "v.mp4"), "--compile", "--memory", "low"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--compile does not support --memory" in err and len(err.splitlines()) == 1


def test_set_compile_toggles_every_expert(tiny_pipe, caplog):
    import wanquant.api as wq

    with caplog.at_level("INFO", logger="wanquant.api"):
        text = wq.set_compile(tiny_pipe, True)
    assert wq.compile_enabled(tiny_pipe) and "torch.compile: each block of transformer" in caplog.text
    assert "transformer_2" in text
    for e in (tiny_pipe.transformer, tiny_pipe.transformer_2):
        assert all(callable(b.__dict__.get("forward")) for b in e.blocks)
    assert wq.set_compile(tiny_pipe, False) == "torch.compile: off"
    assert not wq.compile_enabled(tiny_pipe)
    assert all("forward" not in b.__dict__ for b in tiny_pipe.transformer.blocks)


# ---------------------------------------------------------------------------------------
# the end-to-end benchmark's driver (CPU dry run) and its kernel buckets
def test_e2e_speed_dry_run_and_resume(tmp_path):
    import json

    from benchmarks import e2e_speed

    argv = ["--tiny", "--out", str(tmp_path), "--resolutions", "32x64", "--reps", "1", "--compile-backend",
            "aot_eager"]
    assert e2e_speed.main([*argv, "--modes", "bf16_eager,bf16_int8attn_compile"]) == 0
    first = json.loads((tmp_path / "e2e_speed.json").read_text())
    assert {"device", "date", "commit", "command", "rows"} <= set(first)
    assert [(r["mode"], r["resolution"]) for r in first["rows"]] == [("bf16_eager", "32x64"),
                                                                      ("bf16_int8attn_compile", "32x64")]
    for r in first["rows"]:
        assert {"mode", "resolution", "step_s", "attention_s", "linears_s", "other_s"} <= set(r) and r["step_s"] > 0
    assert first["rows"][1]["rel_diff_vs_eager_1block"] < 1e-2  # compiled block == eager block
    assert e2e_speed.main([*argv, "--modes", "bf16_eager,w4a4", "--resume", str(tmp_path / "e2e_speed.json")]) == 0
    rows = json.loads((tmp_path / "e2e_speed.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["bf16_eager", "bf16_int8attn_compile", "w4a4"]
    assert rows[0] == first["rows"][0]  # kept, not measured again
    assert "| w4a4 | 32x64 |" in (tmp_path / "e2e_speed.md").read_text()


@pytest.mark.parametrize("name,part", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("_attn_fwd_kernel", "attention"), ("_kv_quant_kernel", "attention"), ("fmha_cutlassF_bf16_aligned", "attention"),
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_bias_TNT", "linears"), ("_act_quant_kernel", "linears"),
    ("_fp8_gemm_kernel", "linears"), ("_expand_kernel", "linears"), ("sm90_xmma_gemm_bf16bf16", "linears"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "other"), ("vectorized_elementwise_kernel", "other"),
])
def test_e2e_kernel_parts(name, part):
    from benchmarks.e2e_speed import part_of

    assert part_of(name) == part


@pytest.mark.parametrize("mode,row_amax", [(None, True), ("max-autotune-no-cudagraphs", True), (None, False)])
def test_compile_blocks_keeps_fused_row_maxima_exact(expert, monkeypatch, mode, row_amax):
    """With the row maxima in the graph, Inductor must round x before it takes them
    (emulate_precision_casts); a mode goes in as its options, which say the same."""
    import torch._inductor

    from wanquant.model.compile import ROW_AMAX_INDUCTOR_OPTIONS

    model, _ = expert
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    compile_blocks(model, mode=mode, row_amax_in_graph=row_amax)
    uncompile_blocks(model)
    assert len(calls) == TINY_EXPERT["num_layers"]
    for name, layer in quantized_layers(model).items():  # attention outputs: the kernel's own first pass
        assert layer.row_amax_in_graph == (row_amax and ".to_out." not in name), name
    for kw in calls:
        if row_amax:
            assert kw["mode"] is None
            spelled = torch._inductor.list_mode_options(mode) if mode else {}
            assert kw["options"] == {**spelled, **ROW_AMAX_INDUCTOR_OPTIONS}
        else:
            assert kw["mode"] == mode and kw["options"] is None


def test_compile_blocks_leaves_a_16bit_model_to_the_callers_settings(monkeypatch):
    """No W4A4 layers, no row maxima: the BF16 + compile baseline compiles as asked."""
    model = build_expert(dict(TINY_EXPERT), False, torch.device("cpu"), wanquant_preset())
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    compile_blocks(model, mode="max-autotune-no-cudagraphs")
    uncompile_blocks(model)
    assert calls and all(kw["mode"] == "max-autotune-no-cudagraphs" and kw["options"] is None for kw in calls)


def test_moving_the_gelu_changes_no_number_and_no_key(expert):
    """On the reference path the down projection applies torch's GELU itself: the expert's
    output is bit-identical, its state_dict keys unchanged, and restoring gives the module back."""
    from diffusers.models.activations import GELU

    from wanquant.model.ffn_gelu import ProjectionOnly, move_gelu, restore_gelu

    model, inputs = expert
    set_backend(model, "reference")
    want = _run(model, inputs, 950.0)
    keys = list(model.state_dict())
    assert all(move_gelu(b) for b in model.blocks)
    assert all(isinstance(b.ffn.net[0], ProjectionOnly) and b.ffn.net[2].gelu_input for b in model.blocks)
    assert list(model.state_dict()) == keys
    assert torch.equal(_run(model, inputs, 950.0), want)
    for b in model.blocks:
        restore_gelu(b)
    assert all(type(b.ffn.net[0]) is GELU and not b.ffn.net[2].gelu_input for b in model.blocks)
    assert torch.equal(_run(model, inputs, 950.0), want)


def test_compiled_block_with_the_gelu_in_the_activation_kernel(expert, monkeypatch):
    """compile_blocks(gelu_in_activation=True): one graph, no breaks, the reference's output
    (the CPU op applies torch's GELU before the references of the three steps); undone by
    uncompile_blocks."""
    from diffusers.models.activations import GELU

    model, inputs = expert
    set_self_attention(model, "int8_reference")
    set_backend(model, "reference")
    want = _run(model, inputs, 950.0)
    _prepare_fast(model, monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend="aot_eager", fullgraph=True, gelu_in_activation=True)
    assert all(b.ffn.net[2].gelu_input for b in model.blocks)
    got = _run(model, inputs, 950.0)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    assert relative_error(got, want) < 2e-2
    uncompile_blocks(model)
    assert all(type(b.ffn.net[0]) is GELU and not b.ffn.net[2].gelu_input for b in model.blocks)


def test_compiled_block_with_the_gelu_in_the_gemm_epilogue(expert, monkeypatch):
    """compile_blocks(gelu_in_epilogue=True): the feed-forward traces to one
    ``wanquant::w4a4_linear_gelu`` node and a ``w4a4_linear`` given its row maxima, no graph
    breaks, and (the CPU ops being the same references) the stock compiled block's output bit
    for bit; uncompile_blocks restores the stock forward."""
    from wanquant.model.ffn_gelu import _epilogue_forward

    model, inputs = expert
    set_self_attention(model, "int8_reference")
    _prepare_fast(model, monkeypatch)
    targets = []

    def recording(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compile_blocks(model, backend="aot_eager", fullgraph=True)
    want = _run(model, inputs, 950.0)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend=recording, fullgraph=True, gelu_in_epilogue=True)
    assert all(b.ffn.forward.__func__ is _epilogue_forward for b in model.blocks)
    got = _run(model, inputs, 950.0)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    assert targets.count("wanquant.w4a4_linear_gelu.default") == 1
    assert not any("gelu" in t and "wanquant" not in t for t in targets)  # no GELU of its own
    assert torch.equal(got, want)
    uncompile_blocks(model)
    assert all("forward" not in b.ffn.__dict__ for b in model.blocks)
    with pytest.raises(ValueError, match="not both"):
        compile_blocks(model, gelu_in_activation=True, gelu_in_epilogue=True)
