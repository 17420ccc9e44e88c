"""A model directory loaded by path, as a real user loads Wan2.2: with a quantized
checkpoint the 16-bit experts are never read; the VAE and the defaults follow the model,
not the way it was named."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_SETTINGS, build_tiny_pipeline, fast_config

import wanquant.api as wq
from wanquant.testbed.dataset import list_samples

pytestmark = pytest.mark.slow
EXPERTS = ("transformer", "transformer_2")
# 4 steps are enough to compare two loadings bit for bit, and stay quick.
SETTINGS = dataclasses.replace(TINY_SETTINGS, num_inference_steps=4)


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    """A tiny two-expert diffusers directory and a checkpoint quantized from it (loaded by path)."""
    root = tmp_path_factory.mktemp("by_path")
    build_tiny_pipeline().save_pretrained(root / "model")
    pipe = wq.load_base_pipeline(root / "model", dtype=torch.float32)
    samples = wq.load_calibration("testbed", 1)
    samples = [dataclasses.replace(s, image=s.image.resize((32, 32))) for s in samples]
    wq.quantize(pipe, samples, root / "q", fast_config(), SETTINGS, reservoir_tokens=128, progress=False)
    ev = list_samples("eval", 1, num_frames=5, height=32, width=32)[0]
    expected = wq.generate(pipe, ev.first_frame(), ev.prompt, SETTINGS, progress=False)
    return root / "model", root / "q", ev, expected


def _corrupt_experts(model_dir) -> None:
    """Overwrite the 16-bit experts' weights with bytes no loader can parse."""
    for attr in EXPERTS:
        f = model_dir / attr / "diffusion_pytorch_model.safetensors"
        f.write_bytes(b"\x00not a safetensors file" * 64)


@pytest.fixture
def corrupted_model(model_and_checkpoint, tmp_path):
    import shutil

    model_dir, qdir, ev, expected = model_and_checkpoint
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    _corrupt_experts(copy)
    return copy, qdir, ev, expected


def test_with_experts_false_never_reads_the_experts_weights(corrupted_model):
    model_dir, qdir, ev, expected = corrupted_model
    with pytest.raises(OSError, match="Unable to load weights"):  # the control: these files cannot be read
        wq.load_base_pipeline(model_dir, dtype=torch.float32)
    pipe = wq.load_base_pipeline(model_dir, dtype=torch.float32, with_experts=False)
    assert pipe.transformer is None and pipe.transformer_2 is None
    wq.load_quantized(pipe, qdir)
    frames = wq.generate(pipe, ev.first_frame(), ev.prompt, SETTINGS, progress=False)
    np.testing.assert_array_equal(frames, expected)


def test_cli_generate_by_path_with_a_checkpoint_never_reads_the_experts(corrupted_model, tmp_path):
    model_dir, qdir, ev, _ = corrupted_model
    image = tmp_path / "first.png"
    ev.first_frame().save(image)
    out = tmp_path / "video.mp4"
    r = subprocess.run([sys.executable, "-m", "wanquant.cli", "generate", "--model", str(model_dir), "--quantized",
                        str(qdir), "--image", str(image), "--prompt", ev.prompt, "--out", str(out), "--dtype", "fp32",
                        "--height", "32", "--width", "32", "--frames", "5", "--steps", "4", "--guidance", "3.0",
                        "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0 and out.with_suffix(".png").exists()


def test_checkpoint_for_another_base_config_is_refused_without_the_experts(model_and_checkpoint, tmp_path):
    """With with_experts=False the model directory's expert config still guards the load."""
    import json
    import shutil

    model_dir, qdir, _, _ = model_and_checkpoint
    other = tmp_path / "model"
    shutil.copytree(model_dir, other)
    cfg_file = other / "transformer" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "ffn_dim": 256}))
    pipe = wq.load_base_pipeline(other, dtype=torch.float32, with_experts=False)
    with pytest.raises(wq.CheckpointError, match="ffn_dim"):
        wq.load_quantized(pipe, qdir)


def test_testbed_by_name_and_by_path_is_one_model():
    """Same VAE dtype (fp32, the rule for every model) and the same defaults either way."""
    by_name = wq.load_base_pipeline("testbed", with_experts=False)
    by_path = wq.load_base_pipeline(wq.model_path("testbed"), with_experts=False)
    assert by_name.vae.dtype == by_path.vae.dtype == torch.float32
    assert wq.pipeline_defaults(by_name) == wq.pipeline_defaults(by_path) == wq.default_settings("testbed")
    assert wq.load_base_pipeline("testbed", with_experts=False, vae_dtype=None).vae.dtype == torch.bfloat16


def test_defaults_are_the_models_for_cli_and_api(model_and_checkpoint):
    from wanquant.cli import _settings, build_parser

    model_dir = model_and_checkpoint[0]
    testbed = wq.default_settings("testbed")
    assert (testbed.height, testbed.width, testbed.num_frames, testbed.max_sequence_length) == (64, 64, 17, 512)
    assert testbed.num_inference_steps == 10
    assert wq.default_settings(model_dir).num_inference_steps == 40  # Wan2.2's
    for command in ("quantize", "generate"):
        extra = ["--out", "x.mp4"] if command == "generate" else ["--out", "q"]
        if command == "generate":
            extra += ["--image", "a.png", "--prompt", "p"]
        for model, steps in (("testbed", 10), (str(model_dir), 40)):
            args = build_parser().parse_args([command, "--model", model, *extra])
            assert _settings(args).num_inference_steps == steps, (command, model)
        args = build_parser().parse_args([command, "--model", "testbed", "--steps", "0", *extra])
        assert _settings(args).num_inference_steps == 0  # given, so kept (and refused later), not the default


def test_api_generate_and_quantize_without_settings_use_the_pipelines_model(monkeypatch):
    seen = {}

    def fake_run(pipe, image, prompt, settings, seed, progress=None):
        seen["generate"] = settings
        return np.zeros((1, 8, 8, 3), np.float32)

    def fake_quantize(pipe, samples, cfg, run, out_dir, **kwargs):
        seen["quantize"] = run.settings
        return out_dir

    monkeypatch.setattr(wq, "run_pipeline", fake_run)
    monkeypatch.setattr(wq, "quantize_pipeline", fake_quantize)
    pipe = wq.load_base_pipeline("testbed", with_experts=False)
    wq.generate(pipe, list_samples("eval", 1)[0].first_frame(), "a red circle")
    wq.quantize(pipe, wq.load_calibration("testbed", 1), "unused-out")
    assert seen["generate"] == seen["quantize"] == wq.default_settings("testbed")
    assert wq.pipeline_defaults(build_tiny_pipeline()) == wq.GenerationSettings()  # built, not loaded: Wan2.2's
