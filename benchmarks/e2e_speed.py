"""End-to-end speed of a Wan2.2-I2V-A14B denoising step on one GPU: BF16 vs W4A4, eager vs
compiled, SDPA vs wanquant's 8-bit attention (issue 16).

One expert of the real A14B configuration with RANDOM weights (values change no kernel
time; :mod:`benchmarks.common.a14b`), BF16 and W4A4 built once each and kept resident. A
step is what classifier-free guidance runs per denoising step: a cond and an uncond
forward of the expert (latents ``[1, 36, 21, H/8, W/8]``, 512 text tokens each, the
high-noise expert at t = 950). Modes:

=========================  ========================================================
``bf16_eager``             stock diffusers (SDPA), as ``pipe.to("cuda")`` runs it
``bf16_compile``           the same, each block ``torch.compile``-d (regional)
``bf16_int8attn_compile``  + wanquant's 8-bit self-attention
``w4a4``                   W4A4 as ``wanquant generate`` runs it by default today:
                           fast path (Triton act-quant + FP8 GEMM), SDPA, eager,
                           cross-attention k/v cached per context
``w4a4_int8attn_compile``  W4A4 + 8-bit self-attention + compiled blocks
``w4a4_int8attn``,         the two halves of the last one (only if asked)
``w4a4_compile``
``w4a4_int8attn_``         the last but one with the block's norm steps as wanquant
``fusednorms_compile``     kernels (``compile_blocks(fused_norms=True)``; only if asked)
``w4a4_int8attn_2pass_``   ``w4a4_int8attn_compile`` with the activation kernel's own
``compile``                first pass for the row maxima (``row_amax_in_graph=False``;
                           only if asked)
``w4a4_int8attn_gelu_``    ``w4a4_int8attn_compile`` with the feed-forward's GELU in
``compile``                the down projection's activation kernel
                           (``gelu_in_activation=True``; only if asked)
``w4a4_int8attn_geluepi_`` ``w4a4_int8attn_compile`` with the GELU and the down
``compile``                projection's row maxima in the up projection's GEMM
                           epilogue (``gelu_in_epilogue=True``; only if asked)
``w4a4_int8attn_q8rope_``  ``w4a4_int8attn_compile`` with the rotary kernel writing
``compile``                the attention's INT8 queries (``set_query_fusion(..., True)``;
                           only if asked)
``w4a4_int8attn_q8rope_``  both of the last two (only if asked)
``geluepi_compile``
=========================  ========================================================

Per row: one untimed warm-up forward through ONE block (Triton JIT, cuBLAS heuristics;
the compile for compiled modes: one compiled block serves all 40), then ``--reps``
CUDA-synchronised steps (``step_s``: their median), then one cond forward under
``torch.profiler`` whose GPU kernel time is split into attention (self and cross,
with the 8-bit kernel's K/V pre-pass), linears (cuBLAS GEMMs; W4A4's act-quant, weight
expansion and FP8 GEMM) and the rest; the split is scaled to a step (x2) and
``other_s = step_s - attention_s - linears_s`` (elementwise kernels plus launch gaps).

Rows are written after each one; ``--resume FILE`` skips the (mode, resolution) pairs
already in FILE, and ``--budget-s`` stops starting rows after that many seconds, so
the run fits one device call or continues in the next.

    python -m benchmarks.e2e_speed --tiny --out /tmp/e2e               # CPU dry run
    python -m benchmarks.e2e_speed --out OUT --budget-s 420            # H100
    python -m benchmarks.e2e_speed --out OUT --resume OUT/e2e_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common.a14b import A14B, HIGH, TINY_EXPERT, build_expert
from benchmarks.common.meta import RESULTS_DIR, run_metadata, write_results
from benchmarks.common.meters import cuda_sync, free, kernel_us
from wanquant.kernels.dispatch import ACT_LAUNCH_ENV

T_HIGH = 950.0  # a high-noise timestep (middle bin of the high-noise expert)
TEXT_TOKENS = 512


@dataclass(frozen=True)
class Mode:
    name: str
    quantized: bool
    attention: str  # "sdpa" or "int8"
    compiled: bool
    fused_norms: bool = False  # compile_blocks(fused_norms=True): the norm steps as wanquant kernels
    row_amax_in_graph: bool = True  # compile_blocks(row_amax_in_graph=...): False = two-pass activation kernel
    gelu_in_activation: bool = False  # compile_blocks(gelu_in_activation=True): the FFN's GELU in the act kernel
    gelu_in_epilogue: bool = False  # compile_blocks(gelu_in_epilogue=True): the FFN's GELU in the up GEMM's epilogue
    fuse_int8_queries: bool = False  # set_query_fusion: the rotary kernel writes the attention's INT8 queries


MODES = {m.name: m for m in (
    Mode("bf16_eager", False, "sdpa", False),
    Mode("bf16_compile", False, "sdpa", True),
    Mode("bf16_int8attn_compile", False, "int8", True),
    Mode("w4a4", True, "sdpa", False),
    Mode("w4a4_int8attn_compile", True, "int8", True),
    Mode("w4a4_int8attn", True, "int8", False),
    Mode("w4a4_compile", True, "sdpa", True),
    Mode("w4a4_int8attn_fusednorms_compile", True, "int8", True, fused_norms=True),
    Mode("w4a4_int8attn_2pass_compile", True, "int8", True, row_amax_in_graph=False),
    Mode("w4a4_int8attn_gelu_compile", True, "int8", True, gelu_in_activation=True),
    Mode("w4a4_int8attn_geluepi_compile", True, "int8", True, gelu_in_epilogue=True),
    Mode("w4a4_int8attn_q8rope_compile", True, "int8", True, fuse_int8_queries=True),
    Mode("w4a4_int8attn_q8rope_geluepi_compile", True, "int8", True, gelu_in_epilogue=True,
         fuse_int8_queries=True),
)}
# The five, most needed first (the targets compare the first three).
DEFAULT_MODES = ("bf16_eager", "w4a4_int8attn_compile", "bf16_compile", "w4a4", "bf16_int8attn_compile")
RESOLUTIONS = ("480x832", "720x1280")

ATTENTION_KEYS = ("flash", "fmha", "sdpa", "attn", "attention", "_kv_stats", "_kv_quant", "_q_quant")
LINEAR_KEYS = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "scaled_mm", "act_quant", "_expand_kernel",
               "splitkreduce")


def part_of(kernel: str) -> str:
    """``"attention"``, ``"linears"`` or ``"other"`` for a CUDA kernel name."""
    n = kernel.lower()
    if any(k in n for k in ATTENTION_KEYS):
        return "attention"
    if any(k in n for k in LINEAR_KEYS):
        return "linears"
    return "other"


def split_profile(events) -> tuple[dict[str, float], list[dict]]:
    """Kernel seconds by part, and the 12 longest kernels, from ``prof.key_averages()``."""
    parts = {"attention": 0.0, "linears": 0.0, "other": 0.0}
    kernels = []
    for e in events:
        us = kernel_us(e)
        if not us:
            continue
        part = part_of(e.key)
        parts[part] += us / 1e6
        kernels.append({"name": e.key[:100], "seconds": us / 1e6, "count": e.count, "part": part})
    return parts, sorted(kernels, key=lambda k: -k["seconds"])[:12]


def inductor_options(text: str) -> dict[str, bool | int]:
    """``"a=1,b=0"`` -> Inductor settings for ``torch.compile(options=...)``, each cast to
    the type of its current value (bool or int); an unknown name raises."""
    import torch._inductor.config as inductor_config

    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        current = getattr(inductor_config, key)  # AttributeError names an unknown setting
        out[key] = bool(int(value)) if isinstance(current, bool) else int(value)
    return out


def latent_shape(res: str, frames: int, in_channels: int) -> tuple[int, ...]:
    h, w = (int(v) for v in res.split("x"))
    return (1, in_channels, (frames - 1) // 4 + 1, h // 8, w // 8)


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.cfg = TINY_EXPERT if args.tiny else A14B
        from wanquant.method.config import wanquant_preset

        self.qcfg = wanquant_preset()
        self.experts: dict[bool, torch.nn.Module] = {}
        self.t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    def expert(self, quantized: bool) -> torch.nn.Module:
        if quantized not in self.experts:
            from wanquant.model.wan import bind_expert
            from wanquant.runtime.state import TimestepBins

            torch.manual_seed(0)
            t = time.perf_counter()
            model = build_expert(self.cfg, quantized, self.device, self.qcfg)
            if quantized:
                bind_expert(model, TimestepBins(1000.0, 900.0, tuple(self.qcfg.bins_for(HIGH).edges)))
            cuda_sync(self.device)
            self.experts[quantized] = model
            self.say(f"built the {'W4A4' if quantized else 'BF16'} expert in {time.perf_counter() - t:.1f} s")
        return self.experts[quantized]

    def configure(self, mode: Mode) -> torch.nn.Module:
        from wanquant.model.attention import set_query_fusion, set_self_attention
        from wanquant.model.compile import compile_blocks, uncompile_blocks

        model = self.expert(mode.quantized)
        attention = mode.attention
        if attention == "int8" and self.args.tiny:
            attention = "int8_reference"  # the same numbers in PyTorch (CPU dry run)
        set_self_attention(model, attention)
        set_query_fusion(model, mode.fuse_int8_queries)
        if mode.quantized:  # choose the backend and prepare every layer now, not inside a timed step
            from wanquant.runtime.expert import quantized_layers

            for layer in quantized_layers(model).values():
                layer.prepare_for_compile(self.device)
        if mode.compiled:
            compile_blocks(model, backend=self.args.compile_backend, options=inductor_options(self.args.inductor_options),
                           fused_norms=mode.fused_norms, row_amax_in_graph=mode.row_amax_in_graph,
                           gelu_in_activation=mode.gelu_in_activation, gelu_in_epilogue=mode.gelu_in_epilogue)
        else:
            uncompile_blocks(model)
        return model

    def forward(self, model, x, ctx, blocks: int | None = None):
        t = torch.tensor([T_HIGH], device=self.device)
        full = model.blocks
        if blocks is not None:
            model.blocks = full[:blocks]
        try:
            with torch.no_grad():
                return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        finally:
            model.blocks = full

    def run(self, mode: Mode, res: str) -> dict:
        a = self.args
        row = {"mode": mode.name, "resolution": res, "frames": a.frames, "quantized": mode.quantized,
               "attention": mode.attention, "compiled": mode.compiled}
        model = self.configure(mode)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        gen = torch.Generator(device=self.device).manual_seed(0)
        shape = latent_shape(res, a.frames, self.cfg["in_channels"])
        row["tokens"] = shape[2] * (shape[3] // 2) * (shape[4] // 2)
        x = torch.randn(shape, generator=gen, device=self.device).to(torch.bfloat16)
        ctx = [torch.randn(1, TEXT_TOKENS if not a.tiny else 16, self.cfg["text_dim"], generator=gen,
                           device=self.device).to(torch.bfloat16) for _ in range(2)]  # cond, uncond
        if mode.compiled:  # the first block eagerly, to check the compiled one against it
            from wanquant.model.compile import uncompile_blocks

            uncompile_blocks(model)
            eager = self.forward(model, x, ctx[0], blocks=1).float()
            model = self.configure(mode)
        t = time.perf_counter()
        first = self.forward(model, x, ctx[0], blocks=1)  # JIT / compile: one block's graph serves all
        cuda_sync(self.device)
        row["warmup_s"] = time.perf_counter() - t
        if mode.compiled:
            row["rel_diff_vs_eager_1block"] = float((first.float() - eager).norm() / eager.norm().clamp_min(1e-30))
            del eager
        del first
        steps = []
        for _ in range(a.reps):
            cuda_sync(self.device)
            t = time.perf_counter()
            for c in ctx:
                self.forward(model, x, c)
            cuda_sync(self.device)
            steps.append(time.perf_counter() - t)
        row["steps_s"] = steps
        row["step_s"] = statistics.median(steps)
        if self.device.type == "cuda":  # both experts stay resident: this includes the other one's weights
            row["peak_gb_with_both_experts"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        if self.device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                self.forward(model, x, ctx[0])
                cuda_sync(self.device)
            parts, top = split_profile(prof.key_averages())
            row["forward_kernel_s"] = parts
            row["top_kernels"] = top
            row["attention_s"] = 2 * parts["attention"]
            row["linears_s"] = 2 * parts["linears"]
            row["other_s"] = row["step_s"] - row["attention_s"] - row["linears_s"]
        else:  # CPU dry run: no kernel profile
            row["attention_s"] = row["linears_s"] = None
            row["other_s"] = None
        return row


# ---------------------------------------------------------------------------------------
# results
def _f(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _row(rows, mode, res):
    return next((r for r in rows if r["mode"] == mode and r["resolution"] == res and "error" not in r), None)


def targets(rows) -> list[str]:
    out = []
    for res in RESOLUTIONS:
        best = _row(rows, "w4a4_int8attn_compile", res)
        for base, goal in (("bf16_eager", 1.6), ("bf16_compile", 1.3)):
            b = _row(rows, base, res)
            if best and b:
                ratio = b["step_s"] / best["step_s"]
                out.append(f"{res}: W4A4 + 8-bit attention + compile vs {base}: {ratio:.2f}x "
                           f"({b['step_s']:.2f} s vs {best['step_s']:.2f} s per step; target >= {goal}x) -> "
                           f"{'met' if ratio >= goal else 'MISSED'}")
        today, eager = _row(rows, "w4a4", res), _row(rows, "bf16_eager", res)
        if today and eager:
            out.append(f"{res}: W4A4 as today vs bf16_eager: {eager['step_s'] / today['step_s']:.2f}x")
    return out


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    lines = [
        "Cond + uncond denoising step of one Wan2.2-I2V-A14B expert (random weights; values change no kernel "
        "time), 81 frames, 512 text tokens, t = 950. `step` is the median of CUDA-synchronised steps after a "
        "warm-up; the parts come from one profiled cond forward (GPU kernel time x 2), `other` = step - "
        "attention - linears (elementwise kernels and launch gaps). `warm-up` is one block's first forward "
        "(Triton JIT; the compile for compiled modes). The last column: relative difference of the compiled "
        "mode's output after one block from the same mode run eagerly (Inductor fuses the elementwise work in "
        "fp32 where eager rounds to bf16 between ops; W4A4's 4-bit activation rounding amplifies that).",
        "",
        "| mode | resolution | step (s) | attention (s) | linears (s) | other (s) | vs bf16_eager | vs bf16_compile "
        "| warm-up (s) | compiled vs eager, 1 block |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['resolution']} | **{r['error'][:90]}** | | | | | | | |")
            continue
        e, c = _row(rows, "bf16_eager", r["resolution"]), _row(rows, "bf16_compile", r["resolution"])
        lines.append(f"| {r['mode']} | {r['resolution']} | {_f(r['step_s'])} | {_f(r['attention_s'])} | "
                     f"{_f(r['linears_s'])} | {_f(r['other_s'])} | "
                     f"{_f(e['step_s'] / r['step_s']) + 'x' if e else '-'} | "
                     f"{_f(c['step_s'] / r['step_s']) + 'x' if c else '-'} | {_f(r.get('warmup_s'), 1)} | "
                     f"{_f(r.get('rel_diff_vs_eager_1block'), 4)} |")
    lines += ["", "## Targets (issue 16)", ""] + [f"- {t}" for t in targets(rows)]
    return "\n".join(lines) + "\n"


def save(payload: dict, out: Path) -> None:
    write_results("e2e_speed", payload, markdown(payload), out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU dry run at toy sizes")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--resolutions", default=",".join(RESOLUTIONS))
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--reps", type=int, default=2, help="timed steps per row (median)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for e2e_speed.json / .md")
    p.add_argument("--resume", help="an e2e_speed.json whose rows are kept and not measured again")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no row after this many seconds (0: no limit)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--inductor-options", default="", help="Inductor settings for the compiled modes, "
                   "e.g. coordinate_descent_tuning=1 (comma list of key=int; 0/1 for switches)")
    a = p.parse_args(argv)
    if a.tiny:  # toy sizes unless given
        a.resolutions = "64x64,32x64" if a.resolutions == ",".join(RESOLUTIONS) else a.resolutions
        a.frames = 5 if a.frames == 81 else a.frames
    modes = [MODES[m] for m in a.modes.split(",") if m]
    out = Path(a.out)
    from wanquant.kernels.attention import env_config

    payload = {**run_metadata(), "rows": [], "attn_config": env_config().describe(),
               "act_launch": os.environ.get(ACT_LAUNCH_ENV) or "default (dispatch.act_plan)",
               "inductor_options": inductor_options(a.inductor_options)}
    if a.resume:
        old = json.loads(Path(a.resume).read_text())
        payload["rows"] = [r for r in old["rows"] if "error" not in r]
        payload["command"] = f"{old.get('command', '')} ; {payload['command']}"
        payload["commit"] = old.get("commit", payload["commit"]) + (
            "" if old.get("commit") == payload["commit"] else f" / {payload['commit']}")
    import torch._dynamo

    # One compiled block per (mode, size, bin): more than the default 8 entries in one run.
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    bench = Bench(a)
    done = {(r["mode"], r["resolution"]) for r in payload["rows"]}
    for res in a.resolutions.split(","):
        for mode in modes:
            if (mode.name, res) in done:
                continue
            if a.budget_s and time.perf_counter() - bench.t0 > a.budget_s:
                bench.say(f"budget of {a.budget_s:.0f} s spent: stopping before {mode.name} {res} (use --resume)")
                save(payload, out)
                return 0
            bench.say(f"{mode.name} {res} ...")
            try:
                row = bench.run(mode, res)
            except Exception as e:  # keep the rows measured so far; the error is the row
                traceback.print_exc()
                row = {"mode": mode.name, "resolution": res, "error": f"{type(e).__name__}: {e}"}
            free()
            payload["rows"].append(row)
            bench.say(f"{mode.name} {res}: " + ", ".join(
                f"{k} {_f(row.get(k), 4)}" for k in ("step_s", "attention_s", "linears_s", "other_s", "warmup_s",
                                                     "rel_diff_vs_eager_1block")))
            save(payload, out)
    for t in targets(payload["rows"]):
        bench.say(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
