#!/usr/bin/env bash
# Creates .venv (once) and installs wanquant with what it needs. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned: an unpinned torch would pull the newest CUDA build (GBs).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# eval: matplotlib (the demo's report figures) plus OpenCV and brisque (benchmarks/quality and its tests).
python -m pip install -q -e ".[test,kernels,eval]"
