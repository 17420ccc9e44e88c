"""What the commands print: no spurious warnings, progress bars labelled on a terminal and
absent when stderr is redirected (no escape codes in logs)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
from conftest import fast_config

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "wanquant.cli"]
SMALL = ["--steps", "2", "--height", "32", "--width", "32", "--frames", "5", "--dtype", "fp32", "--device", "cpu"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from wanquant.testbed.dataset import list_samples

    d = tmp_path_factory.mktemp("cli_output")
    (d / "fast.json").write_text(json.dumps(fast_config().to_dict()))
    list_samples("eval", 1)[0].first_frame().save(d / "frame.png")
    return d


def _run_with_stderr_on_a_terminal(argv, cwd) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (stdout piped); returns (exit status, what stderr showed)."""
    master, slave = pty.openpty()
    # A fresh pty is 0 columns wide, which tqdm takes literally: give it a real size.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return p.wait(), b"".join(chunks).decode(errors="replace")


def test_redirected_output_has_no_warnings_and_no_progress_bars(workdir):
    q = subprocess.run(CLI + ["quantize", "--out", "q", "--config", "fast.json", "--num-samples", "1",
                              "--reservoir-tokens", "128", *SMALL], cwd=workdir, capture_output=True, text=True)
    assert q.returncode == 0, q.stderr
    g = subprocess.run(CLI + ["generate", "--quantized", "q", "--image", "frame.png", "--prompt", "a red circle",
                              "--out", "v.mp4", *SMALL], cwd=workdir, capture_output=True, text=True)
    assert g.returncode == 0, g.stderr
    for r in (q, g):
        assert "torchvision" not in r.stderr and "not used" not in r.stderr, r.stderr
        assert "\r" not in r.stderr and "\x1b[" not in r.stderr and "it/s" not in r.stderr, r.stderr


def test_on_a_terminal_the_denoising_bar_is_labelled(workdir):
    if not (workdir / "q").exists():
        pytest.skip("needs the checkpoint of the test above")
    status, err = _run_with_stderr_on_a_terminal(
        CLI + ["generate", "--quantized", "q", "--image", "frame.png", "--prompt", "a red circle", "--out", "t.mp4",
               *SMALL], workdir)
    assert status == 0, err
    assert "denoising steps" in err and "torchvision" not in err


def test_run_pipeline_labels_its_bar_and_follows_the_terminal(monkeypatch):
    from wanquant.model import pipeline

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert pipeline.show_progress(None) is False and pipeline.show_progress(True) is True
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert pipeline.show_progress(None) is True and pipeline.show_progress(False) is False
