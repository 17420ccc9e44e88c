"""The testbed's training recipe (benchmarks.testbed_training) and its prompt-following
evaluation (benchmarks.common.prompt_following), on a one-block testbed (CPU, fast)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from benchmarks.common import prompt_following as PF  # a module: its testbed_config_of is no test
from conftest import TINY_ONE_BLOCK, tiny_sample

# ------------------------------------------------------------------------ prompt following


def test_testbed_config_is_recovered_from_the_pipeline(tiny_one_block):
    cfg = PF.testbed_config_of(tiny_one_block)
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "freq_dim", "text_dim",
                "text_layers", "text_heads", "text_ff", "vae_base_dim"):
        assert getattr(cfg, key) == TINY_ONE_BLOCK[key], key


def test_generate_pairs_prompts_on_one_noise(tiny_one_block):
    sample = tiny_sample()
    videos = PF.generate(tiny_one_block, sample, seed=0, steps=2, prompts=[sample.prompt, "", sample.prompt], guidance_scale=3.0)
    assert videos.shape == (3, 5, 32, 32, 3) and videos.dtype == np.uint8
    # The same prompt on the shared noise gives the same video; the seed picks the noise.
    assert np.abs(videos[0].astype(int) - videos[2]).max() <= 1
    other = PF.generate(tiny_one_block, sample, seed=1, steps=2, guidance_scale=3.0)
    assert other.shape == (1, 5, 32, 32, 3) and np.abs(videos[0].astype(int) - other[0]).mean() > 5


def test_prompt_following_evaluation_reports_every_reference(tiny_one_block):
    """One eval sample, one step: every row is measured, and the true clip's own references are exact."""
    summary = PF.evaluate_prompt_following(tiny_one_block, num_samples=1, steps=1, num_frames=5, height=32, width=32)
    rows = ("right", "shuffled", "empty", "static", "vae_recon")
    assert set(rows) <= set(summary) and summary["settings"]["num_samples"] == 1
    for name in rows:
        assert np.isfinite(summary[name]["psnr"]) and summary[name]["traj_err_px"] >= 0
    # Holding frame 0 still loses the motion that the true clip has.
    assert summary["static"]["traj_err_px"] > 0
    assert all(f"| {name} |" in PF.format_eval(summary) for name in rows)


def test_encode_prompts_matches_pipeline(tiny_one_block, monkeypatch):
    from diffusers.pipelines.wan import pipeline_wan_i2v

    # diffusers' prompt cleaning needs ftfy; a stand-in keeps the test independent of it.
    monkeypatch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda t: t), raising=False)
    prompts = [tiny_sample("eval", i).prompt for i in range(2)] + [""]
    expected = tiny_one_block._get_t5_prompt_embeds(prompts, max_sequence_length=32, device=torch.device("cpu"))
    torch.testing.assert_close(PF.encode_prompts(tiny_one_block, prompts, max_sequence_length=32), expected)


# ------------------------------------------------------------------------ training recipe


def test_condition_matches_pipeline_prepare_latents(tiny_one_block):
    from benchmarks.testbed_training import build_condition

    sample = tiny_sample()
    image = tiny_one_block.video_processor.preprocess(sample.first_frame(), height=32, width=32).float()
    _, expected = tiny_one_block.prepare_latents(image, 1, 16, 32, 32, 5, torch.float32, torch.device("cpu"))
    ours = build_condition(tiny_one_block.vae, sample.video_tensor()[0:1], 5, tiny_one_block.vae_scale_factor_temporal)
    assert ours.shape == expected.shape == (1, 20, 2, 8, 8)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_timestep_sampling_matches_expert_ranges():
    from benchmarks.testbed_training import boundary_u, sample_sigmas, sigma_to_timestep

    assert boundary_u(3.0, 0.9) == pytest.approx(0.75)
    gen = torch.Generator().manual_seed(0)
    for high in (True, False):
        s = sample_sigmas(4096, high, gen)
        t = sigma_to_timestep(s, high)
        assert ((s >= 0.9) if high else (s < 0.9)).all()
        assert (t >= 900).all() and (t <= 999).all() if high else (t <= 899).all() and (t >= 0).all()


def test_expert_training_steps_reduce_loss(tiny_one_block):
    """Data preparation and a few optimisation steps run and lower the loss on a tiny_one_block pool."""
    import copy

    from benchmarks.testbed_training import make_pool, parse_args, prepare_expert_data, train_experts

    pipe = copy.deepcopy(tiny_one_block)
    args = parse_args(["--out", "unused", "--frames", "5", "--height", "32", "--width", "32", "--steps", "25",
                       "--batch", "4", "--lr", "2e-3", "--max-sequence-length", "32", "--log-every", "5",
                       "--no-bar", "--encode-batch", "8"])
    pool, prompts = make_pool(8, 5, 32, 32, workers=1)
    data = prepare_expert_data(pipe, pool, prompts, args, torch.device("cpu"), torch.device("cpu"))
    assert data["latents"].shape == (8, 16, 2, 8, 8) and data["cond"].shape == (8, 20, 2, 8, 8)
    assert data["text"].shape[0] == len(set(prompts)) + 1
    records = train_experts(pipe, data, args, torch.device("cpu"), None)
    assert records[-1]["step"] == 25
    assert records[-1]["loss_low"] < records[0]["loss_low"]


def test_vae_training_steps_run(tiny_one_block):
    """A few VAE steps on 5-frame windows run and report their losses."""
    import copy

    from benchmarks.testbed_training import make_pool, parse_args, train_vae

    vae = copy.deepcopy(tiny_one_block.vae)
    args = parse_args(["--out", "unused", "--vae-steps", "2", "--vae-batch", "2", "--vae-frames", "5",
                       "--log-every", "1", "--no-bar"])
    pool, _ = make_pool(4, 9, 32, 32, workers=1)
    records = train_vae(vae, pool, args, torch.device("cpu"), None)
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["l1"]) for r in records)
