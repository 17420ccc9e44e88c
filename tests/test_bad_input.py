"""Bad input gets a clear error naming the problem, a non-zero exit, and nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TINY, TINY_SETTINGS, build_tiny_pipeline, fast_config
from wanquant.artifacts.checkpoint import CheckpointError, read_manifest
from wanquant.calibration.run import CalibrationRun, quantize_pipeline
from wanquant.calibration.samples import load_manifest
from wanquant.loading import load_quantized

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from wanquant.calibration.samples import CalibSample
    from wanquant.testbed.dataset import list_samples

    samples = [CalibSample(s.first_frame(), s.prompt, 7, "c") for s in list_samples("calib", 1, num_frames=5,
                                                                                     height=32, width=32)]
    qdir = tmp_path_factory.mktemp("bad") / "q"
    quantize_pipeline(build_tiny_pipeline(), samples, fast_config(),
                      CalibrationRun(TINY_SETTINGS, reservoir_tokens=128, progress=False), qdir)
    return qdir


@pytest.fixture
def copy(ckpt, tmp_path):
    dst = tmp_path / "q"
    shutil.copytree(ckpt, dst)
    return dst


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
