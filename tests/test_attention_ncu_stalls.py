"""benchmarks/attention_ncu_stalls.py on the committed Nsight Compute SASS page of an H100 run."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.attention_ncu_stalls import read_sass, roles, segments, summary

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "attention_ncu_h100_sass.csv.gz"


def test_roles_and_segments_of_the_committed_profile():
    rows = read_sass(REPORT)
    named = roles(rows)
    # two consumer warpgroups and one producer, each a loop that holds no EXIT
    assert sorted(named) == ["consumer 0 key loop", "consumer 1 key loop", "producer loop"]
    for a, b in named.values():
        assert a < b and not any("EXIT" in r["text"] for r in rows[a:b + 1])
    a, b = named["consumer 0 key loop"]
    # the key loop's head runs once a key tile (255 a consumer warp at 32,760 tokens), the
    # kernel's first instruction once a warp (12 a program): 4 x 255 / 12 = 85 times as often
    assert rows[a]["executed"] == 85 * rows[0]["executed"]
    segs = segments(rows, a, b)
    hot = [r for r in rows[a:b + 1] if r["executed"] >= rows[a]["executed"] // 2]
    assert sum(len(s) for _, s in segs) == len(hot)  # the cuts cover the hot path once
    exps = dict(segs)["exponentials and row sums"]
    # 64 x 128 scores over 128 threads, and the two rows' alpha
    assert sum("MUFU.EX2" in r["text"] for r in exps) == 64 + 2
    shares = [float(x) for x in re.findall(r"\| ([\d.]+) % \|", summary(rows))]
    assert abs(sum(shares) - 100) < 0.5
