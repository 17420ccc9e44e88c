#!/bin/bash
# One GPU call that settles kernel variants before a full run (benchmarks/speed_run.sh): the
# GPU tests named by $TESTS (FILE::KEYWORD), the attention benchmark of the Gluon configs
# $CONFIGS against the default and SDPA cuDNN, then the 720p step of $E2E_MODES with the
# fastest config at 75,600 tokens, then, if $NCU_S seconds are left, Nsight Compute on the
# kernel the step ran (attention_ncu.sh). Defaults: the GPU test that the default's reordered
# schedules give its bits, no variant (set $CONFIGS), the 720p step against BF16 eager.
#   OUT=/root/out LIMIT=570 bash benchmarks/gluon_attention_check.sh
# LIMIT: seconds the whole script may take (later steps are skipped past it). Results:
# $OUT/gpu_tests.txt, $OUT/attn/attention.{json,md}, $OUT/e2e/e2e_speed.{json,md}, $OUT/ncu/ and logs
# (the device returns a limited number of files: keep $OUT small).
set -u
OUT=${OUT:-benchmarks/results/gluon_check}
LIMIT=${LIMIT:-570}
T0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv

TESTS=${TESTS:-"tests/test_attention_gpu.py::reordered_schedules"}
E2E_MODES=${E2E_MODES-w4a4_int8attn_compile,bf16_eager}  # 720p; empty: none
echo "== GPU tests (${LIMIT}s budget)"
rc=0
for t in $TESTS; do  # FILE::KEYWORD
  PYTHONUNBUFFERED=1 timeout 150 python3 -m pytest "${t%%::*}" -v -s -k "${t##*::}" -p no:cacheprovider \
    -o faulthandler_timeout=60 >> "$OUT/gpu_tests.txt" 2>&1
  r=$?; echo "$t rc=$r"; [ $r -eq 124 ] && [[ $t == *attention_gpu* ]] && rc=124  # a hung attention kernel
done
grep -E 'PASS|FAIL|Error|assert|gelu epilogue' "$OUT/gpu_tests.txt" | head -60

base=$(python3 -c "from wanquant.kernels.attention_config import DEFAULT_CONFIG as c; print(c.describe())")
# e.g. "m64-n64-w4-s4-qpre-fold-tma-vperm-gws-ov-tm-c3 $base-e4" (KERNEL_NOTES.md: what each measured)
CONFIGS=${CONFIGS-}
configs="$base"
# a hang (rc 124) keeps the variants out; failures do not: the benchmark checks each config
# against the reference and never ranks one that fails
[ $rc -ne 124 ] && configs="$base $CONFIGS"

best=""
if [ -n "${CONFIGS// }" ]; then  # no variants: the e2e runs the default config
echo "== attention ($(left)s left)"
t=$(( $(left) - 30 )); [ $t -gt ${ATTN_S:-260} ] && t=${ATTN_S:-260}  # ATTN_S: the benchmark's cap
timeout $t python3 -m benchmarks.attention --out "$OUT/attn" --tokens 32760 75600 --time-budget 80 \
  --configs $configs > "$OUT/attn_log.txt" 2>&1
echo "attention rc=$?"; grep -E "tokens:|Error" "$OUT/attn_log.txt" | tail -20

best=$(python3 - "$OUT/attn/attention.json" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except (OSError, ValueError):
    rows = []
ours = [r for r in rows if r.get("tokens") == 75600 and r["impl"].startswith("int8 ") and r.get("ms")
        and r.get("check_ok", True)]
for r in sorted(ours, key=lambda r: r["ms"]):
    print(f"{r['config']}: {r['ms']:.2f} ms (kernel {r.get('kernel_ms') or 0:.2f})", file=sys.stderr)
print(min(ours, key=lambda r: r["ms"])["config"] if ours else "")
PY
)
fi
echo "fastest at 75,600 tokens: ${best:-none} ($(left)s left)"
[ -n "$best" ] && [ "$best" != "$base" ] && export WANQUANT_ATTN_CONFIG=$best
if [ -n "$E2E_MODES" ] && [ $(left) -gt 120 ]; then
  timeout $(( $(left) - 10 )) python3 -m benchmarks.e2e_speed --out "$OUT/e2e" \
    --modes "$E2E_MODES" --resolutions 720x1280 --budget-s $(( $(left) - 80 )) > "$OUT/e2e_log.txt" 2>&1
  echo "e2e rc=$? (attention config ${WANQUANT_ATTN_CONFIG:-default})"; tail -15 "$OUT/e2e_log.txt"
fi
# Nsight Compute's stall profile of the default kernel with what time is left (NCU_S=0: none)
NCU_S=${NCU_S:-150}
if [ "$NCU_S" -gt 0 ] && [ $(left) -gt $(( NCU_S + 20 )) ]; then
  echo "== ncu ($(left)s left)"
  OUT="$OUT/ncu" NCU_S=$NCU_S bash benchmarks/attention_ncu.sh 2>&1 | tail -25
fi
echo "done in $(( $(date +%s) - T0 ))s"
