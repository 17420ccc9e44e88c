"""LoRAs on the W4A4 experts (issue 14): forward overhead and load / switch time.

Full Wan2.2-I2V-A14B shapes with random weights (``benchmarks.common.a14b``: both
experts built directly as W4A4 layers on the GPU, never in BF16), fast path:

* one high-noise expert forward at 480x832x81 (32,760 tokens, 512 text tokens) with 0,
  1 and 2 LoRAs of rank ``--rank`` on every block linear (q, k, v, o of both attentions,
  FFN up and down: the layout of the Lightning / LightX2V distillation LoRAs); medians of
  ``--repeats`` CUDA-synchronised forwards after ``--warmup`` (Triton compiles the wider
  branch's kernels there). Target: one rank-64 LoRA <= 5 % over none.
* time to load a LoRA pair (one file per expert, diffusers keys, bf16, written to
  ``--lora-dir`` first, so read from the page cache) into both experts, and to switch
  to another pair (unload + load); both after every layer's fast path is prepared, so
  the time includes re-preparing the branch operands. Target: <= 2 s each.

Writes ``benchmarks/results/lora.{json,md}``. ``--tiny`` runs the same code at toy sizes
on the CPU (reference path) as a dry run, writing to /tmp unless ``--out`` is given.

    python -m benchmarks.lora                # H100: about 3-5 minutes, < 40 GB
    python -m benchmarks.lora --tiny         # CPU dry run
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import meta
from benchmarks.common.a14b import A14B, BOUNDARY_RATIO, TINY_EXPERT, bind_experts, build_expert, build_scheduler

BLOCK_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_lora_file(path: Path, cfg: dict, rank: int, seed: int, device: torch.device) -> int:
    """A random rank-``rank`` LoRA on every block linear of an expert, diffusers keys, bf16; returns bytes."""
    from safetensors.torch import save_file

    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    shapes = {m: (dim, dim) for m in BLOCK_MODULES}
    shapes["ffn.net.0.proj"] = (cfg["ffn_dim"], dim)
    shapes["ffn.net.2"] = (dim, cfg["ffn_dim"])
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for i in range(cfg["num_layers"]):
        for m, (n, k) in shapes.items():
            key = f"transformer.blocks.{i}.{m}"
            a = torch.randn(rank, k, generator=g, device=device) / k**0.5
            b = torch.randn(n, rank, generator=g, device=device) * 0.01
            sd[f"{key}.lora_A.weight"] = a.to(torch.bfloat16).cpu()
            sd[f"{key}.lora_B.weight"] = b.to(torch.bfloat16).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path.stat().st_size


def time_forward(expert, inputs: dict, device: torch.device, warmup: int, repeats: int):
    """``(seconds of the timed forwards, the last output)``."""
    times, out = [], None
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync(device)
            t0 = time.perf_counter()
            out = expert(**inputs)[0]
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times, out


def layer_check(expert, device: torch.device) -> dict:
    """The fused q|k|v layer of block 0 with its LoRAs: fast path vs reference on 256 tokens."""
    from wanquant.runtime.expert import quantized_layers

    name, layer = next((n, m) for n, m in quantized_layers(expert).items() if n.endswith("attn1.to_qkv"))
    x = (torch.randn(256, layer.in_features, device=device) * 2).to(torch.bfloat16)
    c, o = layer._clip_host[layer.state.bin_index]
    with torch.inference_mode():
        got = layer(x).float()
        want = layer.forward_reference(x, c, o).float()
    return {"layer": name, "backend": layer.backend_reason, "rank": layer.rank + layer.lora_rank,
            "rel_err_vs_reference": float((got - want).norm() / want.norm())}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f} %"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (dry run of the same code)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 64; --tiny: 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards (and load/switch rounds) per setting")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards after each LoRA change")
    p.add_argument("--lora-dir", default="/tmp/wanquant_lora_bench", help="where the random LoRA files are written")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; --tiny: /tmp/...)")
    p.add_argument("--commit", default=None, help="git commit to record (a copied tree has no .git)")
    args = p.parse_args(argv)
    if args.commit:
        os.environ["WANQUANT_COMMIT"] = args.commit
    t_start = time.perf_counter()

    from diffusers import WanImageToVideoPipeline

    from wanquant.api import list_loras, load_lora, unload_loras
    from wanquant.method.config import wanquant_preset

    device = torch.device("cpu" if args.tiny else "cuda")
    cfg = dict(TINY_EXPERT) if args.tiny else dict(A14B)
    rank = args.rank or (8 if args.tiny else 64)
    # 480x832x81 -> latents [21, 60, 104] -> 21 x 30 x 52 = 32,760 tokens; 512 text tokens.
    latent = (2, 8, 8) if args.tiny else (21, 60, 104)
    text_tokens = 16 if args.tiny else 512
    out_dir = Path(args.out) if args.out else (Path("/tmp/wanquant_lora_tiny") if args.tiny else meta.RESULTS_DIR)
    qcfg = wanquant_preset()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    torch.manual_seed(0)
    experts = [build_expert(cfg, True, device, qcfg) for _ in range(2)]
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=build_scheduler(),
                                   transformer=experts[0], transformer_2=experts[1], boundary_ratio=BOUNDARY_RATIO)
    bind_experts(pipe, qcfg)
    log(f"built both W4A4 experts ({cfg['num_layers']} blocks, base rank {qcfg.lowrank.rank}) on {device}")

    lora_dir = Path(args.lora_dir)
    files = {}
    for i, tag in enumerate(("a_high", "a_low", "b_high", "b_low")):
        files[tag] = lora_dir / f"{tag}.safetensors"
        size = write_lora_file(files[tag], cfg, rank, 100 + i, device)
    log(f"wrote 4 LoRA files of rank {rank} ({size / 1e6:.0f} MB each) to {lora_dir}")

    g = torch.Generator(device=device).manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, cfg["in_channels"], *latent, generator=g, device=device).to(torch.bfloat16),
        timestep=torch.tensor([950.0], device=device),
        encoder_hidden_states=torch.randn(1, text_tokens, cfg["text_dim"], generator=g, device=device)
        .to(torch.bfloat16),
        return_dict=False,
    )
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)

    # ---- forward: 0, 1, 2 LoRAs on the high-noise expert --------------------------------
    rows, checks = [], []
    high = pipe.transformer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for n in (0, 1, 2):
        if n >= 1:
            load_lora(pipe, files["a_high" if n == 1 else "b_high"], expert="transformer", name=f"l{n}")
        times, y = time_forward(high, inputs, device, args.warmup, args.repeats)
        y = y.float()
        if n == 0:
            y0 = y
        med = statistics.median(times)
        rows.append({"loras": n, "rank": 0 if n == 0 else rank, "forward_s": med, "forward_s_all": times,
                     "overhead_vs_none": None if n == 0 else med / rows[0]["forward_s"] - 1.0,
                     # the LoRAs really ran: how much the output moved (random weights, so only > 0 matters)
                     "output_rel_change_vs_none": float((y - y0).norm() / y0.norm()),
                     "output_finite": bool(torch.isfinite(y).all())})
        checks.append({"loras": n, **layer_check(high, device)})
        log(f"{n} LoRA(s): forward {med:.3f} s (all {', '.join(f'{t:.3f}' for t in times)}); "
            f"qkv check {checks[-1]['rel_err_vs_reference']:.2e}")
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    unload_loras(pipe)

    # ---- load and switch a LoRA pair on both experts --------------------------------------
    # Prepare the low-noise expert's fast path too (a forward), as in a generation.
    time_forward(pipe.transformer_2, dict(inputs, timestep=torch.tensor([500.0], device=device)), device, 1, 0)
    del y, y0
    gc.collect()
    # load: pair A into empty experts; switch: pair B replaces it under the same names
    # (load_lora(..., replace=True): each fast-path branch re-prepared once); unload: all.
    load_times, switch_times, unload_times = [], [], []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        load_lora(pipe, files["a_high"], expert="transformer", name="high")
        load_lora(pipe, files["a_low"], expert="transformer_2", name="low")
        sync(device)
        load_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        load_lora(pipe, files["b_high"], expert="transformer", name="high", replace=True)
        load_lora(pipe, files["b_low"], expert="transformer_2", name="low", replace=True)
        sync(device)
        switch_times.append(time.perf_counter() - t0)
        loaded = list_loras(pipe)
        t0 = time.perf_counter()
        unload_loras(pipe)
        sync(device)
        unload_times.append(time.perf_counter() - t0)
        gc.collect()
    load_s, switch_s = statistics.median(load_times), statistics.median(switch_times)
    log(f"load pair {load_s:.3f} s (all {load_times}), switch pair {switch_s:.3f} s (all {switch_times}), "
        f"unload {statistics.median(unload_times):.3f} s")

    payload = {
        **meta.run_metadata(),
        "rows": rows,
        "load_s": load_s,
        "switch_s": switch_s,
        "load_s_all": load_times,
        "switch_s_all": switch_times,
        "unload_s_all": unload_times,
        "targets": {"overhead_one_lora": 0.05, "load_s": 2.0, "switch_s": 2.0},
        "setup": {"tiny": args.tiny, "tokens": tokens, "text_tokens": text_tokens, "lora_rank": rank,
                  "base_rank": qcfg.lowrank.rank, "blocks": cfg["num_layers"], "lora_modules_per_block":
                  list(BLOCK_MODULES), "lora_file_mb": size / 1e6, "loras_in_load_switch": [r["name"] for r in loaded],
                  "warmup": args.warmup, "repeats": args.repeats, "peak_allocated_gb_forward": peak_gb,
                  "gemm": os.environ.get("WANQUANT_GEMM", "triton"), "wall_s": time.perf_counter() - t_start},
        "layer_checks": checks,
    }
    one = rows[1]["overhead_vs_none"]
    table = "\n".join([
        (f"One high-noise A14B expert forward, {tokens:,} tokens, backend: {checks[0]['backend']}; "
         f"LoRAs of rank {rank} on every block linear (base branch rank {qcfg.lowrank.rank}); "
         f"median of {args.repeats} after {args.warmup} warm-up."),
        "",
        "| LoRAs | rank | forward (s) | overhead vs none |",
        "|---|---|---|---|",
        *(f"| {r['loras']} | {r['rank']} | {r['forward_s']:.3f} | {_pct(r['overhead_vs_none'])} |" for r in rows),
        "",
        f"- one rank-{rank} LoRA: {100 * one:+.1f} % (target <= +5 %): {'met' if one <= 0.05 else 'NOT met'}",
        (f"- load a LoRA pair into both experts: {load_s:.2f} s; switch to another pair: {switch_s:.2f} s "
         f"(target <= 2 s each: {'met' if max(load_s, switch_s) <= 2.0 else 'NOT met'}); files "
         f"{size / 1e6:.0f} MB each, diffusers keys, from the page cache; unload all: "
         f"{statistics.median(unload_times):.2f} s"),
        ("- fused q|k|v layer with LoRAs, fast path vs reference: "
         + ", ".join(f"{c['loras']} LoRA(s) {c['rel_err_vs_reference']:.1e}" for c in checks)),
        f"- peak allocated during the forwards: {peak_gb:.1f} GB" if peak_gb is not None else "- CPU dry run",
    ])
    j, m = meta.write_results("lora", payload, table, out_dir)
    log(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
