"""Bad input gets a clear error naming the problem, a non-zero exit, and nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, TINY_SETTINGS, build_tiny_pipeline, fast_config
from wanquant.artifacts.checkpoint import CheckpointError, read_manifest
from wanquant.calibration.run import CalibrationRun, quantize_pipeline
from wanquant.calibration.samples import load_manifest
from wanquant.loading import load_quantized

pytestmark = pytest.mark.slow


@pytest.fixture
def ckpt(tiny_ckpt):
    return tiny_ckpt


@pytest.fixture
def copy(tiny_ckpt_copy):
    return tiny_ckpt_copy


def _load(qdir, pipe=None):
    pipe = pipe or build_tiny_pipeline()
    return load_quantized(pipe, qdir)


def test_missing_directory_and_manifest(tmp_path, copy):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (copy / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        read_manifest(copy)


def test_missing_file(copy):
    (copy / "transformer_2" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        _load(copy)


def test_truncated_safetensors(copy):
    f = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or altered"):
        _load(copy)


def test_altered_safetensors_same_size(copy):
    f = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        _load(copy)


def test_unknown_format_version(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="format version 99.*upgrade wanquant"):
        _load(copy)


def test_corrupt_manifest_json(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_manifest(copy)


def test_checkpoint_for_other_weights_is_refused(copy):
    other = build_tiny_pipeline(seed=1)  # same architecture, different weights
    with pytest.raises(CheckpointError, match="different transformer weights"):
        _load(copy, other)
    ok = load_quantized(build_tiny_pipeline(seed=1), copy, allow_mismatch=True)
    assert ok.transformer is not None


def test_checkpoint_for_other_architecture_is_refused(copy):
    from wanquant.model.testbed import TestbedConfig, build_testbed_pipeline

    wider = build_testbed_pipeline(seed=0, config=TestbedConfig(**{**TINY, "ffn_dim": 256}))
    with pytest.raises(CheckpointError, match="made for another model.*ffn_dim"):
        _load(copy, wider)


def test_unreadable_image_and_empty_calibration_set(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    (tmp_path / "calib.jsonl").write_text(json.dumps({"image": "bad.png", "prompt": "a red circle"}) + "\n")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        load_manifest(tmp_path / "calib.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_manifest(tmp_path / "empty.jsonl")
    (tmp_path / "nokey.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="needs \"image\" and \"prompt\""):
        load_manifest(tmp_path / "nokey.jsonl")


def test_nan_in_weight_fails_clearly_and_writes_nothing(tmp_path, tiny_samples):
    pipe = build_tiny_pipeline()
    with torch.no_grad():
        pipe.transformer.blocks[1].ffn.net[2].weight[3, 5] = float("nan")
    out = tmp_path / "q"
    with pytest.raises(ValueError, match="NaN|Inf"):
        quantize_pipeline(pipe, tiny_samples[:1], fast_config(),
                          CalibrationRun(TINY_SETTINGS, reservoir_tokens=64, progress=False), out)
    assert not out.exists()


def test_cli_errors_exit_nonzero_with_message(tmp_path, copy):
    (tmp_path / "empty.jsonl").write_text("")
    r = subprocess.run([sys.executable, "-m", "wanquant.cli", "quantize", "--calib", str(tmp_path / "empty.jsonl"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "empty" in r.stderr
    assert not (tmp_path / "out").exists()
    f = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    r = subprocess.run([sys.executable, "-m", "wanquant.cli", "inspect", str(copy)], capture_output=True, text=True)
    assert r.returncode == 2 and "truncated" in r.stderr


def test_source_fingerprint_is_stable_across_processes():
    """Fresh interpreters (other hash seeds) fingerprint the same model identically."""
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import build_tiny_pipeline; "
            "from wanquant.artifacts.checkpoint import fingerprint_module; "
            "print(fingerprint_module(build_tiny_pipeline().transformer))")
    prints = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
              for seed in (1, 2, 3)}
    assert len(prints) == 1, prints


# ----------------------------------------------- bad arguments: named errors before any work

def _readonly_dir(tmp_path):
    """A directory this process cannot write in (root ignores chmod: use a read-only mount)."""
    from wanquant.validate import InputError, writable_location

    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    for candidate in (d, Path("/sys")):
        try:
            writable_location(candidate, "probe")
        except InputError:
            return candidate
    pytest.skip("no read-only location available to this user")


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if a command gets as far as loading a model."""
    import wanquant.api as wq

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was found")

    monkeypatch.setattr(wq, "load_base_pipeline", refuse)
    monkeypatch.setattr(wq, "load_quantized", refuse)


def _cli(capsys, *argv) -> str:
    """Run the CLI in this process; the one-line error it printed (exit status 2 asserted)."""
    from wanquant.cli import main

    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


QUANTIZE_CASES = [
    (["--steps", "0"], "--steps .* at least 1, got 0"),
    (["--steps", "-1"], "--steps .* got -1"),
    (["--steps", "-3"], "--steps .* got -3"),
    (["--blocks-per-pass", "0"], "--blocks-per-pass .* got 0"),
    (["--blocks-per-pass", "-2"], "--blocks-per-pass .* got -2"),
    (["--reservoir-tokens", "0"], "--reservoir-tokens .* got 0"),
    (["--num-samples", "0"], "--num-samples .* got 0"),
    (["--frames", "0"], "--frames .* got 0"),
    (["--height", "40"], "--height .* multiple of 16.*got 40; use 32 or 48"),
    (["--width", "50"], "--width .* multiple of 16"),
    (["--skip-blocks", "0", "1", "2", "-1"], "covers all 4 blocks: nothing would be quantized"),
    (["--calib-shards", "0"], "--calib-shards .* got 0"),
]


@pytest.mark.parametrize("argv,message", QUANTIZE_CASES, ids=[" ".join(a) for a, _ in QUANTIZE_CASES])
def test_quantize_refuses_bad_numbers_before_loading(capsys, tmp_path, no_model_loading, argv, message):
    import re

    err = _cli(capsys, "quantize", "--out", str(tmp_path / "q"), *argv)
    assert re.search(message, err), err
    assert not list(tmp_path.iterdir())  # no .partial, no lock, nothing


def _manifest(tmp_path, body: bytes) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "calib.jsonl").write_bytes(body)
    return tmp_path / "calib.jsonl"


CALIB_CASES = [
    (b'{"image": "a.png", "prompt": null}\n', r"calib.jsonl:1: \"prompt\" must be non-empty text, got None"),
    (b'{"image": "a.png", "prompt": "ok"}\n{"image": "a.png", "prompt": 5}\n', r"calib.jsonl:2: \"prompt\" must be"),
    (b'{"image": ".", "prompt": "a red circle"}\n', r"calib.jsonl:1: \"image\" '\.' is a directory"),
    (b'{"image": "a.png", "prompt": "ok"}\n{"image": "a.png", "prompt": "caf\xe9"}\n', r"calib.jsonl:2: not UTF-8"),
    (b'{"image": "a.png", "prompt": "ok", "seed": "x"}\n', r"calib.jsonl:1: \"seed\" must be a whole number"),
]


@pytest.mark.parametrize("body,message", CALIB_CASES, ids=["null prompt", "number prompt", "image dir", "latin-1",
                                                           "seed"])
def test_bad_calibration_lines_are_named(capsys, tmp_path, no_model_loading, body, message):
    import re

    from wanquant.validate import InputError

    manifest = _manifest(tmp_path, body)
    with pytest.raises(InputError, match=message):
        load_manifest(manifest)
    err = _cli(capsys, "quantize", "--calib", str(manifest), "--out", str(tmp_path / "q"))
    assert re.search(message, err), err


def test_quantize_out_on_a_read_only_location(capsys, tmp_path, no_model_loading):
    ro = _readonly_dir(tmp_path)
    err = _cli(capsys, "quantize", "--out", str(ro / "q"))
    assert f"cannot write in {ro}" in err and "writable location" in err


def test_a_partial_run_with_other_settings_is_one_clear_line(capsys, tmp_path):
    work = tmp_path / "q.partial"
    work.mkdir()
    (work / "progress.json").write_text(json.dumps({"run_id": "another-run", "done": {}}))
    err = _cli(capsys, "quantize", "--out", str(tmp_path / "q"), "--num-samples", "1", "--steps", "1",
               "--dtype", "fp32", "--device", "cpu")
    assert "holds an unfinished run with other settings" in err and "--restart" in err
    assert (work / "progress.json").exists()


GENERATE_CASES = [
    (["--steps", "0"], "--steps .* got 0"),
    (["--steps", "-1"], "--steps .* got -1"),
    (["--frames", "0"], "--frames .* got 0"),
    (["--height", "72"], "--height .* multiple of 16"),
    (["--backend", "fast", "--device", "cpu"], "--backend fast .* needs a CUDA device"),
    (["--prompt", " "], "--prompt .* non-empty text"),
    (["--quantized", "no-such-checkpoint"], "no-such-checkpoint does not exist; run `wanquant quantize` first"),
    (["--model", "no-such-model"], "no-such-model is not a diffusers pipeline directory"),
]


@pytest.mark.parametrize("argv,message", GENERATE_CASES, ids=[" ".join(a) for a, _ in GENERATE_CASES])
def test_generate_refuses_bad_arguments_before_loading(capsys, tmp_path, no_model_loading, argv, message):
    import re

    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    args = ["generate", "--image", str(tmp_path / "a.png"), "--prompt", "a red circle", "--out",
            str(tmp_path / "v.mp4"), *argv]
    err = _cli(capsys, *args)
    assert re.search(message, err), err


def test_generate_checks_its_output_path_before_loading(capsys, tmp_path, no_model_loading):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "x.mp4").mkdir()
    ro = _readonly_dir(tmp_path)
    cases = {str(tmp_path / "x.mp4"): "is a directory", str(tmp_path / "video"): "ending in one of .mp4",
             str(tmp_path / "video.gif"): "got .gif", str(ro / "v.mp4"): "cannot write in"}
    for out, message in cases.items():
        err = _cli(capsys, "generate", "--model", str(tmp_path / "no-such-model"), "--quantized", "nope",
                   "--image", str(tmp_path / "a.png"), "--prompt", "a red circle", "--out", out)
        assert message in err, (out, err)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_every_video_suffix_writes_a_playable_file_and_failures_leave_no_temp(tmp_path, monkeypatch):
    import imageio.v2 as imageio
    import numpy as np

    from wanquant.media import VIDEO_SUFFIXES, write_frame_strip, write_video

    frames = np.random.default_rng(0).random((4, 32, 32, 3))
    for suffix in VIDEO_SUFFIXES:
        path = write_video(frames, tmp_path / f"v{suffix}")
        with imageio.get_reader(path) as r:
            assert r.get_data(0).shape == (32, 32, 3), suffix

    class DiskFull:  # an encoder that dies half-way, after writing part of its file
        def __init__(self, path, **kwargs):
            Path(path).write_bytes(b"partial")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def append_data(self, frame):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(imageio, "get_writer", DiskFull)
    with pytest.raises(OSError, match="No space"):
        write_video(frames, tmp_path / "bad.mp4")
    monkeypatch.setattr("PIL.Image.Image.save", lambda self, path, *a, **k: (Path(path).write_bytes(b"x"),
                                                                             1 / 0))
    with pytest.raises(ZeroDivisionError):
        write_frame_strip(frames, tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"v{s}" for s in VIDEO_SUFFIXES)


def test_api_checks_the_same_things(tmp_path, monkeypatch):
    import dataclasses

    import wanquant.api as wq
    from wanquant.validate import InputError

    monkeypatch.setattr(wq, "run_pipeline", lambda *a, **k: pytest.fail("generated despite bad input"))
    monkeypatch.setattr(wq, "quantize_pipeline", lambda *a, **k: pytest.fail("quantized despite bad input"))
    pipe = build_tiny_pipeline()
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    bad = dataclasses.replace(TINY_SETTINGS, num_inference_steps=0)
    with pytest.raises(InputError, match="num_inference_steps"):
        wq.generate(pipe, image, "a red circle", bad)
    with pytest.raises(InputError, match="out"):
        wq.generate(pipe, image, "a red circle", TINY_SETTINGS, out=tmp_path / "video.txt")
    with pytest.raises(InputError, match="prompt"):
        wq.generate(pipe, image, None, TINY_SETTINGS)
    samples = wq.load_calibration("testbed", 1)
    for kwargs, message in (({"settings": bad}, "num_inference_steps"), ({"blocks_per_pass": 0}, "blocks_per_pass"),
                            ({"reservoir_tokens": 0}, "reservoir_tokens"), ({"shards": -1}, "shards")):
        with pytest.raises(InputError, match=message):
            wq.quantize(pipe, samples, tmp_path / "q", fast_config(), **{"settings": TINY_SETTINGS, **kwargs})
    with pytest.raises(InputError, match="count"):
        wq.load_calibration("testbed", 0)
    with pytest.raises(InputError, match="prompt"):
        wq.quantize(pipe, [dataclasses.replace(samples[0], prompt=None)], tmp_path / "q", fast_config(),
                    TINY_SETTINGS)
    with pytest.raises(ValueError, match="covers all 2 blocks"):
        cfg = fast_config()
        cfg.precision.skip_blocks = [0, 1]
        quantize_pipeline(pipe, samples, cfg, CalibrationRun(TINY_SETTINGS, progress=False), tmp_path / "q")
    assert not list(tmp_path.glob("q*"))


def test_cli_error_is_one_line_exit_2_and_debug_shows_the_traceback(tmp_path):
    base = [sys.executable, "-m", "wanquant.cli"]
    args = ["generate", "--image", "x.png", "--prompt", "p", "--out", str(tmp_path / "v.mp4"), "--steps", "0"]
    r = subprocess.run(base + args, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "wanquant generate: error: --steps (num_inference_steps) must be a whole number of at least 1, got 0"]
    r = subprocess.run(base + ["--debug"] + args, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr
