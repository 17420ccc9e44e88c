"""What one consumer warp of the Gluon attention kernel issues per key tile, from its SASS.

No GPU: each config is compiled for sm_90 with the installed Triton's ptxas
(``attention_ws.compile_offline``) and disassembled with its bundled ``nvdisasm``. The first
consumer's key loop (the first backward branch around a wgmma) is walked path by path
(branches that leave the loop, such as an mbarrier's retry, count as not taken), so the
unmasked tiles and the masked last tile (the path with the selects) are counted apart.
Counts are per thread (warp) and key tile; how they turn into cycles is in
benchmarks/KERNEL_NOTES.md.

    python -m benchmarks.attention_sass \\
        --configs m64-n128-w4-s3-qpre-fold-tma-vperm-gws-ov-tm m64-n128-w4-s3-qpre-fold-tma-vperm-gws-ov

(results/attention_sass.{json,md}; ``--out DIR`` writes them to DIR instead.)

To read the device's compiler, put its Triton first on the path (``PYTHONPATH=/path/to/triton36``).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common.meta import run_metadata, write_results
from wanquant.kernels.attention_config import parse_config

# where each opcode issues on sm_90 (the CUDA guide's throughput table; pipes are per SM sub-partition)
PIPES = {"MUFU": "mufu (4 lanes/clk)", "FADD": "fp32", "FMUL": "fp32", "FFMA": "fp32", "FMNMX": "alu",
         "VIADD": "alu", "IADD3": "alu", "VIMNMX": "alu", "VIMNMX3": "alu", "SHF": "alu", "LEA": "alu",
         "LOP3": "alu", "SEL": "alu", "FSEL": "alu", "ISETP": "alu", "FSETP": "alu", "IMAD": "fp32 (imad)",
         "F2FP": "conversion", "PRMT": "alu", "SHFL": "shuffle", "LDL": "local", "STL": "local",
         "IGMMA": "tensor", "QGMMA": "tensor", "HGMMA": "tensor"}
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@(!?U?P\w+)\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def parse_sass(text: str) -> tuple[list[tuple[str | None, str, str]], dict[str, int]]:
    """nvdisasm text -> (instructions as (predicate, opcode, operands), label -> instruction index)."""
    insns, labels = [], {}
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(insns)
            continue
        m = _INSN.search(line)
        if m:
            insns.append((m.group(2), m.group(3), m.group(4)))
    return insns, labels


def _target(operands: str, labels: dict[str, int]) -> int | None:
    m = re.search(r"\((\.L_x_\d+)\)", operands)
    return labels.get(m.group(1)) if m else None


def key_loop(insns, labels) -> tuple[int, int]:
    """(first, last) instruction index of the first backward branch's body holding a wgmma."""
    for i, (_, op, args) in enumerate(insns):
        t = _target(args, labels) if op == "BRA" else None
        if t is not None and t < i and any("GMMA" in o for _, o, _ in insns[t:i]):
            return t, i
    raise ValueError("no loop around a wgmma in this SASS")


def loop_paths(insns, labels, first: int, last: int) -> list[collections.Counter]:
    """Opcode counts of every path through the loop body (at most a few: the masked branch)."""
    paths, stack = [], [(first, collections.Counter())]
    while stack:
        i, seen = stack.pop()
        while i <= last:
            pred, op, args = insns[i]
            seen[op.split(".")[0]] += 1
            t = _target(args, labels) if op == "BRA" else None
            if i == last or t is None or not first < t <= last:
                i += 1
            elif pred is None:
                i = t
            else:
                stack.append((t, seen.copy()))
                i += 1
        paths.append(seen)
        if len(paths) > 16:
            raise ValueError("more paths through the key loop than expected: is this the right loop?")
    # the masked last tile is the path with the selects (gl.where on scores and exponents)
    return sorted(paths, key=lambda c: (c["SEL"] + c["FSEL"], sum(c.values())))


def sass_of(cfg) -> str:
    import triton

    from wanquant.kernels.attention_ws import compile_offline

    asm = compile_offline(cfg.block_n, cfg.num_stages, cfg.ws_overlap, cfg.ping_pong, consumers=cfg.consumers,
                          exp2_fma=cfg.exp2_fma, tree_max=cfg.tree_max)
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(asm["cubin"])
        f.flush()
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout


def analyse(text: str) -> dict:
    insns, labels = parse_sass(text)
    first, last = key_loop(insns, labels)
    paths = loop_paths(insns, labels, first, last)
    rows = []
    for c in paths:
        pipes = collections.Counter()
        for op, n in c.items():
            pipes[PIPES.get(op, "other")] += n
        rows.append({"issued": sum(c.values()), "opcodes": dict(c.most_common()), "pipes": dict(pipes.most_common())})
    return {"paths": rows, "loop_instructions": last - first + 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", required=True, help="AttnConfig.describe() strings (gluon_ws ones)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    import triton

    payload = {**run_metadata(), "device": "none: compiled for sm_90 on the CPU", "triton": triton.__version__,
               "rows": []}
    lines = [f"Triton {triton.__version__}, sm_90. Instructions one consumer warp issues per key tile "
             "(64 queries x block_n keys), by path through the key loop: unmasked (every tile but the last) "
             "and, where the loop holds it, the masked last tile.", "",
             "| config | path | issued | MUFU | fp32 pipe | alu | conversion | local (spills) | other |",
             "|---|---|---|---|---|---|---|---|---|"]
    for text in args.configs:
        cfg = parse_config(text)
        res = analyse(sass_of(cfg))
        payload["rows"].append({"config": cfg.describe(), **res})
        for k, p in enumerate(res["paths"]):
            pipes = p["pipes"]
            fp32 = pipes.get("fp32", 0) + pipes.get("fp32 (imad)", 0)
            known = fp32 + sum(pipes.get(k, 0) for k in ("mufu (4 lanes/clk)", "alu", "conversion", "local"))
            path = "unmasked" if k == 0 else "masked" if k == 1 else f"other {k}"
            lines.append(f"| {cfg.describe()} | {path} | {p['issued']} | "
                         f"{pipes.get('mufu (4 lanes/clk)', 0)} | {fp32} | {pipes.get('alu', 0)} | "
                         f"{pipes.get('conversion', 0)} | {pipes.get('local', 0)} | {p['issued'] - known} |")
            print(lines[-1], flush=True)
    write_results("attention_sass", payload, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
