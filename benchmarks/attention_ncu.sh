#!/bin/bash
# Nsight Compute on the 8-bit attention's main kernel: one launch at $TOKENS tokens (default
# 32,760; benchmarks/attention_ncu_target.py), the full section set at the GPU's own clocks
# (--clock-control none: the boost clock the timings see), then as text: every section
# ($OUT/details.txt) and the SASS with its warp-stall samples ($OUT/sass.csv.gz), which say
# where the main loop's cycles go. Run from the repository root on a GPU:
#   OUT=/root/out bash benchmarks/attention_ncu.sh
set -u
OUT=${OUT:-benchmarks/results/attention_ncu}
TOKENS=${TOKENS:-32760}
KERNEL=${KERNEL:-_attn_ws_kernel}
mkdir -p "$OUT"
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout ${NCU_S:-240} "$NCU" --target-processes all -k "regex:$KERNEL" --launch-skip 1 --launch-count 1 \
  --set full --clock-control none -f -o "$OUT/attn" \
  python3 -m benchmarks.attention_ncu_target --tokens "$TOKENS" > "$OUT/ncu_log.txt" 2>&1
echo "ncu rc=$?"; tail -4 "$OUT/ncu_log.txt"
"$NCU" --import "$OUT/attn.ncu-rep" --page details > "$OUT/details.txt" 2>&1
"$NCU" --import "$OUT/attn.ncu-rep" --page source --print-source sass --csv 2> "$OUT/sass_err.txt" | gzip > "$OUT/sass.csv.gz"
rm -f "$OUT/attn.ncu-rep"
grep -E "Duration|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|Issue Slots Busy|No Eligible|Active Warps Per Scheduler|Eligible Warps|Warp Cycles Per Issued|Registers Per Thread|Achieved Occupancy" "$OUT/details.txt" | head -30
ls -la "$OUT"
