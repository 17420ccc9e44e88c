#!/bin/bash
# One GPU call for issue 16's published numbers: the full e2e_speed run (modes $MODES at
# both resolutions, BF16 eager first for the same-run baseline, DEFAULT_CONFIG attention),
# then, in the time left, the 8-bit attention benchmark (configs $CONFIGS against SDPA
# cuDNN at 75,600 and 32,760 tokens, each checked against the PyTorch reference). Run from
# the repository root after installing the wheels diffusers needs:
#   OUT=/root/out LIMIT=575 bash benchmarks/speed_run.sh
# LIMIT: seconds the whole script may take; the e2e rows get all but ATTN_S of them.
set -u
OUT=${OUT:-benchmarks/results/speed_run}
LIMIT=${LIMIT:-575}
ATTN_S=${ATTN_S:-100}
T0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
# DEFAULT_CONFIG (the one the e2e rows ran) and the Triton fallback
default=$(python3 -c "from wanquant.kernels.attention_config import DEFAULT_CONFIG as c; print(c.describe())")
CONFIGS=${CONFIGS:-"$default m64-n128-w4-s3-qpre-fold-tma-vperm"}

echo "== e2e"
timeout $(( $(left) - ATTN_S )) python3 -m benchmarks.e2e_speed --out "$OUT/e2e" \
  --modes ${MODES:-bf16_eager,w4a4_int8attn_compile,bf16_compile,w4a4,bf16_int8attn_compile} \
  --budget-s $(( $(left) - ATTN_S - 60 )) > "$OUT/e2e_log.txt" 2>&1
echo "e2e rc=$? ($(left)s left)"; grep -E "x \(|MISSED|met|: step_s|budget" "$OUT/e2e_log.txt" | tail -16

echo "== attention"
t=$(( $(left) - 5 ))
timeout $t python3 -m benchmarks.attention --out "$OUT/attn" --tokens 75600 32760 --time-budget $(( t - 25 )) \
  --configs $CONFIGS > "$OUT/attn_log.txt" 2>&1
echo "attention rc=$?"; grep -E "^\| (int8|sdpa-cudnn) .*gaussian" "$OUT/attn/attention.md"
echo "done in $(( $(date +%s) - T0 ))s"
