"""Run metadata and atomic result files, for every benchmark driver.

Every result file carries the device it ran on, the ISO date, the git commit of the
tree and the exact command line, so a number can always be traced back to its run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = BENCHMARKS_DIR.parent
RESULTS_DIR = BENCHMARKS_DIR / "results"


def _device_name() -> str:
    """The accelerator's name if torch sees one, else the CPU's."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # torch missing or broken: still describe the machine
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu} ({os.cpu_count()} cores)"


def _git_commit() -> str:
    """``$WANQUANT_COMMIT`` when set (a tree copied to a GPU machine, whose .git, if any, is
    not the sender's), else HEAD's hash with '-dirty' when tracked files differ, else 'unknown'."""
    if os.environ.get("WANQUANT_COMMIT"):
        return os.environ["WANQUANT_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_metadata(command: str | None = None) -> dict[str, str]:
    """{"device", "date", "commit", "command"} for the current run.

    ``command`` defaults to this process's command line, shell-quoted; a driver started
    with ``python -m`` is recorded that way (``sys.argv[0]`` is then the file's path).
    """
    if command is None:
        command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *_invocation()])
    return {
        "device": _device_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "command": command,
    }


def _invocation() -> list[str]:
    """``sys.argv`` with a module's file path turned back into ``-m package.module``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and sys.argv and sys.argv[0] != "-c":
        name = spec.name.removesuffix(".__main__")
        return ["-m", name, *sys.argv[1:]]
    return list(sys.argv)


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(
    name: str, payload: dict[str, Any], markdown_table: str, results_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """Write ``NAME.json`` (payload) and ``NAME.md`` (a header with the metadata + table).

    ``payload`` should already hold :func:`run_metadata`'s fields; missing ones are added.
    Returns the two paths.
    """
    out = Path(results_dir) if results_dir is not None else RESULTS_DIR
    payload = {**{k: v for k, v in run_metadata().items() if k not in payload}, **payload}
    header = "\n".join(
        [f"# {name}", "", *(f"- {k}: `{payload[k]}`" for k in ("device", "date", "commit", "command")), ""]
    )
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    _atomic_write(jpath, json.dumps(payload, indent=2) + "\n")
    _atomic_write(mpath, header + "\n" + markdown_table.rstrip() + "\n")
    return jpath, mpath
