#!/bin/bash
# One GPU call for the memory-bound pre-passes (benchmarks/prepass_speed.py): the GPU tests of
# the fused q/k norm + rotary; then its launches, and those of the residual + LayerNorm +
# modulation kernel, against diffusers' arithmetic eager and compiled; the K/V statistics +
# quantization against its floor; the activation quantization's default launch against
# grid-stride launches (few programs per SM, for L2 reuse of its second pass). Then the 720p
# step (benchmarks/e2e_speed.py) with the fastest correct activation launch set through
# WANQUANT_ACT_LAUNCH; then, if time is left, the compiled W4A4 step once more with
# Inductor's coordinate-descent tuning. Run from the repository root after installing the
# wheels diffusers needs:
#   OUT=/root/out LIMIT=560 bash benchmarks/prepass_check.sh
# LIMIT: seconds the whole script may take; MODES: the e2e modes, fastest-to-decide first.
# If a grid-stride launch wins, make it the rule in dispatch.act_plan; if a q/k norm launch
# beats the default, make it qk_norm_rope's default; if residual_norm beats Inductor's
# compiled expressions, time the step with it (MODES=...,w4a4_int8attn_fusednorms_compile)
# and, if faster, make compile_blocks(fused_norms=True) wanquant's default; then rerun
# e2e_speed in full.
set -u
T0=$(date +%s); left() { echo $(( ${LIMIT:-575} - ($(date +%s) - T0) )); }
OUT=${OUT:-benchmarks/results/prepass_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_rope_gpu.py > $OUT/rope_gpu_tests.txt 2>&1
rope_rc=$?
echo "rope GPU tests rc=$rope_rc"; tail -2 $OUT/rope_gpu_tests.txt
if [ $rope_rc -ne 0 ] && [ -z "${TIME_ANYWAY:-}" ]; then  # the e2e step would run the failing kernel: time the attention kernel instead
  B=m64-n128-w4-s3-qpre-fold-tma-vperm
  timeout $(( $(left) - 5 )) python3 -m benchmarks.attention --out $OUT/attn --tokens 75600 32760 --time-budget 150 \
    --configs $B-gws-ov $B > $OUT/attn_log.txt 2>&1
  echo "attention rc=$?"; tail -8 $OUT/attn/attention.md; exit 1
fi
timeout 230 python3 -m benchmarks.prepass_speed --out $OUT/prepass --budget-s 170 --launches bm16-bk128-w4-s3-p1xSM \
  bm16-bk128-w8-s3-p1xSM bm32-bk128-w8-s3-p1xSM bm16-bk128-w4-s3-p2xSM \
  > $OUT/prepass_log.txt 2>&1
rc=$?
echo "prepass rc=$rc ($(left)s left)"; grep "^|" $OUT/prepass_log.txt | tail -20
[ $rc -eq 0 ] || { tail -5 $OUT/prepass_log.txt; exit 1; }
ACT=$(python3 - <<'PY'
import json, os, collections, sys
rows = json.load(open(os.environ["OUT"] + "/prepass/prepass_speed.json"))["rows"]
t = collections.defaultdict(dict)
for r in rows:
    if r["kernel"] == "act_quant" and r.get("ms") and r.get("check_ok"):
        t[r["launch"]][r["K"]] = r["ms"]
score = {n: 5 * v[5120] + v[13824] for n, v in t.items() if len(v) == 2}
for n in sorted(score, key=score.get):
    print(n, round(score[n], 3), file=sys.stderr)
best = min(score, key=score.get) if score else ""
print(best.removesuffix(" (default)") if best and not any(r.get("default") and r["launch"] == best for r in rows) else "")
PY
)
echo "act launch override: '${ACT}'"
WANQUANT_ACT_LAUNCH=$ACT timeout $(( $(left) - 5 )) python3 -m benchmarks.e2e_speed --out $OUT/e2e --resolutions 720x1280 --modes ${MODES:-bf16_eager,w4a4_int8attn_compile,bf16_compile,bf16_int8attn_compile,w4a4} \
  --budget-s $(( $(left) - 75 )) > $OUT/e2e_log.txt 2>&1
echo "e2e rc=$?"; grep -E "x \(|MISSED|met|step_s" $OUT/e2e_log.txt | tail -16
if [ $(left) -gt 130 ]; then
  WANQUANT_ACT_LAUNCH=$ACT timeout $(( $(left) - 5 )) python3 -m benchmarks.e2e_speed --out $OUT/e2e_cd --resolutions 720x1280 \
    --modes w4a4_int8attn_compile --inductor-options coordinate_descent_tuning=1 --budget-s 30 > $OUT/e2e_cd_log.txt 2>&1
  echo "e2e coordinate descent rc=$?"; grep -E "step_s" $OUT/e2e_cd_log.txt | tail -2
fi
echo "done $(( $(date +%s) - T0 ))s"
