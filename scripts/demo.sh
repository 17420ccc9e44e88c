#!/usr/bin/env bash
# The main job on the embedded testbed model: calibrate, quantize, save, reload, generate, report.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
wanquant demo --out "${1:-runs/demo}"
