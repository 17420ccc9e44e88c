"""LoRAs on W4A4 experts (DESIGN.md section 9): files in every key style, the branch math,
switching and unloading, cache invalidation, 4-step routing, bad files, the CLI.

LoRA files are written here by hand in each key style (an independent mapping of Wan's
module names), from one canonical set of factors per diffusers module.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SETTINGS, build_tiny_pipeline, fast_config
from safetensors.torch import load_file, save_file
from test_runtime import random_params

from wanquant.formats import MXFP4
from wanquant.lora.files import LoraError, read_lora
from wanquant.numerics.lora import LoraPiece, LoraTerm, extend_bias, extend_lowrank, lora_delta, merged_weight
from wanquant.method.layer import reference_forward
from wanquant.runtime.linear import W4A4Linear

# ---------------------------------------------------------------------------------------
# LoRA files in every key style
BLOCK_MODULES = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
WAN_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
             "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
             "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
             "ffn.net.2": "ffn.2"}
WAN_OUTSIDE = {"condition_embedder.text_embedder.linear_1": "text_embedding.0", "proj_out": "head.head"}


def canonical_lora(model: torch.nn.Module, rank: int, seed: int, modules: list[str], rel: float = 0.3,
                   bias: bool = False) -> dict[str, tuple]:
    """{diffusers module: (A [r, K], B [N, r], bias or None)}, fp32, ``||B A|| = rel ||W||``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in modules:
        w = model.get_submodule(name).weight.detach().float()
        a = torch.randn(rank, w.shape[1], generator=gen) / w.shape[1] ** 0.5
        b = torch.randn(w.shape[0], rank, generator=gen)
        b *= rel * w.norm() / (b @ a).norm()
        out[name] = (a, b, torch.randn(w.shape[0], generator=gen) * 0.01 if bias else None)
    return out


def block_modules(num_blocks: int) -> list[str]:
    return [f"blocks.{i}.{m}" for i in range(num_blocks) for m in BLOCK_MODULES]


def write_lora(lora: dict, path: Path, style: str, alpha_scale: float = 1.0, prefix: str = "transformer") -> Path:
    """Save ``lora`` in ``style`` so that it means ``B A`` (with ``alpha = alpha_scale * rank``
    the file stores ``B`` divided by ``alpha_scale``)."""
    sd: dict[str, torch.Tensor] = {}
    meta = None
    for name, (a, b, bias) in lora.items():
        r = a.shape[0]
        b_file = b / alpha_scale
        if style in ("diffusers", "peft", "diffusers_alpha"):
            pre = {"diffusers": prefix + ".", "diffusers_alpha": prefix + ".", "peft": "base_model.model."}[style]
            sd[f"{pre}{name}.lora_A.weight"] = a
            sd[f"{pre}{name}.lora_B.weight"] = b_file
            if bias is not None:
                sd[f"{pre}{name}.lora_B.bias"] = bias
            if style == "diffusers_alpha":
                sd[f"{pre}{name}.alpha"] = torch.tensor(alpha_scale * r)
            if style == "peft":
                meta = {"r": r, "lora_alpha": alpha_scale * r}
            continue
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            wan = f"blocks.{i}.{WAN_NAMES[rest]}"
        else:
            wan = WAN_OUTSIDE[name]
        if style == "wan":  # original Wan / lightx2v: lora_A/lora_B, biases as diff_b
            sd[f"diffusion_model.{wan}.lora_A.weight"] = a
            sd[f"diffusion_model.{wan}.lora_B.weight"] = b_file
            if alpha_scale != 1.0:
                sd[f"diffusion_model.{wan}.alpha"] = torch.tensor(alpha_scale * r)
            if bias is not None:
                sd[f"diffusion_model.{wan}.diff_b"] = bias
        elif style == "comfy":  # ComfyUI: lora_down/lora_up with alpha
            sd[f"diffusion_model.{wan}.lora_down.weight"] = a
            sd[f"diffusion_model.{wan}.lora_up.weight"] = b_file
            sd[f"diffusion_model.{wan}.alpha"] = torch.tensor(alpha_scale * r)
        elif style == "kohya":  # musubi-tuner
            key = "lora_unet_" + wan.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = a
            sd[f"{key}.lora_up.weight"] = b_file
            sd[f"{key}.alpha"] = torch.tensor(alpha_scale * r)
        else:
            raise ValueError(style)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    if meta is not None:
        (path.parent / "adapter_config.json").write_text(json.dumps(meta))
    return path


# ---------------------------------------------------------------------------------------
# pipelines
@pytest.fixture(scope="module")
def base():
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def qdir(tmp_path_factory, base):
    """Block 0 W4A4, block 1 kept 16-bit (a LoRA there runs as a hook)."""
    from wanquant.calibration.run import CalibrationRun, quantize_pipeline
    from wanquant.calibration.samples import CalibSample
    from wanquant.testbed.dataset import list_samples

    samples = [CalibSample(s.first_frame(), s.prompt, 100 + i, f"calib:{i}")
               for i, s in enumerate(list_samples("calib", 1, num_frames=5, height=32, width=32))]
    cfg = fast_config()
    cfg.precision.skip_blocks = [1]
    out = tmp_path_factory.mktemp("lora") / "q"
    quantize_pipeline(build_tiny_pipeline(), samples, cfg,
                      CalibrationRun(TINY_SETTINGS, reservoir_tokens=256, progress=False), out)
    return out


def quantized_pipe(base, qdir):
    """A fresh quantized pipeline sharing ``base``'s text encoder and VAE."""
    from wanquant.loading import load_quantized

    comps = {k: v for k, v in base.components.items() if k not in ("transformer", "transformer_2")}
    comps["scheduler"] = copy.deepcopy(base.scheduler)
    pipe = type(base)(**comps, transformer=None, transformer_2=None, boundary_ratio=base.config.boundary_ratio)
    return load_quantized(pipe, qdir)


def merged_expert(expert: torch.nn.Module, lora: dict, strength: float = 1.0) -> torch.nn.Module:
    """A copy of a 16-bit expert with the LoRA merged into its weights (fp64 products)."""
    m = copy.deepcopy(expert)
    with torch.no_grad():
        for name, (a, b, bias) in lora.items():
            lin = m.get_submodule(name)
            lin.weight += (strength * (b.double() @ a.double())).to(lin.weight.dtype)
            if bias is not None:
                lin.bias += strength * bias.to(lin.bias.dtype)
    return m


def expert_inputs(expert, seed: int, t: float):
    g = torch.Generator().manual_seed(seed)
    c = expert.config
    x = torch.randn(1, c.in_channels, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 32, c.text_dim, generator=g)
    return dict(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=ctx, return_dict=False)


def run(expert, inputs) -> torch.Tensor:
    with torch.no_grad():
        return expert(**inputs)[0].float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


T_OF = {"transformer": [990.0, 930.0], "transformer_2": [800.0, 300.0]}


# ---------------------------------------------------------------------------------------
# the math, pure
def test_extend_lowrank_against_fp64_by_hand():
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    k, n, r = 16, 12, 3
    l1, l2 = torch.randn(r, k, generator=gen).bfloat16(), torch.randn(n, r, generator=gen).bfloat16()
    s = torch.rand(k, generator=gen) + 0.5
    # A fused layer of three 4-row members: one LoRA on members 0 and 2, one on member 1 only.
    a0, b0 = torch.randn(2, k, generator=gen), torch.randn(4, 2, generator=gen)
    a2, b2 = torch.randn(3, k, generator=gen), torch.randn(4, 3, generator=gen)
    a1, b1, c1 = torch.randn(1, k, generator=gen), torch.randn(4, 1, generator=gen), torch.randn(4, generator=gen)
    terms = [LoraTerm((LoraPiece(0, a0, b0), LoraPiece(8, a2, b2)), 0.7), LoraTerm((LoraPiece(4, a1, b1, c1),), -1.5)]
    e1, e2 = extend_lowrank(l1, l2, s, terms)
    assert e1.shape == (r + 6, k) and e2.shape == (n, r + 6)
    x = torch.randn(5, k, generator=gen, dtype=torch.float64)
    xs = x / s.double()
    want = xs @ l1.double().T @ l2.double().T
    want[:, 0:4] += 0.7 * x @ a0.double().T @ b0.double().T
    want[:, 8:12] += 0.7 * x @ a2.double().T @ b2.double().T
    want[:, 4:8] += -1.5 * x @ a1.double().T @ b1.double().T
    got = xs @ e1.double().T @ e2.double().T
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # block-diagonal: member 1's LoRA columns are zero outside rows 4..8
    assert (e2[:4, r + 5:] == 0).all() and (e2[8:, r + 5:] == 0).all()
    bias = torch.randn(n, generator=gen).bfloat16()
    eb = extend_bias(bias, n, terms)
    want_b = bias.double().clone()
    want_b[4:8] += -1.5 * c1.double()
    torch.testing.assert_close(eb.double(), want_b, rtol=1e-6, atol=1e-6)  # extend_bias sums in fp32
    assert extend_bias(bias, n, terms[:1]) is bias  # no LoRA bias: the canonical tensor itself
    # lora_delta and merged_weight agree with the same hand-built sum
    w = torch.randn(n, k, generator=gen)
    d = lora_delta(x.float(), terms, n).double()
    torch.testing.assert_close(x @ merged_weight(w, terms).double().T, x @ w.double().T + d - _bias_part(terms, n),
                               rtol=1e-5, atol=1e-5)


def _bias_part(terms, n):
    b = torch.zeros(n, dtype=torch.float64)
    for t in terms:
        for p in t.pieces:
            if p.bias is not None:
                b[p.row0:p.row0 + p.rows] += t.strength * p.bias.double()
    return b


# ---------------------------------------------------------------------------------------
# one W4A4 layer
def _fused_layer(gen, n=96, k=64, rank=4):
    params = random_params(n, k, rank, 3, gen)
    return params, W4A4Linear.from_params(params, MXFP4, MXFP4)


def _piece(gen, row0, r, rows=32, k=64, bias=False):
    return LoraPiece(row0, torch.randn(r, k, generator=gen) * 0.2, torch.randn(rows, r, generator=gen) * 0.2,
                     torch.randn(rows, generator=gen) if bias else None)


def test_layer_lora_is_reference_forward_on_hand_extended_params():
    seed = random.randrange(1 << 30)
    gen = torch.Generator().manual_seed(seed)
    params, layer = _fused_layer(gen)
    pa = (_piece(gen, 0, 4), _piece(gen, 64, 2, bias=True))  # q and v of a q|k|v layer
    pb = (_piece(gen, 32, 3),)
    layer.set_lora("a", pa, 0.8)
    layer.set_lora("b", pb, 1.3)
    x = torch.randn(7, 64, generator=gen) * 2
    # Hand-extended params: L1 rows strength * A diag(s), L2 columns B in its member's rows.
    s = params.smooth.float()
    rows1 = [params.l1.float()] + [p.down.float() * s * 0.8 for p in pa] + [pb[0].down.float() * s * 1.3]
    l2 = torch.zeros(96, 4 + 9)
    l2[:, :4] = params.l2.float()
    l2[0:32, 4:8], l2[64:96, 8:10], l2[32:64, 10:13] = pa[0].up, pa[1].up, pb[0].up
    bias = params.bias.float().clone()
    bias[64:96] += 0.8 * pa[1].bias
    hand = dataclasses.replace(params, l1=torch.cat(rows1), l2=l2, bias=bias)
    for b in range(3):
        layer.state.bin_index = b
        c, o = params.clip_table[b].tolist()
        got = layer(x)
        assert torch.equal(got, reference_forward(hand, x, MXFP4, MXFP4, c, int(o))), f"seed {seed} bin {b}"
        # independent: the LoRA part alone, in fp64, is the difference to the base layer
        base = reference_forward(params, x, MXFP4, MXFP4, c, int(o))
        want = torch.zeros(7, 96, dtype=torch.float64)
        xd = x.double()
        want[:, 0:32] += 0.8 * xd @ pa[0].down.double().T @ pa[0].up.double().T
        want[:, 64:96] += 0.8 * (xd @ pa[1].down.double().T @ pa[1].up.double().T + pa[1].bias.double())
        want[:, 32:64] += 1.3 * xd @ pb[0].down.double().T @ pb[0].up.double().T
        torch.testing.assert_close((got - base).double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # canonical buffers untouched; state_dict has no LoRA
    sd = layer.state_dict()
    assert torch.equal(sd["l1"], params.l1) and torch.equal(sd["l2"], params.l2) and set(sd) == set(
        W4A4Linear.from_params(params, MXFP4, MXFP4).state_dict())


def test_layer_strength_zero_unload_and_switch_are_bit_exact():
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    params, layer = _fused_layer(gen)
    x = torch.randn(5, 64, generator=gen)
    base = layer(x)
    pa, pb = (_piece(gen, 0, 4, bias=True),), (_piece(gen, 32, 8), _piece(gen, 64, 8))
    layer.set_lora("a", pa, 1.0)
    with_a = layer(x)
    assert not torch.equal(with_a, base)
    layer.set_lora_strength("a", 0.0)
    assert torch.equal(layer(x), base)  # strength 0 = no LoRA
    layer.set_lora_strength("a", 1.0)
    assert torch.equal(layer(x), with_a)
    layer.set_lora("b", pb, 0.5)
    layer.remove_lora("a")
    fresh = W4A4Linear.from_params(params, MXFP4, MXFP4)
    fresh.set_lora("b", pb, 0.5)
    assert torch.equal(layer(x), fresh(x))  # switched = loaded fresh
    layer.remove_lora("b")
    assert torch.equal(layer(x), base) and not layer.loras  # unloaded = base


def test_unpack_bf16_backend_runs_the_loras_too():
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    params, layer = _fused_layer(gen)
    layer.set_lora("a", (_piece(gen, 32, 4, bias=True),), 30.0)  # well above the outputs' bf16 rounding
    x = torch.randn(6, 64, generator=gen)
    want = layer(x)  # reference
    layer.set_backend("unpack_bf16")
    got = layer(x)
    bare = W4A4Linear.from_params(params, MXFP4, MXFP4)
    base = bare(x)
    bare.set_backend("unpack_bf16")
    d_got, d_want = got - bare(x), want - base  # the LoRA's contribution, up to bf16 rounding
    assert (d_got - d_want).norm() < 0.05 * d_want.norm()


def test_layer_rejects_pieces_that_do_not_fit():
    gen = torch.Generator().manual_seed(0)
    _, layer = _fused_layer(gen)
    with pytest.raises(ValueError, match="input features"):
        layer.set_lora("x", (LoraPiece(0, torch.zeros(2, 32), torch.zeros(32, 2)),))
    with pytest.raises(ValueError, match="outside"):
        layer.set_lora("x", (LoraPiece(80, torch.zeros(2, 64), torch.zeros(32, 2)),))
    assert not layer.loras


def test_fit_act_launch_keeps_measured_launches_and_bounds_wide_branches():
    from wanquant.kernels import dispatch as D

    for launch in (D.ACT_LAUNCH_LARGE, D.ACT_LAUNCH_SMALL):
        for r_pad in (16, 32):
            bm, bk, bk1, nw, ns = D.fit_act_launch(launch, r_pad)
            assert (bm, bk, nw, ns) == launch and bk1 == bk
        for r_pad in (64, 128, 256, 512):
            bm, bk, bk1, nw, ns = D.fit_act_launch(launch, r_pad)
            rw = 2 * r_pad
            assert bm * rw <= D.ACT_ACC_REGS_PER_THREAD * 32 * nw
            assert ns * (bm * bk1 + bk1 * rw) * 2 <= D.ACT_SMEM_BUDGET
            assert bk1 >= 32 and bk == launch[1]


def test_lowrank_chunk_table_lists_live_chunks_in_order():
    from wanquant.kernels.gemm import lowrank_chunk_table

    l2 = torch.zeros(80, 128)  # 3 tiles of 32 rows (the last one partial), 4 chunks of 32
    l2[0:10, 0:5] = 1  # tile 0: chunk 0
    l2[40:50, 70:75] = 1  # tile 1: chunk 2
    l2[35, 127] = 1  # tile 1: chunk 3
    idx, count = lowrank_chunk_table(l2, 32, 32)
    assert count.tolist() == [1, 2, 0]
    assert idx[0, :1].tolist() == [0] and idx[1, :2].tolist() == [2, 3]


# ---------------------------------------------------------------------------------------
# files
STYLES = ["diffusers", "diffusers_alpha", "peft", "wan", "comfy", "kohya"]


@pytest.mark.parametrize("style", STYLES)
def test_every_key_style_reads_to_the_same_factors(style, base, tmp_path):
    modules = block_modules(2) + ([] if style == "kohya" else list(WAN_OUTSIDE))
    lora = canonical_lora(base.transformer, 4, 1, modules, bias=style in ("diffusers", "wan"))
    alpha = 1.0 if style == "diffusers" else 0.5
    path = write_lora(lora, tmp_path / style / "l.safetensors", style, alpha_scale=alpha)
    f = read_lora(path)
    assert f.style == {"diffusers_alpha": "diffusers", "comfy": "wan"}.get(style, style)
    assert list(f.sections) == ["transformer"]
    sec = f.sections["transformer"]
    assert sorted(sec) == sorted(modules)
    for name, (a, b, bias) in lora.items():
        got = sec[name]
        torch.testing.assert_close((got.up.double() @ got.down.double()), b.double() @ a.double(),
                                   rtol=1e-5, atol=1e-6)
        if bias is not None:
            torch.testing.assert_close(got.bias, bias)


def test_two_expert_file_and_directory(tmp_path, base):
    lora = canonical_lora(base.transformer, 2, 2, ["blocks.0.attn1.to_q"])
    lora2 = canonical_lora(base.transformer_2, 2, 3, ["blocks.1.ffn.net.2"])
    a = write_lora(lora, tmp_path / "d" / "pytorch_lora_weights.safetensors", "diffusers")
    sd = load_file(str(a))
    p2 = write_lora(lora2, tmp_path / "x" / "l2.safetensors", "diffusers", prefix="transformer_2")
    sd.update(load_file(str(p2)))
    both = tmp_path / "both.safetensors"
    save_file(sd, str(both))
    f = read_lora(both)
    assert sorted(f.sections) == ["transformer", "transformer_2"]
    assert list(f.sections["transformer_2"]) == ["blocks.1.ffn.net.2"]
    assert read_lora(tmp_path / "d").path.name == "pytorch_lora_weights.safetensors"  # a directory


def _bad(tmp_path, sd, name="bad.safetensors") -> Path:
    p = tmp_path / name
    save_file(sd, str(p))
    return p


def test_bad_files_name_the_file_and_the_key(tmp_path, base, qdir):
    pipe = quantized_pipe(base, qdir)
    from wanquant.api import load_lora

    def expect(path, *needles, exc=LoraError):
        with pytest.raises(exc) as e:
            load_lora(pipe, path)
        for needle in (str(path), *needles):
            assert needle in str(e.value), str(e.value)
        return str(e.value)

    k = "transformer.blocks.0.attn1.to_q"
    good = {f"{k}.lora_A.weight": torch.randn(4, 64), f"{k}.lora_B.weight": torch.randn(64, 4)}
    # wrong input size (a LoRA for another model size)
    msg = expect(_bad(tmp_path, {**good, f"{k}.lora_A.weight": torch.randn(4, 128)}), f"{k}.lora_A.weight", "128")
    assert "another model" in msg
    # wrong output size
    expect(_bad(tmp_path, {**good, f"{k}.lora_B.weight": torch.randn(32, 4)}, "b2.safetensors"), f"{k}.lora_B.weight")
    # rank mismatch inside the file
    expect(_bad(tmp_path, {**good, f"{k}.lora_B.weight": torch.randn(64, 3)}, "b3.safetensors"), f"{k}.lora_B.weight")
    # unknown tensor kind
    expect(_bad(tmp_path, {**good, f"{k}.lora_C.weight": torch.randn(4, 4)}, "b4.safetensors"), f"{k}.lora_C.weight")
    # a LoRA for another model (FLUX module names)
    flux = "transformer.single_transformer_blocks.0.attn.to_q"
    msg = expect(_bad(tmp_path, {f"{flux}.lora_A.weight": torch.randn(4, 64), f"{flux}.lora_B.weight":
                                 torch.randn(64, 4)}, "flux.safetensors"), f"{flux}.lora_A.weight")
    assert "another model" in msg
    # an SD-style Kohya LoRA: diffusers' converter stops at a Wan key it needs
    expect(_bad(tmp_path, {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 64),
                           "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(64, 4)},
                "sd.safetensors"), "lora_unet_")
    # half a LoRA, NaN, integer tensors
    expect(_bad(tmp_path, {f"{k}.lora_A.weight": torch.randn(4, 64)}, "half.safetensors"), f"{k}.lora_A.weight")
    expect(_bad(tmp_path, {**good, f"{k}.lora_A.weight": torch.full((4, 64), float("nan"))}, "nan.safetensors"),
           f"{k}.lora_A.weight", "NaN")
    # a non-linear module (the patch embedding is a Conv3d)
    conv = "transformer.patch_embedding"
    expect(_bad(tmp_path, {f"{conv}.lora_A.weight": torch.randn(4, 64), f"{conv}.lora_B.weight": torch.randn(64, 4)},
                "conv.safetensors"), f"{conv}.lora_A.weight", "Conv3d")
    # missing and corrupt files
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lora(pipe, tmp_path / "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    expect(corrupt, "corrupt")
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(_bad(tmp_path, good, "ok.safetensors").read_bytes()[:-100])
    expect(truncated)
    # nothing was attached by any failed load
    from wanquant.api import list_loras
    from wanquant.runtime.expert import quantized_layers

    assert list_loras(pipe) == []
    assert all(not m.loras for e in (pipe.transformer, pipe.transformer_2) for m in quantized_layers(e).values())
    assert all(not hasattr(m, "_wanquant_lora_terms") for m in pipe.transformer.modules())


# ---------------------------------------------------------------------------------------
# whole experts
@pytest.mark.parametrize("style", ["diffusers", "wan"])
def test_quantized_with_lora_is_as_close_to_16bit_with_lora_merged_as_without(style, base, qdir, tmp_path):
    """Error(W4A4 + LoRA vs 16-bit + merged LoRA) <= error(W4A4 vs 16-bit), per expert and bin."""
    from wanquant.api import load_lora

    pipe = quantized_pipe(base, qdir)
    loras = {}
    for i, attr in enumerate(("transformer", "transformer_2")):
        expert = getattr(base, attr)
        loras[attr] = canonical_lora(expert, 4, 10 + i, block_modules(2) + list(WAN_OUTSIDE), bias=True)
        load_lora(pipe, write_lora(loras[attr], tmp_path / f"{attr}.safetensors", style), strength=0.9, expert=attr)
    for attr in ("transformer", "transformer_2"):
        ref, ref_lora = getattr(base, attr), merged_expert(getattr(base, attr), loras[attr], 0.9)
        q = getattr(pipe, attr)
        for j, t in enumerate(T_OF[attr]):
            inputs = expert_inputs(ref, 100 + j, t)
            y_lora = run(q, inputs)
            err_lora = rel_err(y_lora, run(ref_lora, inputs))
            assert rel_err(run(ref_lora, inputs), run(ref, inputs)) > 0.05  # the LoRA really matters
            with _lora_off(pipe):
                err_base = rel_err(run(q, inputs), run(ref, inputs))
            print(f"{style} {attr} t={t}: err with LoRA {err_lora:.4f}, without {err_base:.4f}")
            assert err_lora <= 1.15 * err_base + 2e-3, (attr, t, err_lora, err_base)


class _lora_off:
    """Set every LoRA of the pipeline to strength 0 inside the block (exactly no LoRA)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __enter__(self):
        from wanquant.api import list_loras, set_lora_strengths

        self.saved = {r["name"]: r["strength"] for r in list_loras(self.pipe)}
        set_lora_strengths(self.pipe, {n: 0.0 for n in self.saved})

    def __exit__(self, *exc):
        from wanquant.api import set_lora_strengths

        set_lora_strengths(self.pipe, self.saved)


def test_switch_unload_and_strength_zero_on_a_pipeline(base, qdir, tmp_path):
    from wanquant.api import list_loras, load_lora, set_lora_strengths, unload_loras

    pipe = quantized_pipe(base, qdir)
    la = canonical_lora(base.transformer, 4, 20, block_modules(2) + ["proj_out"])
    lb = canonical_lora(base.transformer, 2, 21, ["blocks.0.attn1.to_k", "blocks.0.ffn.net.2", "blocks.1.attn2.to_v",
                                                  "condition_embedder.text_embedder.linear_1"], bias=True)
    pa, pb = write_lora(la, tmp_path / "a.safetensors", "diffusers"), write_lora(lb, tmp_path / "b.safetensors", "wan")
    inputs = {attr: expert_inputs(getattr(base, attr), 5, T_OF[attr][0]) for attr in T_OF}
    before = {attr: run(getattr(pipe, attr), inputs[attr]) for attr in T_OF}
    load_lora(pipe, pa, strength=0.7)
    assert [r["name"] for r in list_loras(pipe)] == ["a"]
    assert list_loras(pipe)[0]["experts"]["transformer"] == {"w4a4": 7, "16bit": 11}  # block 1 and proj_out
    with_a = {attr: run(getattr(pipe, attr), inputs[attr]) for attr in T_OF}
    assert all(not torch.equal(with_a[a], before[a]) for a in T_OF)
    set_lora_strengths(pipe, {"a": 0.0})
    assert all(torch.equal(run(getattr(pipe, a), inputs[a]), before[a]) for a in T_OF)
    set_lora_strengths(pipe, {"a": 0.7})
    assert all(torch.equal(run(getattr(pipe, a), inputs[a]), with_a[a]) for a in T_OF)
    # switch: load b, unload a == b loaded fresh into a fresh pipeline
    load_lora(pipe, pb, strength=1.2, expert="transformer")
    assert unload_loras(pipe, ["a"]) == ["a"]
    fresh = quantized_pipe(base, qdir)
    load_lora(fresh, pb, strength=1.2, expert="transformer")
    for a in T_OF:
        assert torch.equal(run(getattr(pipe, a), inputs[a]), run(getattr(fresh, a), inputs[a]))
    assert torch.equal(run(pipe.transformer_2, inputs["transformer_2"]), before["transformer_2"])  # b is high only
    # replace under the same name, then unload everything: the base model bit for bit
    load_lora(pipe, pa, name="b", replace=True)
    assert [r["name"] for r in list_loras(pipe)] == ["b"]
    with pytest.raises(ValueError, match="loaded already"):
        load_lora(pipe, pa, name="b")
    unload_loras(pipe)
    assert list_loras(pipe) == []
    assert all(torch.equal(run(getattr(pipe, a), inputs[a]), before[a]) for a in T_OF)
    assert all(not hasattr(m, "_wanquant_lora_hook") for m in pipe.transformer.modules())
    with pytest.raises(KeyError, match="no LoRA named"):
        set_lora_strengths(pipe, {"zzz": 1.0})


@pytest.mark.parametrize("target", ["blocks.0.attn2.to_k", "condition_embedder.text_embedder.linear_1"])
def test_lora_change_invalidates_the_cached_cross_attention(target, base, qdir, tmp_path):
    """The k/v cache is keyed by the context tensor: a LoRA on attn2.to_k (W4A4) or on the
    16-bit text embedder changes k/v for the same context, so the cache must go."""
    from wanquant.api import load_lora, unload_loras

    pipe = quantized_pipe(base, qdir)
    path = write_lora(canonical_lora(base.transformer, 4, 30, [target]), tmp_path / "c.safetensors", "diffusers")
    inputs = expert_inputs(base.transformer, 6, 950.0)  # the same context tensor in every call
    y0 = run(pipe.transformer, inputs)
    assert run(pipe.transformer, inputs).equal(y0)  # served from the cache
    load_lora(pipe, path, expert="transformer")
    y1 = run(pipe.transformer, inputs)
    fresh = quantized_pipe(base, qdir)
    load_lora(fresh, path, expert="transformer")
    assert torch.equal(y1, run(fresh.transformer, inputs)) and not torch.equal(y1, y0)
    unload_loras(pipe)
    assert torch.equal(run(pipe.transformer, inputs), y0)


def test_lora_on_a_16bit_pipeline_is_the_merged_model(base, tmp_path):
    from wanquant.api import load_lora, unload_loras

    pipe = build_tiny_pipeline()
    lora = canonical_lora(pipe.transformer, 4, 40, block_modules(2))  # comfy files carry no biases
    load_lora(pipe, write_lora(lora, tmp_path / "l.safetensors", "comfy"), strength=0.6, expert="both")
    inputs = expert_inputs(base.transformer, 7, 950.0)
    for attr in ("transformer", "transformer_2"):
        want = run(merged_expert(getattr(base, attr), lora, 0.6), inputs)
        torch.testing.assert_close(run(getattr(pipe, attr), inputs), want, rtol=1e-4, atol=1e-4)
    unload_loras(pipe)
    assert torch.equal(run(pipe.transformer, inputs), run(base.transformer, inputs))


# ---------------------------------------------------------------------------------------
# 4-step generation: both experts, the right bins
def test_four_steps_route_both_experts_and_use_their_bins(base, qdir, tmp_path):
    from wanquant.api import load_lora
    from wanquant.model.pipeline import run_pipeline
    from wanquant.model.wan import runtime_state
    from wanquant.runtime.expert import quantized_layers
    from wanquant.testbed.dataset import list_samples

    pipe = quantized_pipe(base, qdir)
    for attr in ("transformer", "transformer_2"):  # a distillation-style LoRA pair, one per expert
        lora = canonical_lora(getattr(base, attr), 4, 50, block_modules(2), rel=0.1)
        load_lora(pipe, write_lora(lora, tmp_path / f"{attr}.safetensors", "wan"), expert=attr)
    seen = []
    for attr in ("transformer", "transformer_2"):
        expert = getattr(pipe, attr)
        state = runtime_state(expert)
        layer = next(iter(quantized_layers(expert).values()))

        def rec(module, args, kwargs, output, attr=attr, state=state):
            t = float(kwargs["timestep"].max())
            seen.append((attr, t, state.bin_index, state.bins.bin_of(t)))

        def layer_rec(module, args, output, attr=attr):
            seen.append((attr, "layer", module.state.bin_index))

        expert.register_forward_hook(rec, with_kwargs=True)
        layer.register_forward_hook(layer_rec)
    settings = dataclasses.replace(TINY_SETTINGS, num_inference_steps=4, guidance_scale=1.0)
    ev = list_samples("eval", 1, num_frames=5, height=32, width=32)[0]
    frames = run_pipeline(pipe, ev.first_frame(), ev.prompt, settings, seed=0)
    assert np.isfinite(frames).all()
    forwards = [s for s in seen if s[1] != "layer"]
    assert len(forwards) == 4  # guidance 1: one forward a step
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    for attr, t, got, want in forwards:
        assert attr == ("transformer" if t >= boundary else "transformer_2"), (attr, t)
        assert got == want, (attr, t, got, want)
    assert {f[0] for f in forwards} == {"transformer", "transformer_2"}
    # the layers saw the bin their expert set for that step
    layer_bins = [s[2] for s in seen if s[1] == "layer"]
    assert layer_bins == [f[2] for f in forwards]
    # every bin of the checkpoint is a relative position: the first high-noise step is bin 0
    assert forwards[0][2] == 0


# ---------------------------------------------------------------------------------------
# CLI
def test_parse_lora_arg():
    from wanquant.cli import parse_lora_arg

    assert parse_lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_arg("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    assert parse_lora_arg("C:\\loras\\x.safetensors:-1") == ("C:\\loras\\x.safetensors", -1.0)
    assert parse_lora_arg("weird:name.safetensors") == ("weird:name.safetensors", 1.0)


def test_cli_generate_with_lora_pair(base, qdir, tmp_path, monkeypatch):
    from wanquant import api, cli
    from wanquant.testbed.dataset import list_samples

    hi = write_lora(canonical_lora(base.transformer, 2, 60, ["blocks.0.attn1.to_q"]), tmp_path / "hi.safetensors",
                    "diffusers")
    lo = write_lora(canonical_lora(base.transformer_2, 2, 61, ["blocks.0.ffn.net.2"]), tmp_path / "lo.safetensors",
                    "wan")
    calls = []
    real = api.load_lora

    def spy(pipe, path, **kw):
        calls.append((Path(path).name, kw["expert"], kw["strength"]))
        name = real(pipe, path, **kw)
        assert name in {r["name"] for r in api.list_loras(pipe)}
        return name

    monkeypatch.setattr(api, "load_lora", spy)
    monkeypatch.setattr(api, "load_base_pipeline", lambda *a, **k: quantized_pipe(base, qdir))
    monkeypatch.setattr(api, "load_quantized", lambda pipe, *a, **k: pipe)
    image = tmp_path / "frame.png"
    list_samples("eval", 1, num_frames=5, height=32, width=32)[0].first_frame().save(image)
    out = tmp_path / "v.mp4"
    argv = ["generate", "--quantized", str(qdir), "--image", str(image), "--prompt", "a red ball", "--out", str(out),
            "--height", "32", "--width", "32", "--frames", "5", "--steps", "2", "--guidance", "1",
            "--lora", f"{hi}:0.5", "--lora-2", str(lo), "--device", "cpu"]
    assert cli.main(argv) == 0
    assert calls == [("hi.safetensors", "transformer", 0.5), ("lo.safetensors", "transformer_2", 1.0)]
    assert out.exists()
    calls.clear()
    assert cli.main(argv[:-4] + ["--device", "cpu"]) == 0  # --lora alone: both experts
    assert calls == [("hi.safetensors", "both", 0.5)]
    # a bad file: exit code 2 and a message naming it
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    assert cli.main(argv[:-6] + ["--lora", str(bad), "--device", "cpu"]) == 2


def test_generate_help_documents_the_lora_options(capsys):
    from wanquant.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = capsys.readouterr().out
    assert "--lora PATH[:STRENGTH]" in text and "--lora-2" in text and "high-noise" in text
