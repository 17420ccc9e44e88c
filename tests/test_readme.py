"""The README's examples run as written on the embedded testbed.

A fenced ``python`` or ``bash`` block whose first line is a comment saying it "runs as
written on the embedded testbed" is run, each in a fresh directory, in README order:
python blocks with this interpreter, bash blocks with this environment's ``bin`` first on
``PATH`` (where ``wanquant`` and ``python`` are). At least one python block must be marked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = re.compile(r"^\s*#.*runs as written on the embedded testbed", re.IGNORECASE)
FENCE = re.compile(r"^```(python|bash)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def marked_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block whose first line carries the marker."""
    return [(lang, code) for lang, code in FENCE.findall(text) if MARKER.match(code.split("\n", 1)[0])]


def run_block(lang: str, code: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_marker_finds_only_marked_blocks():
    text = ("```python\n# Runs as written on the embedded testbed (CPU).\nprint(1)\n```\n"
            "```python\nprint('not marked')\n```\n```bash\n# runs as written on the embedded testbed\necho hi\n```\n")
    assert [lang for lang, _ in marked_blocks(text)] == ["python", "bash"]


def test_readme_examples_run_on_the_testbed(tmp_path):
    blocks = marked_blocks(README.read_text())
    assert any(lang == "python" for lang, _ in blocks), (
        f"no python block in {README.name} starts with a comment saying it runs as written on the embedded "
        "testbed; mark the Python API example (see this test's docstring)")
    for i, (lang, code) in enumerate(blocks):
        cwd = tmp_path / f"block{i}"
        cwd.mkdir()
        r = run_block(lang, code, cwd)
        assert r.returncode == 0, f"README {lang} block {i} failed:\n{code}\n--- stderr ---\n{r.stderr[-4000:]}"
