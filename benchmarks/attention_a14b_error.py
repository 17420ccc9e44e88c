"""The 8-bit self-attention's output error against fp32 attention, per layer, on activations
of the random-weight Wan2.2-I2V-A14B expert (issue 16's quality report; the testbed's own
per-block numbers are in ``results/attention_testbed.md``).

One cond forward of one expert (RANDOM weights, :mod:`benchmarks.common.a14b`; the
high-noise expert at t = 950, latents ``[1, 36, 21, H/8, W/8]``, 512 text tokens) with the
8-bit self-attention installed. Each of its 40 self-attention calls is recorded as it
runs: on ``--rows`` query rows spread over the sequence (all heads, all keys) the call's
output is compared with fp32 attention of the same q, k, v (no TF32), and so is SDPA's
bf16 output (the error a stock pipeline already has). ``--experts bf16,w4a4``: the BF16
expert, and/or the W4A4 one (random quantized layers, so its activations are not those of
a calibrated checkpoint). Random weights have none of a trained model's outlier channels:
this shows the kernel's error on A14B's shapes and value ranges, not on real activations.

    python -m benchmarks.attention_a14b_error --tiny --out /tmp/x      # CPU dry run
    python -m benchmarks.attention_a14b_error --out OUT                # GPU, 480x832x81
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

import torch

from benchmarks.common.a14b import A14B, HIGH, TINY_EXPERT, build_expert
from benchmarks.common.meta import RESULTS_DIR, run_metadata, write_results
from benchmarks.e2e_speed import T_HIGH, TEXT_TOKENS, latent_shape
from wanquant.kernels import attention as K


@contextlib.contextmanager
def recording(name: str, rows: int, out: list[dict]):
    """Wrap ``K.<name>`` (the function the attention backend calls) so that every call
    appends ``{"call", "tokens", "int8", "sdpa"}`` (relative errors vs fp32) to ``out``."""
    inner = getattr(K, name)

    def wrapper(q, k, v, *args, **kwargs):
        o = inner(q, k, v, *args, **kwargs)
        scale = kwargs.get("scale")
        idx = torch.linspace(0, q.shape[1] - 1, min(rows, q.shape[1]), device=q.device).round().long()
        exact = K.attention_fp32(q[:, idx], k, v, scale).transpose(1, 2)  # [B, rows, H, D]
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q[:, idx].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)
        out.append({"call": len(out), "tokens": q.shape[1], "int8": K.relative_error(o[:, idx], exact),
                    "sdpa": K.relative_error(sdpa, exact)})
        return o

    setattr(K, name, wrapper)
    try:
        yield
    finally:
        setattr(K, name, inner)


def expert_errors(cfg: dict, quantized: bool, res: str, frames: int, rows: int, device: torch.device,
                  reference: bool) -> list[dict]:
    """Per-block errors of one cond forward (see the module docstring)."""
    from wanquant.method.config import wanquant_preset
    from wanquant.model.attention import set_self_attention
    from wanquant.model.wan import bind_expert
    from wanquant.runtime.state import TimestepBins

    qcfg = wanquant_preset()
    torch.manual_seed(0)
    model = build_expert(cfg, quantized, device, qcfg)
    if quantized:
        bind_expert(model, TimestepBins(1000.0, 900.0, tuple(qcfg.bins_for(HIGH).edges)))
    set_self_attention(model, "int8_reference" if reference else "int8")
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(latent_shape(res, frames, cfg["in_channels"]), generator=gen, device=device).bfloat16()
    ctx = torch.randn(1, TEXT_TOKENS if cfg is A14B else 16, cfg["text_dim"], generator=gen,
                      device=device).bfloat16()
    calls: list[dict] = []
    with recording("attention_int8_reference" if reference else "attention_int8", rows, calls), torch.no_grad():
        model(hidden_states=x, timestep=torch.tensor([T_HIGH], device=device), encoder_hidden_states=ctx,
              return_dict=False)
    if len(calls) != cfg["num_layers"]:
        raise RuntimeError(f"recorded {len(calls)} self-attention calls, expected one per block "
                           f"({cfg['num_layers']}): the 8-bit backend did not run where it should")
    del model
    return [{"expert": "w4a4" if quantized else "bf16", "block": c["call"], "tokens": c["tokens"],
             "rel_err_int8_vs_fp32": c["int8"], "rel_err_sdpa_bf16_vs_fp32": c["sdpa"]} for c in calls]


def report(rows: list[dict], out: Path, meta: dict, setup: dict) -> None:
    experts = sorted({r["expert"] for r in rows})
    summary = {}
    for e in experts:
        mine = [r for r in rows if r["expert"] == e]
        i8 = [r["rel_err_int8_vs_fp32"] for r in mine]
        summary[e] = {"int8_mean": statistics.mean(i8), "int8_max": max(i8),
                      "int8_worst_block": max(mine, key=lambda r: r["rel_err_int8_vs_fp32"])["block"],
                      "sdpa_mean": statistics.mean(r["rel_err_sdpa_bf16_vs_fp32"] for r in mine)}
    lines = [f"Setup: {setup}", "", "| expert | int8 mean | int8 max (block) | SDPA bf16 mean |", "|---|---|---|---|"]
    lines += [f"| {e} | {s['int8_mean']:.4f} | {s['int8_max']:.4f} ({s['int8_worst_block']}) | {s['sdpa_mean']:.4f} |"
              for e, s in summary.items()]
    lines += ["", "Per block (relative error of the output vs fp32 attention on the sampled query rows):", "",
              "| block | " + " | ".join(f"{e} int8 | {e} SDPA" for e in experts) + " |",
              "|---|" + "---|---|" * len(experts)]
    for b in sorted({r["block"] for r in rows}):
        cells = []
        for e in experts:
            r = next(r for r in rows if r["expert"] == e and r["block"] == b)
            cells += [f"{r['rel_err_int8_vs_fp32']:.4f}", f"{r['rel_err_sdpa_bf16_vs_fp32']:.4f}"]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    payload = {**meta, "setup": setup, "summary": summary, "rows": rows}
    write_results("attention_a14b_error", payload, "\n".join(lines), out)
    plot(rows, experts, out / "attention_a14b_error.png")


def plot(rows: list[dict], experts: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for e in experts:
        mine = sorted((r for r in rows if r["expert"] == e), key=lambda r: r["block"])
        blocks = [r["block"] for r in mine]
        ax.plot(blocks, [r["rel_err_int8_vs_fp32"] for r in mine], marker="o", ms=3, label=f"{e}: 8-bit")
        ax.plot(blocks, [r["rel_err_sdpa_bf16_vs_fp32"] for r in mine], ls="--", label=f"{e}: SDPA bf16")
    ax.set(xlabel="block", ylabel="relative error vs fp32", yscale="log",
           title="Self-attention output error, random A14B expert")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU dry run: a 2-block toy expert, the PyTorch reference")
    p.add_argument("--res", default=None, help="HxW (default 480x832; 32x32 with --tiny)")
    p.add_argument("--frames", type=int, default=None, help="default 81 (5 with --tiny)")
    p.add_argument("--rows", type=int, default=1024, help="query rows compared per call")
    p.add_argument("--experts", default="bf16,w4a4", help="comma list of bf16, w4a4")
    p.add_argument("--out", default=str(RESULTS_DIR))
    a = p.parse_args(argv)
    device = torch.device("cpu" if a.tiny else "cuda")
    cfg = TINY_EXPERT if a.tiny else A14B
    res = a.res or ("32x32" if a.tiny else "480x832")
    frames = a.frames or (5 if a.tiny else 81)
    setup = {"resolution": res, "frames": frames, "rows": a.rows, "timestep": T_HIGH,
             "attention": "PyTorch reference (same numbers)" if a.tiny else f"kernel {K.env_config().describe()}"}
    rows = []
    for e in a.experts.split(","):
        if e not in ("bf16", "w4a4"):
            raise SystemExit(f"unknown expert {e!r}: use bf16 and/or w4a4")
        rows += expert_errors(cfg, e == "w4a4", res, frames, a.rows, device, reference=a.tiny)
        print(f"{e}: " + ", ".join(f"{r['rel_err_int8_vs_fp32']:.4f}" for r in rows if r["expert"] == e), flush=True)
    report(rows, Path(a.out), run_metadata(), setup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
