"""No silently half-quantized checkpoints: one run per output (a lock), a checkpoint only
when every layer is there, inspect and loading that see a shortfall, manifests that
cannot be read without their checks, files with the user's umask, and an --overwrite
that never destroys what is not a wanquant output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import TINY_SETTINGS, build_tiny_pipeline, fast_config, interrupt_on_call

import wanquant.api as wq
from wanquant.artifacts.checkpoint import CheckpointError, OutputBusyError, lock_path, read_manifest, sha256_file
from wanquant.calibration import passes
from wanquant.calibration import run as run_mod
from wanquant.calibration.run import CalibrationRun, quantize_pipeline
from wanquant.loading import load_quantized

pytestmark = pytest.mark.slow
RUN = CalibrationRun(TINY_SETTINGS, reservoir_tokens=128, progress=False)
TESTS = Path(__file__).parent
LAYERS_PER_EXPERT = 2 * 7  # 2 blocks x 7 quantized groups


def _quantize(out, samples, run=RUN, **kwargs):
    return quantize_pipeline(build_tiny_pipeline(), samples[:1], fast_config(), run, out, **kwargs)


@pytest.fixture
def ckpt(tiny_ckpt):
    return tiny_ckpt


@pytest.fixture
def copy(tiny_ckpt_copy):
    return tiny_ckpt_copy


def _edit_manifest(qdir: Path, edit) -> None:
    m = json.loads((qdir / "manifest.json").read_text())
    edit(m)
    (qdir / "manifest.json").write_text(json.dumps(m))


def _holder(out: Path, then: str) -> subprocess.Popen:
    """A process that takes ``out``'s lock, says so, then runs ``then``."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from wanquant.artifacts.checkpoint import output_lock
        with output_lock({str(out)!r}):
            print("locked", flush=True)
            {then}
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


# ------------------------------------------------------------------------------ the lock

def test_a_second_run_on_the_same_output_fails_at_once(tmp_path, tiny_samples, monkeypatch):
    out = tmp_path / "q"
    holder = _holder(out, "time.sleep(120)")
    try:
        def must_not_run(*args, **kwargs):
            raise AssertionError("calibration started although the output is locked")

        monkeypatch.setattr(passes, "calibrate_pass", must_not_run)
        with pytest.raises(OutputBusyError, match=rf"another wanquant run \(pid {holder.pid} on"):
            _quantize(out, tiny_samples)
        assert not out.exists() and not (tmp_path / "q.partial").exists()
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "wanquant.cli", "quantize", "--out", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert time.perf_counter() - t0 < 60  # refused before loading the model or the calibration set
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, tiny_samples):
    out = tmp_path / "q"
    dead = _holder(out, "os.kill(os.getpid(), signal.SIGKILL)")
    assert dead.wait() == -signal.SIGKILL
    assert f"pid {dead.pid}" in lock_path(out).read_text()  # left behind, stale
    _quantize(out, tiny_samples)
    assert read_manifest(out) and not lock_path(out).exists()


# ------------------------------------------------------------- complete checkpoints only

def _interrupt_after_first_pass(tmp_path, samples, monkeypatch) -> Path:
    run = CalibrationRun(TINY_SETTINGS, blocks_per_pass=1, reservoir_tokens=128, progress=False)
    real = interrupt_on_call(monkeypatch, passes, "calibrate_pass")
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        _quantize(out, samples, run)
    monkeypatch.setattr(passes, "calibrate_pass", real)
    (tmp_path / "q.partial" / "transformer.blocks0-1.safetensors").unlink()  # a pass file lost
    return out


def test_a_lost_pass_file_is_recomputed_on_resume(tmp_path, tiny_samples, monkeypatch):
    out = _interrupt_after_first_pass(tmp_path, tiny_samples, monkeypatch)
    ran = []
    real = passes.calibrate_pass
    monkeypatch.setattr(passes, "calibrate_pass", lambda *a, **k: ran.append(1) or real(*a, **k))
    _quantize(out, tiny_samples, CalibrationRun(TINY_SETTINGS, blocks_per_pass=1, reservoir_tokens=128,
                                                progress=False))
    assert len(ran) == 4  # the lost first pass (transformer, block 0) and the three unfinished (expert-major)
    for cov in wq.inspect(out)["experts"].values():
        assert cov["complete"] and cov["quantized"] == LAYERS_PER_EXPERT


def test_finish_refuses_to_write_a_partly_quantized_checkpoint(tmp_path, tiny_samples, monkeypatch):
    out = _interrupt_after_first_pass(tmp_path, tiny_samples, monkeypatch)
    # Without the resume's repair (as before), the lost file reaches _finish: it must refuse.
    monkeypatch.setattr(run_mod, "_drop_incomplete_passes", lambda work, done, targets: done)
    with pytest.raises(CheckpointError, match=r"holds 7 of the 14 quantized layers of transformer; missing "
                                              r"blocks\.0\.attn1\.to_qkv"):
        _quantize(out, tiny_samples, CalibrationRun(TINY_SETTINGS, blocks_per_pass=1, reservoir_tokens=128,
                                                    progress=False))
    assert not out.exists()


def _drop_block0_of_transformer(qdir: Path) -> None:
    def edit(m):
        layers = m["experts"]["transformer"]["layers"]
        for name in [n for n in layers if n.startswith("blocks.0.")]:
            del layers[name]

    _edit_manifest(qdir, edit)


def test_inspect_reports_and_flags_a_shortfall(copy):
    _drop_block0_of_transformer(copy)
    experts = wq.inspect(copy)["experts"]
    assert experts["transformer"]["quantized"] == 7 and experts["transformer"]["expected"] == LAYERS_PER_EXPERT
    assert not experts["transformer"]["complete"]
    assert "blocks.0.ffn.net.2" in experts["transformer"]["missing"]
    assert experts["transformer_2"]["complete"]
    r = subprocess.run([sys.executable, "-m", "wanquant.cli", "inspect", str(copy)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "transformer (high): 7 of 14 layers quantized" in r.stdout
    assert "holds 7 of the 14" in r.stderr and "re-quantize" in r.stderr


def test_loading_refuses_a_half_quantized_checkpoint(copy):
    _drop_block0_of_transformer(copy)
    with pytest.raises(CheckpointError, match="holds 7 of the 14 quantized layers"):
        load_quantized(build_tiny_pipeline(), copy)


@pytest.mark.parametrize("key", ["files", "config"])
def test_a_manifest_without_its_files_or_config_is_refused(copy, key):
    _edit_manifest(copy, lambda m: m.pop(key))
    with pytest.raises(CheckpointError, match=rf"has no '{key}'.*restore the original manifest.json"):
        load_quantized(build_tiny_pipeline(), copy)
    with pytest.raises(CheckpointError, match=rf"has no '{key}'"):
        wq.inspect(copy, verify=False)


def test_an_edited_expert_config_is_refused(copy):
    """ffn_dim edited in the checkpoint's config.json, checksums made to agree: still refused."""
    cfg_file = copy / "transformer" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "ffn_dim": 256}))

    def resign(m):
        m["files"]["transformer/config.json"] = {"sha256": sha256_file(cfg_file), "bytes": cfg_file.stat().st_size}

    _edit_manifest(copy, resign)
    pipe = build_tiny_pipeline()
    pipe.register_modules(transformer=None, transformer_2=None)  # nothing to compare against but the checkpoint
    with pytest.raises(CheckpointError, match=r"ffn\.net\.0\.proj is 128x64 but the expert's config.json calls for "
                                              r"256x64"):
        load_quantized(pipe, copy)
    with pytest.raises(CheckpointError, match="ffn_dim"):  # and against a loaded base model
        load_quantized(build_tiny_pipeline(), copy)


# ---------------------------------------------------------------- permissions, overwrite

def test_checkpoint_files_follow_the_umask(tmp_path, tiny_samples):
    old = os.umask(0o022)
    try:
        out = _quantize(tmp_path / "q", tiny_samples)
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert all(m == (0o755 if (out / p).is_dir() else 0o644) for p, m in modes.items()), modes


def test_overwrite_never_destroys_what_is_not_a_wanquant_output(tmp_path, tiny_samples, copy):
    precious = tmp_path / "notes.txt"
    precious.write_text("my thesis")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.png").write_bytes(b"png")
    for target in (precious, folder):
        with pytest.raises(ValueError, match="not a wanquant checkpoint.*--overwrite replaces only"):
            wq.quantize(build_tiny_pipeline(), wq.load_calibration("testbed", 1), target, fast_config(),
                        TINY_SETTINGS, overwrite=True)
        r = subprocess.run([sys.executable, "-m", "wanquant.cli", "quantize", "--out", str(target), "--overwrite"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "not a wanquant checkpoint" in r.stderr
    assert precious.read_text() == "my thesis" and (folder / "cat.png").read_bytes() == b"png"
    assert not list(tmp_path.glob(".*old*"))
    before = read_manifest(copy)["calibration"]["run_id"]
    _quantize(copy, tiny_samples, overwrite=True)  # a wanquant checkpoint may be replaced
    assert read_manifest(copy)["calibration"]["run_id"] != before
