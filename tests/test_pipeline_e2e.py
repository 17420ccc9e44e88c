"""End to end on CPU: calibrate a tiny two-expert pipeline, quantize, save, reload in a
fresh process, generate; the reloaded model reproduces the in-memory one exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, TINY_SETTINGS, build_tiny_pipeline, fast_config
from wanquant.artifacts.checkpoint import read_manifest
from wanquant.calibration.run import CalibrationRun, quantize_pipeline
from wanquant.model.pipeline import run_pipeline
from wanquant.runtime.linear import W4A4Linear
from wanquant.testbed.dataset import list_samples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, request):
    from wanquant.calibration.samples import CalibSample

    samples = [CalibSample(s.first_frame(), s.prompt, 100 + i, f"calib:{i}")
               for i, s in enumerate(list_samples("calib", 2, num_frames=5, height=32, width=32))]
    pipe = build_tiny_pipeline()
    qdir = tmp_path_factory.mktemp("e2e") / "q"
    quantize_pipeline(pipe, samples, fast_config(), CalibrationRun(TINY_SETTINGS, reservoir_tokens=512, progress=False),
                      qdir)
    return pipe, qdir


def _eval_sample():
    return list_samples("eval", 1, num_frames=5, height=32, width=32)[0]


def test_experts_saw_only_their_timesteps_and_every_bin_has_a_clip_table(quantized):
    _, qdir = quantized
    m = read_manifest(qdir)
    high, low = m["experts"]["transformer"], m["experts"]["transformer_2"]
    assert high["role"] == "high" and low["role"] == "low"
    assert high["calibration"]["timesteps"] and low["calibration"]["timesteps"]
    assert min(high["calibration"]["timesteps"]) >= 900.0
    assert max(low["calibration"]["timesteps"]) < 900.0
    for info in (high, low):
        forwards = info["calibration"]["forwards"]
        for b in range(3):  # every bin ran, in both CFG branches
            assert forwards.get(f"bin{b}/cond", 0) > 0 and forwards.get(f"bin{b}/uncond", 0) > 0
        for name, layer in info["layers"].items():
            table = np.array(layer["clip_table"])
            assert table.shape == (3, 2), name
            assert layer["report"]["clip"]["fallback_bins"] == [], name  # searched, not a fallback
            assert ((table[:, 0] > 0) & (table[:, 0] <= 1)).all()


def test_quantized_pipeline_has_w4a4_layers_and_stays_close_to_fp(quantized):
    pipe, _ = quantized
    layers = [m for m in pipe.transformer.modules() if isinstance(m, W4A4Linear)]
    assert len(layers) == 2 * 7  # 2 blocks x 7 quantized groups
    assert all(m.state.num_bins == 3 for m in layers)
    assert layers[0].state is layers[-1].state  # one shared state per expert
    assert layers[0].state is not next(m for m in pipe.transformer_2.modules() if isinstance(m, W4A4Linear)).state
    ev = _eval_sample()
    ref = run_pipeline(build_tiny_pipeline(), ev.first_frame(), ev.prompt, TINY_SETTINGS, seed=0)
    out = run_pipeline(pipe, ev.first_frame(), ev.prompt, TINY_SETTINGS, seed=0)
    assert np.isfinite(out).all()
    assert not np.array_equal(out, ref)  # it is really quantized
    assert np.abs(out - ref).mean() < 0.05


def test_reload_in_fresh_process_matches_in_memory(quantized, tmp_path):
    pipe, qdir = quantized
    ev = _eval_sample()
    expected = run_pipeline(pipe, ev.first_frame(), ev.prompt, TINY_SETTINGS, seed=0)
    out_npy = tmp_path / "frames.npy"
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import TINY_SETTINGS, build_tiny_pipeline
        from wanquant.loading import load_quantized
        from wanquant.model.pipeline import run_pipeline
        from wanquant.testbed.dataset import list_samples
        pipe = build_tiny_pipeline()
        pipe.register_modules(transformer=None, transformer_2=None)
        load_quantized(pipe, {str(qdir)!r})
        ev = list_samples("eval", 1, num_frames=5, height=32, width=32)[0]
        np.save({str(out_npy)!r}, run_pipeline(pipe, ev.first_frame(), ev.prompt, TINY_SETTINGS, seed=0))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    np.testing.assert_array_equal(np.load(out_npy), expected)


def test_inspect_lists_every_layer(quantized):
    from wanquant.api import inspect

    _, qdir = quantized
    info = inspect(qdir)
    rows = info["layers"]
    assert len(rows) == 2 * 2 * 7
    for cov in info["experts"].values():
        assert cov["complete"] and cov["quantized"] == cov["expected"] == 2 * 7 and not cov["missing"]
    assert {r["expert"] for r in rows} == {"transformer", "transformer_2"}
    assert all(r["rank"] == 8 and len(r["clip"]) == 3 and r["rel_err"] is not None for r in rows)
    assert all(0 < r["rel_err"] < 1 for r in rows)


def test_cli_inspect_and_generate(quantized, tmp_path):
    _, qdir = quantized
    r = subprocess.run([sys.executable, "-m", "wanquant.cli", "inspect", str(qdir), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["layers"]) == 28


def test_resume_skips_finished_passes(tmp_path, tiny_samples, monkeypatch):
    """A run interrupted after its first pass resumes there and ends with the same checkpoint."""
    from wanquant.calibration import passes

    settings = CalibrationRun(TINY_SETTINGS, blocks_per_pass=1, reservoir_tokens=256, progress=False)
    full = tmp_path / "full"
    quantize_pipeline(build_tiny_pipeline(), tiny_samples, fast_config(), settings, full)

    calls = {"n": 0}
    real = passes.calibrate_pass

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(passes, "calibrate_pass", flaky)
    with pytest.raises(KeyboardInterrupt):
        quantize_pipeline(build_tiny_pipeline(), tiny_samples, fast_config(), settings, out)
    assert not out.exists() and (tmp_path / "resumed.partial" / "progress.json").exists()
    calls["n"] = 10
    quantize_pipeline(build_tiny_pipeline(), tiny_samples, fast_config(), settings, out)
    assert calls["n"] == 13  # the passes after the first ran again (expert-major: transformer block 1, transformer_2 0, 1)
    a, b = read_manifest(full), read_manifest(out)
    assert {k: v["sha256"] for k, v in a["files"].items() if "safetensors" in k} == \
           {k: v["sha256"] for k, v in b["files"].items() if "safetensors" in k}
    assert not (tmp_path / "resumed.partial").exists()


def test_shared_policy_gives_both_experts_one_clip_table(tmp_path, tiny_samples):
    cfg = fast_config()
    cfg.clip.per_expert = False
    pipe = build_tiny_pipeline()
    qdir = tmp_path / "shared"
    quantize_pipeline(pipe, tiny_samples, cfg, CalibrationRun(TINY_SETTINGS, reservoir_tokens=256, progress=False), qdir)
    m = read_manifest(qdir)
    for name, layer in m["experts"]["transformer"]["layers"].items():
        other = m["experts"]["transformer_2"]["layers"][name]
        assert layer["clip_table"] == other["clip_table"]
        assert "clip_shared" in layer["report"]


def test_diffusers_from_pretrained_loads_the_quantized_experts(quantized):
    """The diffusers way: each expert directory loads with WanTransformer3DModel.from_pretrained."""
    import wanquant.model.diffusers_quantizer  # noqa: F401  (registers quant_method "wanquant")
    from diffusers import WanTransformer3DModel

    pipe, qdir = quantized
    ev = _eval_sample()
    expected = run_pipeline(pipe, ev.first_frame(), ev.prompt, TINY_SETTINGS, seed=0)
    experts = {a: WanTransformer3DModel.from_pretrained(str(qdir / a), torch_dtype=torch.float32)
               for a in ("transformer", "transformer_2")}
    fresh = build_tiny_pipeline()
    fresh.register_modules(**experts)
    assert isinstance(fresh.transformer.blocks[0].attn1.to_qkv, W4A4Linear)
    assert fresh.transformer.blocks[0].attn1.to_qkv.smooth.dtype == torch.float32  # not cast
    np.testing.assert_array_equal(run_pipeline(fresh, ev.first_frame(), ev.prompt, TINY_SETTINGS, seed=0), expected)


def test_single_expert_text_to_video_pipeline(tmp_path, tiny_samples):
    """A one-expert Wan pipeline (T2V, as Wan2.1) calibrates, quantizes and reloads too."""
    from diffusers import WanPipeline

    from wanquant.loading import load_quantized
    from wanquant.model.testbed import TestbedConfig, build_expert

    i2v = build_tiny_pipeline()
    torch.manual_seed(3)
    cfg = TestbedConfig(**TINY)
    expert = build_expert(cfg)
    # Text-to-video reads only the noisy latents: in_channels = z_dim.
    expert.patch_embedding = torch.nn.Conv3d(cfg.z_dim, cfg.dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    expert.register_to_config(in_channels=cfg.z_dim)
    t2v = WanPipeline(tokenizer=i2v.tokenizer, text_encoder=i2v.text_encoder, vae=i2v.vae, scheduler=i2v.scheduler,
                      transformer=expert.float())
    qdir = tmp_path / "t2v"
    quantize_pipeline(t2v, tiny_samples[:1], fast_config(),
                      CalibrationRun(TINY_SETTINGS, reservoir_tokens=128, progress=False), qdir)
    m = read_manifest(qdir)
    assert list(m["experts"]) == ["transformer"] and m["experts"]["transformer"]["role"] == "single"
    expected = run_pipeline(t2v, None, "a red circle", TINY_SETTINGS, seed=0)
    t2v.register_modules(transformer=None)
    load_quantized(t2v, qdir)
    np.testing.assert_array_equal(run_pipeline(t2v, None, "a red circle", TINY_SETTINGS, seed=0), expected)
