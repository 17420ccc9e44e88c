"""The trained testbed: dataset, tokenizer and pipeline construction (CPU, fast).

Its training recipe is tested in test_testbed_training.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_sample

from wanquant.evaluation.metrics import psnr
from wanquant.testbed import dataset as ds
from wanquant.testbed.tokenizer import build_tokenizer

# ------------------------------------------------------------------------------ dataset


def test_dataset_is_deterministic():
    a, b = ds.get_sample("train", 7), ds.get_sample("train", 7)
    assert a.prompt == b.prompt and np.array_equal(a.frames, b.frames) and np.array_equal(a.centres, b.centres)
    c = ds.get_sample("train", 8)
    assert not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (ds.DEFAULT_FRAMES, ds.DEFAULT_SIZE, ds.DEFAULT_SIZE, 3) and a.frames.dtype == np.uint8
    v = a.video_tensor()
    assert v.shape == (ds.DEFAULT_FRAMES, 3, ds.DEFAULT_SIZE, ds.DEFAULT_SIZE) and -1 <= v.min() and v.max() <= 1


def test_splits_are_disjoint():
    ranges = sorted((first, first + size) for first, size in ds.SPLITS.values())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(ranges, ranges[1:]))
    seeds = {s: {ds.split_seed(s, i) for i in range(50)} for s in ds.SPLITS}
    assert not (seeds["train"] & seeds["calib"]) and not (seeds["train"] & seeds["eval"])
    assert not (seeds["calib"] & seeds["eval"])
    with pytest.raises(IndexError):
        ds.split_seed("calib", ds.SPLITS["calib"][1])
    with pytest.raises(KeyError):
        ds.split_seed("test", 0)
    assert [s.index for s in ds.list_samples("eval", 3, start=2)] == [2, 3, 4]


def test_prompts_use_the_closed_vocabulary():
    words = set(ds.PROMPT_WORDS)
    for s in ds.list_samples("train", 40, num_frames=3, height=32, width=32):
        assert set(s.prompt.split()) <= words
        for obj in s.spec.objects:
            assert obj.phrase() in s.prompt


def test_palettes_are_separable():
    """Object colours stay far from every background tone (the trajectory metric needs it)."""
    tones = [np.array(t) for pair in ds.BACKGROUND_COLOURS.values() for t in pair]
    for rgb in ds.OBJECT_COLOURS.values():
        assert min(np.linalg.norm(np.array(rgb) - t) for t in tones) > 100


def test_ground_truth_of_a_constructed_clip():
    """A red circle moving right quickly: known positions, a bounce, and a centroid that finds it."""
    obj = ds.ObjectSpec("circle", "red", "small", start=(0.5, 0.5), direction="right", speed="quickly")
    spec = ds.ClipSpec((obj,), ds.BackgroundSpec("grey", "plain"))
    frames, centres, radii = ds.render_clip(spec, num_frames=17, height=64, width=64)
    r = ds.SIZES["small"] * 64
    v = ds.SPEEDS["quickly"] * 64
    lo, hi = r, 64 - r
    x = lo + 0.5 * (hi - lo)
    expected = []
    for _ in range(17):  # straight-line motion reflected at the right wall
        expected.append(x)
        x += v
        if x > hi:
            x, v = 2 * hi - x, -v
    np.testing.assert_allclose(centres[0, :, 0], expected, atol=1e-9)
    np.testing.assert_allclose(centres[0, :, 1], 32.0)
    assert np.all(np.diff(centres[0, :, 0])[-3:] < 0), "the circle must have bounced off the right wall"
    np.testing.assert_allclose(radii[0], r)
    found, ok = ds.colour_centroids(frames, ds.OBJECT_COLOURS["red"])
    assert ok.all()
    np.testing.assert_allclose(found, centres[0], atol=0.3)  # hard colour threshold: sub-pixel
    sample = ds.Sample("eval", 0, 0, spec, spec.prompt(), frames, centres, radii, [obj.rgb])
    assert sample.prompt == "a small red circle moves right quickly over a grey plain background"
    assert ds.trajectory_error(frames, sample)["traj_err_px"] < 0.3
    still = np.repeat(frames[:1], 17, axis=0)
    assert ds.trajectory_error(still, sample)["traj_err_px"] > 5
    empty = np.full_like(frames, 80)
    res = ds.trajectory_error(empty, sample)
    assert res["missing_frac"] == 1.0 and res["traj_err_px"] == pytest.approx(16.0)
    assert psnr(frames, frames, skip_first=True) > 100 and psnr(still, frames, skip_first=True) < 40


def test_every_shape_centroid_is_its_centre():
    for shape in ds.SHAPES:
        obj = ds.ObjectSpec(shape, "yellow", "large", start=(0.3, 0.6), direction="down-left", speed="slowly",
                            extra="spinning" if shape != "circle" else "growing")
        spec = ds.ClipSpec((obj,), ds.BackgroundSpec("navy", "striped", period=0.2))
        frames, centres, _ = ds.render_clip(spec, num_frames=9, height=64, width=64)
        found, ok = ds.colour_centroids(frames, obj.rgb)
        assert ok.all()
        assert np.abs(found - centres[0]).max() < 0.5, shape  # within the thresholding half pixel


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_save_load(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer(max_length=512)
    prompt = ds.get_sample("train", 3).prompt
    enc = tok([prompt, ""], padding="max_length", max_length=512, truncation=True, add_special_tokens=True,
              return_attention_mask=True, return_tensors="pt")
    assert enc.input_ids.shape == (2, 512)
    n = len(prompt.split())
    assert enc.attention_mask[0].sum() == n + 1 and enc.input_ids[0, n] == tok.eos_token_id == 1
    assert enc.input_ids[1, 0] == 1 and enc.attention_mask[1].sum() == 1
    assert tok.pad_token_id == 0 and int(enc.input_ids[0, n + 1:].max()) == 0
    assert tok.decode(enc.input_ids[0], skip_special_tokens=True) == prompt
    assert tok("A RED Zebra").input_ids == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("red"),
                                           tok.unk_token_id, 1]
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back(prompt).input_ids == tok(prompt).input_ids and len(back) == len(tok)


# ----------------------------------------------------------------------------- pipeline


def test_untrained_pipeline_has_the_a14b_i2v_layout(tiny_one_block):
    assert tiny_one_block.transformer.config.in_channels == 36 and tiny_one_block.transformer.config.out_channels == 16
    assert tiny_one_block.transformer.config.image_dim is None and tiny_one_block.config.boundary_ratio == 0.9


def test_experts_run_on_their_timesteps(tiny_one_block):
    seen = {"transformer": [], "transformer_2": []}
    hooks = [getattr(tiny_one_block, name).register_forward_pre_hook(
        lambda mod, args, kwargs, name=name: seen[name].append(float(kwargs["timestep"][0])), with_kwargs=True)
        for name in seen]
    try:
        sample = tiny_sample()
        tiny_one_block(image=sample.first_frame(), prompt_embeds=torch.zeros(1, 32, 64), height=32, width=32, num_frames=5,
             num_inference_steps=12, guidance_scale=1.0, output_type="latent")
    finally:
        for h in hooks:
            h.remove()
    timesteps = [float(t) for t in tiny_one_block.scheduler.timesteps]
    assert sorted(seen["transformer"] + seen["transformer_2"], reverse=True) == timesteps
    assert seen["transformer"] and seen["transformer_2"]
    assert min(seen["transformer"]) >= 900 and max(seen["transformer_2"]) < 900


def test_load_testbed_pipeline_reports_missing_weights(tmp_path):
    from wanquant.model.testbed import load_testbed_pipeline

    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline directory"):
        load_testbed_pipeline(path=tmp_path)


def test_committed_weights_load():
    from wanquant.model.testbed import WEIGHTS_DIR, load_testbed_pipeline

    if not (WEIGHTS_DIR / "model_index.json").is_file():
        pytest.skip("trained testbed weights not present")
    pipe = load_testbed_pipeline()
    assert pipe.transformer.config.in_channels == 36 and pipe.transformer_2 is not None
    assert pipe.config.boundary_ratio == 0.9 and pipe.vae.config.latents_std != [1.0] * 16
    assert pipe.tokenizer("a red circle").input_ids[-1] == 1
