"""wanquant.model.outliers: the AdaLN channel transplant leaves the 16-bit model's output
unchanged while its quantized linears see massive channels; and the statistics that show it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from benchmarks import outlier_stats as S
from conftest import build_tiny_pipeline
from wanquant.model import outliers as O


def _inputs(expert, seed: int):
    g = torch.Generator().manual_seed(seed)
    cfg = expert.config
    x = torch.randn(1, cfg.in_channels, 2, 8, 8, generator=g)
    enc = torch.randn(1, 6, cfg.text_dim, generator=g)
    t = torch.rand(1, generator=g) * 999
    return x, t, enc


def _consumer_inputs(expert, x, t, enc) -> dict[str, torch.Tensor]:
    """The inputs of attn1.to_q / ffn.net[0].proj / attn2.to_q of every block, from one forward."""
    seen, hs = {}, []
    for i, b in enumerate(expert.blocks):
        for name, mod in (("q", b.attn1.to_q), ("ffn", b.ffn.net[0].proj), ("q2", b.attn2.to_q)):
            hs.append(mod.register_forward_pre_hook(lambda m, a, k=f"{i}.{name}": seen.__setitem__(k, a[0].clone())))
    with torch.no_grad():
        y = expert(x, t, enc, return_dict=False)[0]
    for h in hs:
        h.remove()
    seen["out"] = y
    return seen


@pytest.fixture(scope="module")
def experts():
    pipe = build_tiny_pipeline(seed=3)
    return {"transformer": pipe.transformer.eval(), "transformer_2": pipe.transformer_2.eval()}


def test_transplant_keeps_output_and_scales_exactly_the_chosen_channels(experts):
    dim = experts["transformer"].blocks[0].scale_shift_table.shape[-1]
    rng = np.random.default_rng(7)
    channels = tuple(int(c) for c in rng.choice(dim, 3, replace=False))
    alphas = (1000.0, 250.0, 100.0)
    for seed, expert in enumerate(experts.values()):
        moved = copy.deepcopy(expert)
        O.transplant(moved, O.OutlierProfile(channels, alphas))
        x, t, enc = _inputs(expert, seed)
        ref, got = _consumer_inputs(expert, x, t, enc), _consumer_inputs(moved, x, t, enc)
        # The model's output: unchanged up to fp32 rounding.
        rel = (got["out"] - ref["out"]).norm() / ref["out"].norm()
        assert rel < 1e-5, rel
        others = [c for c in range(dim) if c not in channels]
        for k in ref:
            if k == "out":
                continue
            if k.endswith("q2"):  # attn2 reads the affine norm2, no modulation: untouched
                torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5)
                continue
            # Modulated inputs: channel j exactly alpha_j times larger, every other channel the same.
            for c, a in zip(channels, alphas):
                torch.testing.assert_close(got[k][..., c], a * ref[k][..., c], rtol=1e-4, atol=1e-4 * a)
            torch.testing.assert_close(got[k][..., others], ref[k][..., others], rtol=1e-5, atol=1e-5)


def test_transplant_in_bf16_stays_within_bf16_rounding(experts):
    """In bf16 the transplanted model differs from the original by no more than bf16 itself
    differs from fp32 (rounding, not a changed function)."""
    expert = experts["transformer"]
    moved = copy.deepcopy(expert)
    O.transplant(moved, O.OutlierProfile((1, 5), (800.0, 120.0)))
    x, t, enc = _inputs(expert, 11)
    with torch.no_grad():
        ref32 = expert(x, t, enc, return_dict=False)[0]
        a16 = copy.deepcopy(expert).to(torch.bfloat16)(x.bfloat16(), t, enc.bfloat16(), return_dict=False)[0].float()
        b16 = copy.deepcopy(moved).to(torch.bfloat16)(x.bfloat16(), t, enc.bfloat16(), return_dict=False)[0].float()
    err_orig = (a16 - ref32).norm() / ref32.norm()
    err_moved = (b16 - ref32).norm() / ref32.norm()
    assert err_orig < 0.05
    assert err_moved < 3 * err_orig + 1e-3, (err_moved, err_orig)


def test_modulation_matches_the_block_and_channel_choice(experts):
    expert = experts["transformer_2"]
    t = torch.tensor([100.0, 500.0, 850.0])
    m = O.modulation(expert, t)
    assert m.shape == (len(expert.blocks), 3, 6, expert.blocks[0].scale_shift_table.shape[-1])
    # Independent: diffusers' own condition embedder gives the same time projection.
    enc = torch.zeros(1, 4, expert.config.text_dim)
    with torch.no_grad():
        proj = torch.cat([expert.condition_embedder(ti[None], enc)[1] for ti in t]).unflatten(-1, (6, -1))
    torch.testing.assert_close(m[0], expert.blocks[0].scale_shift_table[0] + proj, rtol=1e-5, atol=1e-5)
    size = O.modulated_size(expert, torch.linspace(1, 899, 8))
    ratio = size.amax(0) / size.amin(0)
    picked = O.pick_channels(expert, 3, (1, 899), num_timesteps=8)
    assert set(picked) == set(ratio.topk(3).indices.tolist())
    assert not set(O.pick_channels(expert, 3, (1, 899), exclude=picked, num_timesteps=8)) & set(picked)
    prof = O.default_profiles(experts)
    assert not set(prof["transformer"].channels) & set(prof["transformer_2"].channels)
    assert all(100 <= a <= 1000 for p in prof.values() for a in p.alphas)


def test_bad_profiles_are_refused(experts):
    with pytest.raises(ValueError, match="one alpha per channel"):
        O.OutlierProfile((1, 2), (10.0,))
    with pytest.raises(ValueError, match="positive"):
        O.OutlierProfile((1,), (0.0,))
    with pytest.raises(ValueError, match="distinct"):
        O.OutlierProfile((1, 1), (2.0, 3.0))
    with pytest.raises(ValueError, match="outside the hidden size"):
        O.transplant(copy.deepcopy(experts["transformer"]), O.OutlierProfile((10_000,), (2.0,)))


def test_write_outlier_testbed_roundtrip(tmp_path, experts):
    from diffusers import WanTransformer3DModel

    pipe = build_tiny_pipeline(seed=3)
    pipe.save_pretrained(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        O.write_outlier_testbed(tmp_path / "nothing", tmp_path / "dst")
    prof = O.write_outlier_testbed(tmp_path / "src", tmp_path / "dst")
    assert O.read_profiles(tmp_path / "dst") == prof
    with pytest.raises(FileExistsError, match="overwrite"):
        O.write_outlier_testbed(tmp_path / "src", tmp_path / "dst")
    for name in ("transformer", "transformer_2"):
        a = WanTransformer3DModel.from_pretrained(tmp_path / "src" / name).eval()
        b = WanTransformer3DModel.from_pretrained(tmp_path / "dst" / name).eval()
        x, t, enc = _inputs(a, 5)
        ra, rb = _consumer_inputs(a, x, t, enc), _consumer_inputs(b, x, t, enc)
        assert (rb["out"] - ra["out"]).norm() / ra["out"].norm() < 1e-5
        amax = rb["0.ffn"].abs().amax(dim=(0, 1))
        assert int(amax.argmax()) == prof[name].channels[0]


# ----------------------------------------------------------------------- statistics


def test_kurtosis_and_profile_helpers_match_references():
    from scipy import stats

    rng = np.random.default_rng(0)
    for x in (rng.standard_normal(5000), rng.standard_t(5, 5000) + 3.0, rng.exponential(2.0, 3000)):
        sums = [len(x), *(float((x ** k).sum()) for k in range(1, 5))]
        assert S.kurtosis_from_moments(*sums) == pytest.approx(stats.kurtosis(x, fisher=False), rel=1e-6)
    a = rng.random(16)
    assert S.cosine_distance(a, 3 * a) == pytest.approx(0.0, abs=1e-12)
    assert S.cosine_distance(np.eye(4)[0], np.eye(4)[1]) == pytest.approx(1.0)
    prof = np.ones(9)
    prof[4] = 500.0
    assert S.max_median_ratio(prof) == 500.0
    # Bins: the first step of each expert is bin 0, its last bin 2.
    assert S.bin_of(999.0, "transformer") == 0 and S.bin_of(901.0, "transformer") == 2
    assert S.bin_of(899.0, "transformer_2") == 0 and S.bin_of(10.0, "transformer_2") == 2


def test_collect_sees_the_transplanted_channels(experts):
    from conftest import TINY_SETTINGS
    from wanquant.testbed.dataset import list_samples

    pipe = build_tiny_pipeline(seed=3)
    samples = list_samples("calib", 1, num_frames=TINY_SETTINGS.num_frames, height=TINY_SETTINGS.height,
                           width=TINY_SETTINGS.width)
    plain = S.summarize(S.collect(pipe, samples, TINY_SETTINGS))
    prof = {"transformer": O.OutlierProfile((3,), (500.0,)), "transformer_2": O.OutlierProfile((7,), (300.0,))}
    for name, p in prof.items():
        O.transplant(getattr(pipe, name), p)
    moved = S.summarize(S.collect(pipe, samples, TINY_SETTINGS))
    for name, p in prof.items():
        rows = {r["layer"]: r for r in moved["layers"] if r["expert"] == name}
        base = {r["layer"]: r for r in plain["layers"] if r["expert"] == name}
        assert rows["0.ffn.net.0.proj"]["top_channel"] == p.channels[0]
        assert rows["0.attn1.to_q"]["max_over_median"] > 20 * base["0.attn1.to_q"]["max_over_median"]
        assert rows["0.attn2.to_q"]["max_over_median"] == pytest.approx(base["0.attn2.to_q"]["max_over_median"],
                                                                         rel=1e-3)
        assert p.channels[0] in moved["experts"][name]["frequent_top_channels"]
    assert moved["shared_top_channels"] == []


def test_the_trained_testbed_transplanted_keeps_its_output():
    """On the committed testbed with the default profiles: outputs agree to fp32 rounding,
    and the FFN input of every block now has a channel hundreds of times its median."""
    from diffusers import WanTransformer3DModel

    from wanquant.testbed import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "model_index.json").is_file():
        pytest.skip("trained testbed weights not present")
    experts = {n: WanTransformer3DModel.from_pretrained(WEIGHTS_DIR / n).eval() for n in O.EXPERT_TIMESTEPS}
    prof = O.default_profiles(experts)
    for seed, (name, expert) in enumerate(experts.items()):
        moved = copy.deepcopy(expert)
        O.transplant(moved, prof[name])
        x, _, enc = _inputs(expert, seed)
        lo, hi = O.EXPERT_TIMESTEPS[name]
        t = torch.tensor([(lo + hi) / 2])
        ref, got = _consumer_inputs(expert, x, t, enc), _consumer_inputs(moved, x, t, enc)
        assert (got["out"] - ref["out"]).norm() / ref["out"].norm() < 1e-5
        for i in range(len(expert.blocks)):
            amax = got[f"{i}.ffn"].abs().amax(dim=(0, 1))
            assert amax.max() / amax.median() > 100
            assert int(amax.argmax()) in prof[name].channels
