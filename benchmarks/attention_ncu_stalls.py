"""Where the attention kernel's warps wait, from the SASS page of an Nsight Compute report.

Reads the ``sass.csv.gz`` that ``attention_ncu.sh`` writes (every SASS instruction with its
warp-stall samples and execution count) and writes a Markdown summary: the stall reasons of
each warp role (the producer's loop, each consumer's key loop), and one consumer's hot path
cut at its landmarks (the K/V wait and wgmma issue, the Q.K^T wait, the row maxima up to the
first exponential, the exponentials and row sums up to the P.V wait, the rescale tail).
Samples are proportional to the time warps spend at an instruction, so each segment's share
is its share of the consumer's time per key tile.

    python -m benchmarks.attention_ncu_stalls benchmarks/results/attention_ncu_h100_sass.csv.gz \\
        --out benchmarks/results/attention_ncu_h100.md
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import re
from pathlib import Path

_BRANCH = re.compile(r"BRA\s+(0x[0-9a-f]+)")


def read_sass(path: Path) -> list[dict]:
    """Rows of the report's SASS page: address, text, executions, stall samples by reason."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.reader(io.StringIO(f.read())))
    header = rows[1]
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    out = []
    for r in rows[2:]:
        stalls = {h[6:]: int(r[col[h]] or 0) for h in reasons}
        out.append({"addr": int(r[col["Address"]], 16), "text": r[col["Source"]].strip(),
                    "executed": int(r[col["Instructions Executed"]] or 0), "stalls": stalls,
                    "samples": sum(stalls.values())})
    return out


def loops(rows: list[dict]) -> list[tuple[int, int]]:
    """(first, last) row index of every backward branch's body."""
    where = {r["addr"]: i for i, r in enumerate(rows)}
    found = []
    for i, r in enumerate(rows):
        m = _BRANCH.search(r["text"])
        if m and int(m.group(1), 16) in where and where[int(m.group(1), 16)] < i:
            found.append((where[int(m.group(1), 16)], i))
    return found


def roles(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """The consumers' key loops (around wgmmas) and the producer's (around TMA loads).
    Slow paths placed after the kernel's end (an mbarrier's retry) branch back into a loop's
    middle; such a span holds an EXIT and is no loop, and of nested loops the inner one counts."""
    def holding(marker):
        found = [lp for lp in loops(rows) if any(marker in r["text"] for r in rows[lp[0]:lp[1] + 1])
                 and not any("EXIT" in r["text"] for r in rows[lp[0]:lp[1] + 1])]
        return sorted({a for a in found if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in found)})

    named = {f"consumer {k} key loop": lp for k, lp in enumerate(holding("GMMA"))}
    for lp in holding("UTMALDG"):
        if lp not in named.values():
            named["producer loop"] = lp
    return named


def segments(rows: list[dict], first: int, last: int) -> list[tuple[str, list[dict]]]:
    """A consumer loop's hot path (instructions run at least half as often as its head) cut
    at its landmarks, in program order."""
    hot = [r for r in rows[first:last + 1] if r["executed"] >= rows[first]["executed"] // 2]
    cuts, names = [], []
    waits = [k for k, r in enumerate(hot) if "WARPGROUP.DEPBAR" in r["text"]]
    arrive = next(k for k, r in enumerate(hot) if "WARPGROUP.ARRIVE" in r["text"])
    if len(waits) < 2:
        return [("key loop", hot)]
    qk_wait, pv_wait = waits[0], waits[-1]
    first_exp = next((k for k in range(qk_wait, pv_wait) if "MUFU.EX2" in hot[k]["text"]), qk_wait + 1)
    for name, a, b in (("top: K/V wait, barrier, addresses", 0, arrive),
                       ("wgmma issue and P to e4m3", arrive, qk_wait), ("Q.K^T wait", qk_wait, qk_wait + 1),
                       ("row maxima, shuffles, bias", qk_wait + 1, first_exp),
                       ("exponentials and row sums", first_exp, pv_wait), ("P.V wait, rescale, release", pv_wait, None)):
        names.append(name)
        cuts.append(hot[a:b])
    return list(zip(names, cuts))


def summary(rows: list[dict]) -> str:
    lines = ["| warps | samples | top stall reasons |", "|---|---|---|"]
    named = roles(rows)
    for name, (a, b) in named.items():
        c = collections.Counter()
        for r in rows[a:b + 1]:
            c.update(r["stalls"])
        total = sum(c.values()) or 1
        top = ", ".join(f"{k} {100 * v / total:.1f} %" for k, v in c.most_common(6))
        lines.append(f"| {name} | {total:,} | {top} |")
    consumer = next((lp for n, lp in named.items() if n.startswith("consumer")), None)
    if consumer is not None:
        segs = segments(rows, *consumer)
        total = sum(r["samples"] for _, seg in segs for r in seg) or 1
        lines += ["", "Consumer 0's hot path per key tile:", "",
                  "| segment | instructions | share of the time | top stall reasons |", "|---|---|---|---|"]
        for name, seg in segs:
            c = collections.Counter()
            for r in seg:
                c.update(r["stalls"])
            s = sum(c.values())
            top = ", ".join(f"{k} {100 * v / max(s, 1):.0f} %" for k, v in c.most_common(3))
            lines.append(f"| {name} | {len(seg)} | {100 * s / total:.1f} % | {top} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sass_csv", type=Path, help="sass.csv.gz from attention_ncu.sh")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown here (default: print it)")
    args = ap.parse_args()
    text = summary(read_sass(args.sass_csv))
    if args.out:
        args.out.write_text(f"# attention kernel stalls ({args.sass_csv.name})\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
