"""Calibration cost of the real Wan2.2-I2V-A14B on one GPU: components measured at full
size, the whole run projected with a cost model, the model checked against a complete
smaller run.

Random weights (time and memory do not depend on the values, DESIGN.md section 7), the
A14B configuration of :mod:`benchmarks.common.a14b`. Measured:

1. ``gram``: ``X^T X`` of one forward's tokens at K = 5120 / 13824: fp32, the bf16 GEMM
   with fp32 output (what calibration uses on CUDA), and the host-spilled variant;
   error of each against fp64.
2. ``check``: a complete expert-major calibration (:func:`quantize_pipeline`) of the A14B
   pipeline with one block per expert at ``--check-*`` settings, timed end to end, and
   its components measured separately on the same pipeline (text encoding, the pipeline
   around the experts with both experts stubbed, one expert forward with and without
   statistics hooks); the cost model's prediction of the check run must be within 10 %.
3. ``full``: one expert with all 40 blocks at the paper's size (480x832, 61 frames):
   a forward without and with hooks on ``--hooked-blocks`` blocks (the per-block hook
   cost scales to 40), the per-layer PTQ of whole blocks, merging two shards'
   statistics of a block, writing and reading a block's layers, and host<->device
   copies of blocks (the expert swaps).

The projection (:func:`project`) is the paper's settings (12 samples, 40 steps, CFG, one
trajectory pass, both experts) on one GPU. The four-GPU row is not run here.

    python -m benchmarks.calibration_cost --out DIR            # GPU, about 4-5 minutes
    python -m benchmarks.calibration_cost --tiny --out DIR     # CPU dry run (toy sizes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common.a14b import (
    A14B, BOUNDARY_RATIO, TINY_EXPERT, TINY_UMT5, TINY_VAE, UMT5_XXL, VAE_FULL, build_expert, build_scheduler,
    build_text_encoder, build_tokenizer, build_vae,
)
from benchmarks.common.inputs import random_calib_samples
from benchmarks.common.meta import run_metadata, write_results
from benchmarks.common.meters import GB, cuda_sync, free
from wanquant.calibration import passes
from wanquant.calibration import run as run_mod
from wanquant.calibration.budget import hessian_bytes, spill_plan
from wanquant.calibration.collect import StatsCollector
from wanquant.calibration.config import CalibrationRun
from wanquant.method.config import preset
from wanquant.method.layer import quantize_layer
from wanquant.model.pipeline import GenerationSettings, encode_prompts, run_pipeline
from wanquant.model.wan import ExpertSpec, blocks_of, experts_of, input_key, quant_targets
from wanquant.numerics.stats import (
    HESSIAN_STRIP, HessianAccumulator, LayerStatsAccumulator, accumulate_gram, admission_threshold,
)

PAPER = dict(samples=12, height=480, width=832, frames=61, steps=40, guidance=3.5)


def timed(fn, device, reps: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` (device work included)."""
    for _ in range(warmup):
        fn()
    cuda_sync(device)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        cuda_sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def host_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB


def gpu_peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------
# inputs and models
def latent_shape(cfg: dict, height: int, width: int, frames: int) -> tuple[int, ...]:
    return (1, cfg["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8)


def tokens_of(cfg: dict, height: int, width: int, frames: int) -> int:
    _, _, f, h, w = latent_shape(cfg, height, width, frames)
    p = cfg["patch_size"]
    return (f // p[0]) * (h // p[1]) * (w // p[2])


def forward_args(cfg: dict, height: int, width: int, frames: int, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    return dict(hidden_states=torch.randn(latent_shape(cfg, height, width, frames), generator=g).to(device, torch.bfloat16),
                timestep=torch.tensor([950.0], device=device),
                encoder_hidden_states=torch.randn(1, 512, cfg["text_dim"], generator=g).to(device, torch.bfloat16),
                return_dict=False)


def build_pipeline(expert_cfg: dict, te_cfg: dict, vae_cfg: dict, device, max_len: int):
    """The A14B I2V pipeline (random weights) with ``expert_cfg``'s blocks per expert."""
    from diffusers import WanImageToVideoPipeline

    torch.manual_seed(0)
    experts = [build_expert(expert_cfg, False, device, None) for _ in range(2)]
    pipe = WanImageToVideoPipeline(tokenizer=build_tokenizer(max_len), text_encoder=build_text_encoder(te_cfg, device),
                                   vae=build_vae(vae_cfg, device), scheduler=build_scheduler(), transformer=experts[0],
                                   transformer_2=experts[1], boundary_ratio=BOUNDARY_RATIO)
    pipe.vae.enable_tiling()
    return pipe


def high_spec(expert) -> ExpertSpec:
    return ExpertSpec("transformer", "high", expert, 1000.0, 1000.0 * BOUNDARY_RATIO)


def settings_of(height, width, frames, steps, guidance) -> GenerationSettings:
    return GenerationSettings(height=height, width=width, num_frames=frames, num_inference_steps=steps,
                              guidance_scale=guidance, guidance_scale_2=guidance, max_sequence_length=512)


# ---------------------------------------------------------------------------------------
# components
def gram_bench(device, tokens: int, ks: tuple[int, ...]) -> dict:
    """``X^T X`` of one forward: the full matrix (fp32, bf16 GEMM with fp32 output), the packed
    upper strips calibration stores (:class:`HessianAccumulator`), and those strips spilled to
    host memory (formed here, copied out asynchronously, added on the host; timed to arrival)."""
    out = {}
    for k in ks:
        x = (torch.randn(tokens, k, device=device) * torch.rand(k, device=device) * 3).bfloat16()
        ref = (x.double().T @ x.double()) if device.type == "cuda" or k <= 1024 else None
        row = {}
        for name, fast, where in (("fp32", False, None), ("bf16_gemm", True, None), ("bf16_strips", True, device),
                                  ("bf16_strips_spilled", True, torch.device("cpu"))):
            if name.endswith("spilled") and device.type != "cuda":
                continue
            if where is None:
                h = torch.zeros(k, k, device=device)
                step = lambda: accumulate_gram(h, x, 1, fast)  # noqa: E731
                full, stored = (lambda: h), k * k
            else:
                acc = HessianAccumulator(k, device=where, fast=fast)
                step = lambda: (acc.update(x), acc._settled(), acc.path)[-1]  # noqa: E731
                full, stored = (lambda: acc.hessian), acc.packed.numel()
            path = step()  # once, for the error; then timed
            err = None
            if ref is not None:
                err = float((full().double().to(device) - ref).abs().max() / ref.abs().max())
            t = timed(step, device)
            row[name] = {"ms": t * 1e3, "path": path, "max_rel_err_vs_fp64": err, "stored_mb": stored * 4 / 1e6}
            h = acc = None
        out[str(k)] = row
        del x, ref
        free()
    return out


def _timestep_per_bin(spec: ExpertSpec, qcfg) -> list[float]:
    bins = spec.timestep_bins(qcfg)
    per_bin: dict[int, float] = {}
    for t in range(int(spec.t_start) - 1, int(spec.t_end), -1):
        per_bin.setdefault(bins.bin_of(float(t)), float(t))
    return list(per_bin.values())


def forward_costs(expert, cfg, qcfg, args: dict, hooked_blocks: int, device, tokens: int, forwards_per_bin: int,
                  reps: int = 2) -> dict:
    """One expert forward without statistics, and with statistics on ``hooked_blocks`` blocks.

    Hooked forwards cost a fixed part (Hessians, maxima, reservoir keys) and the reservoir
    copies. A calibration run plans its reservoirs (:meth:`StatsCollector.expect`): over the
    ``forwards_per_bin`` forwards of a bin each admits about ``capacity + 6 sqrt(capacity)``
    tokens, spread evenly. Measured: the fixed part with every reservoir's capacity 0
    (nothing enters; timing only), then, with a fresh collector planned for
    ``forwards_per_bin`` forwards per bin, one forward per bin, its copies waited for; the
    seconds per copied byte come from the difference. :func:`project` adds the copies a
    whole run makes (:func:`expected_copied_rows`).
    """
    spec = high_spec(expert)
    targets = {spec.attr: [t for t in quant_targets(expert, qcfg) if t.block < hooked_blocks]}
    with torch.inference_mode():
        plain = timed(lambda: expert(**args), device, reps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ts = _timestep_per_bin(spec, qcfg)

    def forward(t: float) -> None:
        expert(**dict(args, timestep=torch.tensor([t], device=device)))

    col = StatsCollector([spec], targets, qcfg)  # outside inference mode, as calibration builds it
    cap = next((r.capacity for a in col.acc[spec.attr].values() for r in a.reservoirs), 0)
    col.set_cond_context(args["encoder_hidden_states"])
    with torch.inference_mode():
        with col:
            for a in col.acc[spec.attr].values():
                for r in a.reservoirs:
                    r.capacity = 0
            fixed = timed(lambda: forward(ts[0]), device, reps)
    del col
    free()
    col = StatsCollector([spec], targets, qcfg)
    col.plan_forwards({spec.attr: {b: forwards_per_bin for b in range(len(ts))}}, 1, checked=False)
    col.set_cond_context(args["encoder_hidden_states"])

    def copied() -> int:
        return sum(r.n_copied * a.k * 2 for a in col.acc[spec.attr].values() for r in a.reservoirs)

    with torch.inference_mode():
        with col:
            cuda_sync(device)
            t0 = time.perf_counter()
            for t in ts:
                forward(t)
            col.settle()
            cuda_sync(device)
            planned_s = (time.perf_counter() - t0) / len(ts)
            planned_b = copied() / len(ts)
            # After a whole run every reservoir holds `capacity` tokens; the PTQ measured on this
            # collector (the clip search reads them) needs that too: one unplanned round fills them.
            for a in col.acc[spec.attr].values():
                for r in a.reservoirs:
                    r.threshold = 1.0
            for t in ts:
                forward(t)
            col.settle()
        peak = gpu_peak_gb(device)
    per_forward = {input_key(t): t.shape[1] for t in targets[spec.attr] if not t.group.static_per_video}
    row_bytes = 2 * sum(per_forward.values()) / hooked_blocks
    per_byte = max(0.0, planned_s - fixed) / planned_b if planned_b else 0.0
    return {"plain_s": plain, "hooked_fixed_s": fixed, "hooked_planned_s": planned_s,
            "hooked_blocks": hooked_blocks, "hook_per_block_s": max(0.0, fixed - plain) / hooked_blocks,
            "copy_s_per_byte": per_byte, "capacity": cap, "tokens": tokens, "forwards_per_bin": forwards_per_bin,
            "row_bytes_per_block": row_bytes,  # one token of every per-forward input of a block
            "copied_mb_per_forward": planned_b / 1e6,
            "bins": len(ts), "peak_gb_hooked": peak, "collector": col, "spec": spec, "targets": targets}


def forwards_per_bin(samples: int, steps: int, bins: int, cfg_forwards: int = 2, experts: int = 2) -> int:
    """Hooked forwards of one expert's bin in a run (:func:`project`'s even split)."""
    return max(1, round(samples * steps * cfg_forwards / (experts * bins)))


def expected_copied_rows(capacity: int, tokens: int, forwards: float) -> float:
    """Expected tokens copied into one planned reservoir over ``forwards`` batches of ``tokens``:
    those with keys below :func:`admission_threshold` (all of them for a short stream)."""
    stream = max(0, int(round(forwards))) * tokens
    return stream * admission_threshold(capacity, stream) if stream else 0.0


STAGES = ("finalize", "smooth", "lowrank", "gptq", "clip", "eval")


def ptq_block_costs(col: StatsCollector, spec: ExpertSpec, targets, configs: dict, blocks: list[int], device) -> dict:
    """The per-layer PTQ of whole blocks under each of ``configs`` (name -> QuantConfig; the
    first is the one projected), with the seconds of each stage summed per block (``finalize``:
    the statistics read back, the full Hessian built from its strips)."""
    out = {name: {"per_layer_s": {}, "stages_s": dict.fromkeys(STAGES, 0.0)} for name in configs}
    params = {}
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    nb = spec.timestep_bins(next(iter(configs.values()))).num_bins
    for t in targets[spec.attr]:
        if t.block not in blocks:
            continue
        w, b = t.fused_weight()
        cuda_sync(device)
        t0 = time.perf_counter()
        stats = col.finalize(spec.attr, t.name)
        cuda_sync(device)
        fin = time.perf_counter() - t0
        for name, qcfg in configs.items():
            t0 = time.perf_counter()
            p = quantize_layer(w, b, stats, qcfg, nb, name=t.name)
            cuda_sync(device)
            o = out[name]
            o["per_layer_s"][t.name] = time.perf_counter() - t0 + fin
            o["stages_s"]["finalize"] += fin / len(blocks)
            for st in STAGES[1:]:
                o["stages_s"][st] += p.report["seconds"].get(st, 0.0) / len(blocks)
            if name == next(iter(configs)):
                params[t.name] = p
        del stats
    for o in out.values():
        o["per_block_s"] = [sum(v for n, v in o["per_layer_s"].items() if n.startswith(f"blocks.{i}.")) for i in blocks]
        o["block_s"] = statistics.mean(o["per_block_s"])
    transient = (torch.cuda.max_memory_allocated(device) - base) / GB if device.type == "cuda" else None
    return {"configs": out, "block_s": next(iter(out.values()))["block_s"], "params": params,
            "transient_gb": transient}  # above the statistics and weights already resident


def merge_cost(col: StatsCollector, spec: ExpertSpec, targets, block: int, device) -> float:
    """Folding a second shard's statistics of one block into the first (what S > 1 adds per shard)."""
    accs = [col.acc[spec.attr][input_key(t)] for t in targets[spec.attr] if t.block == block]
    copies = []
    for a in accs:
        c = LayerStatsAccumulator(a.k, a.num_bins, 0, a.quantile, device=a.hessian.packed.device, seed=a.k + 1)
        c.hessian.packed.copy_(a.hessian._settled())
        copies.append(c)
    cuda_sync(device)
    t0 = time.perf_counter()
    for a, c in zip(accs, copies):
        a.merge(c)
    cuda_sync(device)
    return time.perf_counter() - t0


def io_cost(params: dict, tmp: Path) -> dict:
    """Writing a block's layers to the work directory and reading them back (the checkpoint does both)."""
    cpu = {n: p.to(torch.device("cpu")) for n, p in params.items()}
    path = tmp / "block.safetensors"
    t0 = time.perf_counter()
    run_mod._save_layers(path, cpu)
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_mod._load_layers(path, [type("T", (), {"name": n})() for n in cpu])
    read = time.perf_counter() - t0
    return {"block_write_s": write, "block_read_s": read, "block_bytes": path.stat().st_size}


def swap_cost(expert, device, blocks: int = 4) -> dict:
    """Moving ``blocks`` blocks to host memory and back: GB/s each way (pageable, as ``module.to``)."""
    if device.type != "cuda":
        return {"d2h_gbps": None, "h2d_gbps": None}
    mods = list(blocks_of(expert))[:blocks]
    nbytes = sum(p.numel() * p.element_size() for m in mods for p in m.parameters())
    cuda_sync(device)
    t0 = time.perf_counter()
    for m in mods:
        m.to("cpu")
    cuda_sync(device)
    d2h = time.perf_counter() - t0
    t0 = time.perf_counter()
    for m in mods:
        m.to(device)
    cuda_sync(device)
    h2d = time.perf_counter() - t0
    return {"d2h_gbps": nbytes / GB / d2h, "h2d_gbps": nbytes / GB / h2d, "bytes": nbytes}


def pipeline_around_experts(pipe, settings, sample, device) -> dict:
    """Text encoding of one sample, and one pipeline run with both experts returning zeros
    (VAE condition encoding, latents, scheduler): what every expert-major run of a sample adds."""
    te = timed(lambda: encode_prompts(pipe, sample.prompt, settings.negative_prompt, settings, device), device, 2)
    pos, neg = encode_prompts(pipe, sample.prompt, settings.negative_prompt, settings, device)
    originals = {}
    for e in experts_of(pipe):
        def zeros(*a, _oc=e.module.config.out_channels, **k):
            h = k["hidden_states"]
            return (h.new_zeros((h.shape[0], _oc, *h.shape[2:])),)
        originals[e.attr] = e.module
        e.module.forward = zeros
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        around = timed(lambda: run_pipeline(pipe, sample.image, sample.prompt, settings, sample.seed,
                                            output_type="latent", prompt_embeds=pos, negative_prompt_embeds=neg),
                       device, 1)
    finally:
        for m in originals.values():
            del m.forward
    extra = (torch.cuda.max_memory_allocated(device) - base) / GB if device.type == "cuda" else None
    return {"text_encode_s": te, "pipeline_without_experts_s": around, "around_peak_extra_gb": extra}


# ---------------------------------------------------------------------------------------
# the cost model
def project(c: dict, samples: int, steps: int, cfg_forwards: int, blocks: int, experts: int, cond_only: bool,
            expert_bytes: float, te_bytes: float, gpus: int = 1, bins: int = 3) -> dict:
    """Seconds of an expert-major calibration from per-unit costs ``c``.

    forwards: every step runs one live expert forward per CFG branch (the other expert is
    replayed or skipped), hooks on every block (cond-only: on the conditional ones): a fixed
    part per block and forward, and the reservoir copies (:func:`expected_copied_rows`);
    around: each expert's run of a sample repeats the pipeline around the experts (VAE
    condition encoding, scheduler); PTQ per block; the work files are written, read and
    written again into the checkpoint; expert swaps and the text encoder moves over PCIe.
    On ``gpus`` ranks, samples and layers split evenly (statistics merges added).
    """
    per_sample = samples / gpus
    n_fwd = per_sample * steps * cfg_forwards
    hooked_fwd = n_fwd / cfg_forwards if cond_only else n_fwd
    # reservoir copies: per expert and bin, the fill's bytes times the expected copies over its forwards
    per_bin = hooked_fwd / (experts * bins)  # an even split: the most copies for this many forwards
    rows = expected_copied_rows(c["capacity"], c["tokens"], per_bin)
    copied_bytes = experts * bins / gpus * blocks * c["row_bytes_per_block"] * rows
    parts = {
        "text_encode": per_sample * c["text_encode_s"],
        "around_experts": per_sample * experts * c["pipeline_without_experts_s"],
        "forwards": n_fwd * c["forward_s"],
        "hooks": hooked_fwd * blocks * c["hook_per_block_s"] + c["copy_s_per_byte"] * copied_bytes,
        "ptq": blocks * experts / gpus * c["ptq_block_s"],
        "checkpoint_io": blocks * experts * (2 * c["block_write_s"] + c["block_read_s"]),
        "swaps": (2 * expert_bytes / c["d2h_gbps"] + 2 * expert_bytes / c["h2d_gbps"]
                  + te_bytes / c["d2h_gbps"] + te_bytes / c["h2d_gbps"]) / GB if c.get("d2h_gbps") else 0.0,
        "merge": (blocks * experts * c["merge_block_s"] * (gpus - 1) / gpus) if gpus > 1 else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


def stats_memory(cfg: dict, blocks: int) -> dict:
    """One expert's Hessians on the device as stored (packed upper strips; the k/v input shared
    by every block), and as full matrices; the host reservoirs. GB."""
    d, f = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]

    def expert(strip):  # qkv, out, attn2 q, attn2 out, ffn up; ffn down; attn2 k/v once (the context)
        per_block = 5 * hessian_bytes(d, strip=strip) + hessian_bytes(f, strip=strip)
        return per_block, blocks * per_block + hessian_bytes(d, strip=strip)

    per_block, total = expert(HESSIAN_STRIP)
    res = 3 * 4096 * 2 * (blocks * (5 * d + f) + d)  # 3 bins x 4096 bf16 tokens per input
    # The first forward of a bin copies every reservoir's tokens out through pinned buffers, which
    # torch's host allocator rounds up to a power of two and keeps for reuse.
    pinned = blocks * sum(2 ** math.ceil(math.log2(4096 * 2 * k)) for k in (d, d, d, d, d, f))
    return {"per_block_gb": per_block / GB, "stats_expert_gb": total / GB, "stats_expert_full_gb": expert(None)[1] / GB,
            "hessian_strip": HESSIAN_STRIP, "reservoirs_gb": res / GB, "pinned_staging_gb": pinned / GB}


# ---------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU dry run at toy sizes")
    ap.add_argument("--out", help="results directory (default: benchmarks/results)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--hooked-blocks", type=int, default=24)
    ap.add_argument("--ptq-blocks", type=int, default=1)
    ap.add_argument("--check-res", default="480x832")
    ap.add_argument("--check-frames", type=int, default=17)
    ap.add_argument("--check-steps", type=int, default=8)
    ap.add_argument("--check-samples", type=int, default=2)
    ap.add_argument("--gpu-memory-gb", type=float, default=None, help="device memory for the plan (default: the device's)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    expert_cfg, te_cfg, vae_cfg = (TINY_EXPERT, TINY_UMT5, TINY_VAE) if args.tiny else (A14B, UMT5_XXL, VAE_FULL)
    paper = dict(PAPER, height=64, width=64, frames=9, steps=4) if args.tiny else dict(PAPER)
    ch, cw = (32, 32) if args.tiny else map(int, args.check_res.split("x"))
    check = dict(height=ch, width=cw, frames=5 if args.tiny else args.check_frames,
                 steps=4 if args.tiny else args.check_steps, samples=args.check_samples, guidance=3.5)
    qcfg = preset("wanquant")
    torch.backends.cuda.matmul.allow_tf32 = False
    result: dict = {"settings": {"paper": paper, "check": check, "preset": "wanquant", "schedule": "expert_major",
                                 "hooked_blocks": args.hooked_blocks, "tiny": args.tiny}}
    t_all = time.perf_counter()
    partial = Path(args.out or ".") / "calibration_cost_partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)

    def log(*a) -> None:  # progress, and what is measured so far (a run cut short keeps it)
        print(f"[{time.perf_counter() - t_all:6.1f}s]", *a, flush=True)
        if args.out:
            partial.write_text(json.dumps(result, indent=1, default=str))

    # 1. the Hessian GEMM
    ptok = tokens_of(expert_cfg, paper["height"], paper["width"], paper["frames"])
    d, f = expert_cfg["num_attention_heads"] * expert_cfg["attention_head_dim"], expert_cfg["ffn_dim"]
    result["gram"] = {"tokens": ptok, **gram_bench(device, ptok, (d, f))}
    log("gram", json.dumps(result["gram"]))

    # 2. the check run: one block per expert, complete, and its components
    one_block = dict(expert_cfg, num_layers=1)
    pipe = build_pipeline(one_block, te_cfg, vae_cfg, device, 512)
    if not args.tiny:
        pipe.to(torch.device(device))
    settings = settings_of(check["height"], check["width"], check["frames"], check["steps"], check["guidance"])
    samples = random_calib_samples(check["samples"], check["height"], check["width"])
    comp = pipeline_around_experts(pipe, settings, samples[0], device)
    full_settings = settings_of(paper["height"], paper["width"], paper["frames"], paper["steps"], paper["guidance"])
    comp_full = pipeline_around_experts(pipe, full_settings, random_calib_samples(1, paper["height"], paper["width"])[0],
                                        device)
    result["components"] = {"check_around": comp, "full_around_experts": comp_full}
    log("around the experts", comp, comp_full)
    fa = forward_args(one_block, check["height"], check["width"], check["frames"], device)
    nb = len(_timestep_per_bin(high_spec(pipe.transformer), qcfg))
    fc = forward_costs(pipe.transformer, one_block, qcfg, fa, 1, device,
                       tokens_of(one_block, check["height"], check["width"], check["frames"]),
                       forwards_per_bin(check["samples"], check["steps"], nb))
    del fc["collector"], fc["targets"], fc["spec"]
    free()
    parts = {"collect": 0.0, "quantize_layers": 0.0, "_finish": 0.0}
    reals = {n: getattr(passes if n != "_finish" else run_mod, n) for n in parts}

    def wrap(name):
        def w(*a, **k):
            t0 = time.perf_counter()
            out = reals[name](*a, **k)
            cuda_sync(device)
            parts[name] += time.perf_counter() - t0
            return out
        return w

    for n in parts:
        setattr(passes if n != "_finish" else run_mod, n, wrap(n))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        run = CalibrationRun(settings, progress=False)
        t0 = time.perf_counter()
        run_mod.quantize_pipeline(pipe, samples, qcfg, run, Path(tmp) / "q", overwrite=True, restart=True)
        cuda_sync(device)
        check_wall = time.perf_counter() - t0
        ckpt_bytes = sum(p.stat().st_size for p in (Path(tmp) / "q").rglob("*") if p.is_file())
    for n in parts:
        setattr(passes if n != "_finish" else run_mod, n, reals[n])
    check_peak = gpu_peak_gb(device)
    te_bytes = sum(p.numel() * p.element_size() for p in pipe.text_encoder.parameters())
    vae_bytes = sum(p.numel() * p.element_size() for p in pipe.vae.parameters())
    one_expert_bytes = sum(p.numel() * p.element_size() for p in pipe.transformer_2.parameters())
    del pipe
    free()
    result["check"] = {"measured_wall_s": check_wall, "measured_parts_s": parts, "forward": fc}
    log("check run", check_wall, parts)

    # 3. full size: one expert with every block
    expert = build_expert(expert_cfg, False, device, None)
    expert_bytes = sum(p.numel() * p.element_size() for p in expert.parameters())
    hooked = min(args.hooked_blocks, expert_cfg["num_layers"])
    fa_full = forward_args(expert_cfg, paper["height"], paper["width"], paper["frames"], device)
    full = forward_costs(expert, expert_cfg, qcfg, fa_full, hooked, device, ptok,
                         forwards_per_bin(paper["samples"], paper["steps"], nb))
    col, spec, targets = full.pop("collector"), full.pop("spec"), full.pop("targets")
    result["components"]["full"] = full
    log("full forwards", full)
    ptq_blocks = list(range(min(args.ptq_blocks, hooked)))
    for t in targets[spec.attr]:  # free what the PTQ measurement does not read
        if t.block not in ptq_blocks and input_key(t) in col.acc[spec.attr] and t.group.input != "text":
            del col.acc[spec.attr][input_key(t)]
    free()
    merge_s = merge_cost(col, spec, targets, ptq_blocks[0], device)
    variants = {"wanquant": qcfg,  # projected; then the same with the randomized low-rank branch
                "wanquant_randomized_lowrank": dataclasses.replace(
                    qcfg, lowrank=dataclasses.replace(qcfg.lowrank, method="randomized"))}
    ptq = ptq_block_costs(col, spec, targets, variants, ptq_blocks, device)
    params = ptq.pop("params")
    with tempfile.TemporaryDirectory() as tmp:
        io = io_cost({n: p for n, p in params.items() if n.startswith(f"blocks.{ptq_blocks[0]}.")}, Path(tmp))
    del col, params
    free()
    swap = swap_cost(expert, device)
    full_peak = gpu_peak_gb(device)
    result["components"].update(ptq=ptq, io=io, swap=swap, merge_block_s=merge_s)
    log("ptq", {n: (o["block_s"], o["stages_s"]) for n, o in ptq["configs"].items()}, "io", io, "swap", swap)
    del expert
    free()

    # 4. the model: the check run predicted from its own components, then the paper's settings
    unit = {"text_encode_s": comp["text_encode_s"], "pipeline_without_experts_s": comp["pipeline_without_experts_s"],
            "forward_s": fc["plain_s"], "hook_per_block_s": fc["hook_per_block_s"], "ptq_block_s": ptq["block_s"],
            "copy_s_per_byte": fc["copy_s_per_byte"], "row_bytes_per_block": fc["row_bytes_per_block"],
            "capacity": fc["capacity"], "tokens": fc["tokens"],
            "block_write_s": io["block_write_s"], "block_read_s": io["block_read_s"],
            "d2h_gbps": swap["d2h_gbps"], "h2d_gbps": swap["h2d_gbps"], "merge_block_s": merge_s}
    predicted = project(unit, check["samples"], check["steps"], 2, 1, 2, False, one_expert_bytes, te_bytes, bins=nb)
    err = (predicted["total"] - check_wall) / check_wall
    by_part = {"collect": (sum(predicted[k] for k in ("text_encode", "around_experts", "forwards", "hooks", "swaps")),
                           parts["collect"]),
               "quantize_layers": (predicted["ptq"], parts["quantize_layers"]),
               "finish_and_io": (predicted["checkpoint_io"], parts["_finish"]),
               "rest (not modelled)": (0.0, check_wall - sum(parts.values()))}
    unit_full = dict(unit, forward_s=full["plain_s"], hook_per_block_s=full["hook_per_block_s"],
                     copy_s_per_byte=full["copy_s_per_byte"], row_bytes_per_block=full["row_bytes_per_block"],
                     tokens=full["tokens"])
    result["components"] = {"check": {**comp, **{k: v for k, v in fc.items()}}, "full": full, "ptq": ptq,
                            "merge_block_s": merge_s, "io": io, "swap": swap, "unit_costs_full": unit_full}
    unit_full.update(comp_full)  # text encoding and the pipeline around the experts, measured at full size
    result["components"]["full_around_experts"] = comp_full
    blocks = expert_cfg["num_layers"]
    proj = project(unit_full, paper["samples"], paper["steps"], 2, blocks, 2, False, expert_bytes, te_bytes, bins=nb)
    proj_cond = project(unit_full, paper["samples"], paper["steps"], 2, blocks, 2, True, expert_bytes, te_bytes,
                        bins=nb)
    proj4 = project(unit_full, paper["samples"], paper["steps"], 2, blocks, 2, False, expert_bytes, te_bytes, gpus=4,
                    bins=nb)
    mem = stats_memory(expert_cfg, blocks)
    gpu_total = args.gpu_memory_gb or (torch.cuda.get_device_properties(device).total_memory / GB
                                       if device.type == "cuda" else None)
    act_gb = (full["peak_gb_hooked"] or 0) - expert_bytes / GB - mem["per_block_gb"] * hooked - hessian_bytes(d) / GB
    plan = {"expert_gb": expert_bytes / GB, "activations_gb": act_gb,
            "gpu_total_gb": gpu_total}
    if gpu_total:
        # What the code does by default (CalibrationRun.stats_memory_gb=None): the device's free
        # memory with the live expert and the VAE on it, less stats_reserve_gb.
        reserve = CalibrationRun(settings).stats_reserve_gb
        budget = gpu_total - expert_bytes / GB - vae_bytes / GB - reserve
        sizes = {f"{i}.{n}": hessian_bytes(k) for i in range(blocks)
                 for n, k in (("qkv", d), ("o", d), ("q2", d), ("o2", d), ("up", d), ("down", f))}
        sizes["kv"] = hessian_bytes(d)
        spilled = spill_plan(sizes, int(budget * GB))
        spilled_bytes = sum(sizes[k] for k in spilled)
        plan.update(stats_reserve_gb=reserve, stats_budget_gb=budget, spilled_inputs=len(spilled),
                    spilled_gb=spilled_bytes / GB)
        spill_ms = result["gram"][str(f)].get("bf16_strips_spilled", {}).get("ms")
        gemm_ms = result["gram"][str(f)]["bf16_strips"]["ms"]
        if spill_ms is not None:
            per_byte = (spill_ms - gemm_ms) / 1e3 / hessian_bytes(f)  # copy out + host addition, per hooked forward
            n_fwd = paper["samples"] * paper["steps"] * 2
            for pr, hooked_fwd in ((proj, n_fwd), (proj_cond, n_fwd / 2)):
                pr["spill"] = per_byte * spilled_bytes * hooked_fwd
                pr["total"] += pr["spill"]
        transient = max(act_gb, comp_full.get("around_peak_extra_gb") or 0.0)  # a forward, or the VAE encoding
        plan.update(transient_gb=transient, transient_fits_reserve=transient <= reserve)
        resident = (expert_bytes + vae_bytes) / GB + mem["stats_expert_gb"] - spilled_bytes / GB
        plan.update(ptq_transient_gb=ptq["transient_gb"], gpu_peak_collect_gb=resident + transient,
                    gpu_peak_ptq_gb=resident + (ptq["transient_gb"] or 0.0))
        plan["gpu_peak_gb"] = max(plan["gpu_peak_collect_gb"], plan["gpu_peak_ptq_gb"])
    proj_alt = {}  # the whole run's total with each PTQ variant (spill included)
    for name, o in ptq["configs"].items():
        for cond, base in ((False, proj), (True, proj_cond)):
            key = name + ("_cond_only" if cond else "")
            proj_alt[key] = base["total"] + blocks * 2 * (o["block_s"] - ptq["block_s"])
    # host: the parked expert and text encoder, one expert's reservoirs (bf16) and their pinned staging, spilled Hessians,
    # the recorded outputs (one latent per replayed forward), 6 GB of process and libraries
    cache_gb = paper["samples"] * paper["steps"] * 2 * expert_cfg["out_channels"] * 2 * math.prod(
        latent_shape(expert_cfg, paper["height"], paper["width"], paper["frames"])[2:]) / GB
    host_proj = ((expert_bytes + te_bytes) / GB + mem["reservoirs_gb"] + mem["pinned_staging_gb"]
                 + plan.get("spilled_gb", 0) + cache_gb + 6.0)
    result["memory_plan"] = {**plan, **mem, "host_projected_gb": host_proj}
    result["projection"] = {"one_gpu": proj, "one_gpu_cond_only": proj_cond, "four_gpus_model_only": proj4,
                            "one_gpu_total_by_ptq_variant": proj_alt}
    result["check"] = {"measured_wall_s": check_wall, "predicted": predicted, "error": err,
                       "within_10pct": abs(err) <= 0.10, "measured_parts_s": parts,
                       "predicted_vs_measured_s": by_part, "gpu_peak_gb": check_peak,
                       "checkpoint_bytes": ckpt_bytes}
    rows = [
        {"gpus": 1, "what": "paper settings, one trajectory pass", "wall_s": proj["total"], "projected": True,
         "gpu_peak_gb": plan.get("gpu_peak_gb"), "host_peak_gb": host_proj},
        {"gpus": 1, "what": "check run (1 block/expert, check settings)", "wall_s": check_wall, "measured": True,
         "gpu_peak_gb": check_peak, "host_peak_gb": host_peak_gb(), "predicted_s": predicted["total"]},
        {"gpus": 1, "what": "full-size components (one expert, 40 blocks)", "wall_s": None, "measured": True,
         "gpu_peak_gb": full_peak, "host_peak_gb": host_peak_gb()},
        {"gpus": 4, "what": "paper settings end to end", "wall_s": None, "measured": False,
         "note": "not run: the 4-GPU kinds were withheld this session",
         "model_only_s": proj4["total"]},
    ]
    result["rows"] = rows
    result["total_benchmark_s"] = time.perf_counter() - t_all
    md = _markdown(result)
    payload = {**run_metadata(), **result}
    write_results("calibration_cost" + ("_tiny" if args.tiny else ""), payload, md, args.out)
    log("done", json.dumps(rows))


def _fmt(v, nd=1):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _markdown(r: dict) -> str:
    p, c, m = r["projection"]["one_gpu"], r["check"], r["memory_plan"]
    lines = ["| gpus | what | wall s | measured/projected | GPU peak GB | host peak GB |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        kind = "measured" if row.get("measured") else ("projected" if row.get("projected") else "not run")
        lines.append(f"| {row['gpus']} | {row['what']} | {_fmt(row['wall_s'])} | {kind} | {_fmt(row.get('gpu_peak_gb'))} "
                     f"| {_fmt(row.get('host_peak_gb'))} |")
    lines += ["", "Projection, one GPU, paper settings (s):", "",
              "| " + " | ".join(p) + " |", "|" + "---|" * len(p), "| " + " | ".join(_fmt(v) for v in p.values()) + " |",
              "", f"cond-only: {_fmt(r['projection']['one_gpu_cond_only']['total'])} s; 4 GPUs (model only, not run): "
              f"{_fmt(r['projection']['four_gpus_model_only']['total'])} s", "",
              f"Check run: measured {_fmt(c['measured_wall_s'])} s, predicted {_fmt(c['predicted']['total'])} s "
              f"(error {100 * c['error']:+.1f} %, within 10 %: {c['within_10pct']}); predicted / measured s: "
              + ", ".join(f"{k} {_fmt(a)} / {_fmt(b)}" for k, (a, b) in c["predicted_vs_measured_s"].items()), "",
              f"Memory plan: expert {_fmt(m['expert_gb'])} GB + one expert's Hessians {_fmt(m['stats_expert_gb'])} GB "
              f"(upper strips of {m['hessian_strip']} rows; {_fmt(m['stats_expert_full_gb'])} GB as full matrices) "
              f"+ activations {_fmt(m['activations_gb'])} GB; spilled to host: {m.get('spilled_inputs', '-')} inputs, "
              f"{_fmt(m.get('spilled_gb'))} GB; GPU peak while collecting {_fmt(m.get('gpu_peak_collect_gb'))} GB, "
              f"while quantizing {_fmt(m.get('gpu_peak_ptq_gb'))} GB (PTQ temporaries {_fmt(m.get('ptq_transient_gb'))} "
              f"GB); host: reservoirs {_fmt(m['reservoirs_gb'])} GB", ""]
    f = r["components"]["full"]
    lines += [f"Hooks ({f['hooked_blocks']} blocks hooked): fixed part {_fmt(f['hook_per_block_s'], 4)} s per block "
              f"and forward; reservoirs planned for {f['forwards_per_bin']} forwards per bin copy "
              f"{_fmt(f['copied_mb_per_forward'])} MB per forward at {_fmt(f['copy_s_per_byte'] * 1e9, 3)} s per GB; "
              f"forward without hooks {_fmt(f['plain_s'], 3)} s, hooked without copies {_fmt(f['hooked_fixed_s'], 3)} "
              f"s, hooked with planned copies {_fmt(f['hooked_planned_s'], 3)} s", "",
              "PTQ of one block (s per stage; finalize = statistics read back):", "",
              "| config | " + " | ".join(STAGES) + " | block |", "|---|" + "---|" * (len(STAGES) + 1)]
    for name, o in r["components"]["ptq"]["configs"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(o["stages_s"][st], 2) for st in STAGES)
                     + f" | {_fmt(o['block_s'], 2)} |")
    lines += ["", "Whole run by PTQ variant (s): " + ", ".join(
        f"{k} {_fmt(v)}" for k, v in r["projection"]["one_gpu_total_by_ptq_variant"].items()), "",
              "Hessian accumulation of one forward (ms):", "",
              "| K | fp32 | bf16 GEMM, fp32 out | bf16 upper strips (stored) | strips spilled to host |",
              "|---|---|---|---|---|"]
    for k, row in r["gram"].items():
        if k == "tokens":
            continue
        lines.append(f"| {k} | " + " | ".join(_fmt(row.get(n, {}).get("ms"), 2) for n in
                                               ("fp32", "bf16_gemm", "bf16_strips", "bf16_strips_spilled")) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
