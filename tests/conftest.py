"""Shared fixtures: a tiny two-expert Wan2.2-form I2V pipeline built locally (no downloads)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

# Subprocesses (CLI tests) inherit this; see the set_num_threads note below.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from wanquant.method.config import ClipConfig, GPTQConfig, LowRankConfig, QuantConfig, SmoothConfig
from wanquant.model.pipeline import GenerationSettings

# Tiny tensors run fastest on one thread, and a loaded 2-core machine punishes more.
torch.set_num_threads(1)

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=64,
            text_layers=1, text_heads=2, text_ff=128, vae_base_dim=16, height=32, width=32, num_frames=5,
            max_sequence_length=32)
# Twelve steps with flow shift 3 and boundary 0.9 visit every timestep bin of both experts.
TINY_SETTINGS = GenerationSettings(height=32, width=32, num_frames=5, num_inference_steps=12, guidance_scale=3.0,
                                   max_sequence_length=32)


def build_tiny_pipeline(seed: int = 0):
    from wanquant.model.testbed import TestbedConfig, build_testbed_pipeline

    pipe = build_testbed_pipeline(seed=seed, config=TestbedConfig(**TINY))
    return pipe.to("cpu", torch.float32)


def fast_config() -> QuantConfig:
    """The full method with small grids, so CPU tests stay quick."""
    return QuantConfig(smooth=SmoothConfig(alpha_grid=[0.4, 0.6]), lowrank=LowRankConfig(rank=8),
                       gptq=GPTQConfig(block_size=32), clip=ClipConfig(clip_ratios=[0.8, 1.0], exp_offsets=[0, 1],
                                                                        max_tokens=512))


@pytest.fixture
def seed() -> int:
    """A fresh torch seed for the test, printed so a failure can be reproduced."""
    s = int(os.environ.get("WANQUANT_TEST_SEED", secrets.randbelow(2**31)))
    torch.manual_seed(s)
    print(f"torch seed {s} (reproduce with WANQUANT_TEST_SEED={s})")
    return s


@pytest.fixture
def tiny_pipe():
    return build_tiny_pipeline()


@pytest.fixture
def tiny_samples():
    from wanquant.calibration.samples import CalibSample
    from wanquant.testbed.dataset import list_samples

    return [CalibSample(s.first_frame(), s.prompt, 100 + i, f"calib:{i}")
            for i, s in enumerate(list_samples("calib", 2, num_frames=5, height=32, width=32))]


# One block, for tests of the testbed's architecture and training code.
TINY_ONE_BLOCK = dict(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=128, freq_dim=64,
                      text_dim=64, text_layers=1, text_heads=2, text_ff=128, vae_base_dim=8, height=32, width=32,
                      num_frames=5, max_sequence_length=32)


@pytest.fixture(scope="module")
def tiny_one_block():
    from wanquant.model.testbed import TestbedConfig, build_testbed_pipeline

    pipe = build_testbed_pipeline(seed=0, config=TestbedConfig(**TINY_ONE_BLOCK)).to("cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sample(split: str = "eval", index: int = 0):
    """A testbed clip at the tiny pipelines' size."""
    from wanquant.testbed.dataset import get_sample

    return get_sample(split, index, num_frames=5, height=32, width=32)


def quantize_tiny(out, **kwargs):
    """A checkpoint of the tiny pipeline from one calibration sample (the full method, small grids)."""
    from wanquant.calibration.run import CalibrationRun, quantize_pipeline
    from wanquant.calibration.samples import CalibSample
    from wanquant.testbed.dataset import list_samples

    samples = [CalibSample(s.first_frame(), s.prompt, 7, "c")
               for s in list_samples("calib", 1, num_frames=5, height=32, width=32)]
    run = kwargs.pop("run", CalibrationRun(TINY_SETTINGS, reservoir_tokens=128, progress=False))
    return quantize_pipeline(build_tiny_pipeline(), samples, fast_config(), run, out, **kwargs)


def interrupt_on_call(monkeypatch, module, name: str, call: int = 2):
    """Make ``module.name`` raise KeyboardInterrupt on its ``call``-th call (a simulated
    interruption); returns the original function, to put back with ``monkeypatch.setattr``."""
    real, calls = getattr(module, name), {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)
    return real


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny checkpoint shared by a test module; tests that change it take ``tiny_ckpt_copy``."""
    return quantize_tiny(tmp_path_factory.mktemp("ckpt") / "q")


@pytest.fixture(scope="module")
def tiny_quantized_pipe(tiny_ckpt):
    """The tiny pipeline with ``tiny_ckpt`` loaded (W4A4), progress bars off; one per test module."""
    from wanquant.loading import load_quantized

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    load_quantized(pipe, tiny_ckpt)
    return pipe


@pytest.fixture
def tiny_ckpt_copy(tiny_ckpt, tmp_path):
    import shutil

    dst = tmp_path / "q"
    shutil.copytree(tiny_ckpt, dst)
    return dst


# Triton decides when it is imported whether kernels (and its own library functions such as
# tl.zeros) are compiled or interpreted, so interpreter tests need TRITON_INTERPRET=1 from
# the start of a process: a parent test runs them in a child pytest, where INTERPRETING is
# True and tests marked ``interp`` run directly.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp = pytest.mark.skipif(not INTERPRETING, reason="runs inside test_interpreter_suite (TRITON_INTERPRET=1)")


def run_interpreter_suite(test_file: str, timeout: float = 1800) -> str:
    """Run ``test_file``'s tests except this runner in a child pytest under Triton's
    interpreter; fails unless they pass. Returns the child's output."""
    if INTERPRETING:
        pytest.skip("already inside the interpreter run")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
           str(Path(test_file).resolve()), "-k", "not test_interpreter_suite"]
    r = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert " passed" in last and " failed" not in last, r.stdout[-2000:]  # the child really ran tests
    return r.stdout
