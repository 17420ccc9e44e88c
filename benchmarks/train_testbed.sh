#!/usr/bin/env bash
# Train the embedded testbed pipeline (wanquant/testbed/weights) from scratch.
#
# This is the exact recipe of the committed weights (see wanquant/testbed/weights/TRAINING.md):
# one H100, about 8 minutes. Phases are time-boxed (--vae-seconds, --expert-seconds), so a
# slower GPU trains fewer steps rather than running longer. On a CPU, pass small counts, e.g.
#   bash benchmarks/train_testbed.sh runs/tiny --num-clips 32 --vae-steps 3 --steps 4 --batch 4 --eval-samples 2 --eval-steps 2
# Runs from the repository root whatever the current folder (python -m benchmarks.testbed_training).
# PYTHON selects the interpreter (default python3). Afterwards: cp -r OUT/pipeline/. wanquant/testbed/weights/   (or cat OUT/pipeline.tar.part* | tar x)
set -euo pipefail
OUT=$(realpath -m "${1:-runs/testbed}")
shift || true
cd "$(dirname "${BASH_SOURCE[0]}")/.."
"${PYTHON:-python3}" -m benchmarks.testbed_training --out "$OUT" --seed 0 \
  --num-clips 12288 --vae-steps 100000 --vae-seconds 180 --vae-batch 32 --vae-frames 9 \
  --steps 100000 --expert-seconds 200 --batch 256 \
  --eval-samples 32 --eval-steps 40 --eval-guidance 4.0 --eval-seconds 45 \
  --tar "$OUT/pipeline.tar" --tar-part-mib 15 --no-bar --log-every 200 "$@"
