"""``wanquant`` command line: quantize, generate, inspect, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import torch

from wanquant import api
from wanquant.calibration.config import SCHEDULES as CALIB_SCHEDULES

log = logging.getLogger("wanquant")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _gen_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--height", type=int, help="frame height, a multiple of 16 (default: the model's)")
    g.add_argument("--width", type=int, help="frame width, a multiple of 16 (default: the model's)")
    g.add_argument("--frames", type=int, help="number of frames (default: the model's)")
    g.add_argument("--steps", type=int,
                   help="denoising steps (default: the model's; testbed 10, Wan2.2 40)")
    g.add_argument("--vae-dtype", default="fp32", choices=sorted(DTYPES),
                   help="the VAE's dtype (default fp32 for every model, as Wan's own examples)")
    g.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance scale")
    g.add_argument("--negative-prompt", default="", help="negative prompt")


def _settings(args):
    """The model's defaults, with the options given (a given 0 stays 0, to be refused)."""
    d = api.default_settings(args.model)

    def given(value, default):
        return default if value is None else value

    return dataclasses.replace(
        d, height=given(args.height, d.height), width=given(args.width, d.width),
        num_frames=given(args.frames, d.num_frames), num_inference_steps=given(args.steps, d.num_inference_steps),
        guidance_scale=args.guidance, negative_prompt=args.negative_prompt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanquant", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks on errors)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate a Wan pipeline and write a W4A4 checkpoint")
    q.add_argument("--model", default="testbed", help="diffusers pipeline directory, or 'testbed' (default)")
    q.add_argument("--calib", default="testbed",
                   help="JSONL manifest of {\"image\", \"prompt\"} lines, or 'testbed' (its calibration split)")
    q.add_argument("--num-samples", type=int, help="use only the first N calibration samples")
    q.add_argument("--out", required=True, help="output checkpoint directory")
    q.add_argument("--preset", default="wanquant", choices=sorted(api.PRESETS), help="method preset")
    q.add_argument("--config", help="JSON file with a full QuantConfig (overrides --preset)")
    q.add_argument("--skip-blocks", type=int, nargs="*",
                   help="blocks kept 16-bit (e.g. 0 -1); replaces the preset's or --config's list")
    q.add_argument("--blocks-per-pass", type=int,
                   help="blocks calibrated per pass (default: all, one trajectory pass per expert); fewer bound GPU "
                        "memory at the cost of one trajectory per pass; an interrupted run resumes per pass")
    q.add_argument("--reservoir-tokens", type=int, default=4096, help="sampled tokens kept per layer and bin")
    q.add_argument("--calib-shards", type=int,
                   help="split the samples into this many shards merged in shard order (default: one per process "
                        "under torchrun, else 1); the same shards give the same checkpoint on any number of GPUs")
    q.add_argument("--cond-only", action="store_true",
                   help="collect statistics on the conditional (prompted) forwards only, as the paper's code does: "
                        "half the statistics work under classifier-free guidance (both branches still run); "
                        "gives another checkpoint than the default (both branches)")
    q.add_argument("--calib-schedule", default="expert_major", choices=list(CALIB_SCHEDULES),
                   help="expert_major (default): one trajectory pass, one expert's BF16 weights and statistics on "
                        "the GPU at a time (the other waits in host memory); interleaved: both experts hooked in "
                        "one run (same statistics, needs both on the device)")
    q.add_argument("--stats-memory-gb", type=float, metavar="GB",
                   help="GPU memory for calibration statistics; Hessians beyond it are kept in host memory (slower). "
                        "Default: what is free on the GPU less 6 GB (one A14B expert's Hessians take 29 GB)")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--restart", action="store_true", help="discard an unfinished run instead of resuming it")
    _gen_args(q)

    g = sub.add_parser("generate", help="generate a video with a quantized (or BF16) pipeline")
    g.add_argument("--model", default="testbed", help="diffusers pipeline directory, or 'testbed'")
    g.add_argument("--quantized", help="wanquant checkpoint directory (omit for BF16)")
    g.add_argument("--image", required=True, help="first frame (PNG/JPEG)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", required=True, help="output .mp4 (a frame strip .png is written beside it)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "unpack_bf16", "fast"])
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    g.add_argument("--verify-source", action="store_true",
                   help="also load the 16-bit experts to check the checkpoint was made from these weights")
    g.add_argument("--allow-mismatch", action="store_true", help="skip the source-model fingerprint check")
    g.add_argument("--ulysses-degree", type=int,
                   help="under torchrun: Ulysses context-parallel degree (default: processes / ring degree)")
    g.add_argument("--ring-degree", type=int, default=1, help="under torchrun: ring-attention degree (default 1)")
    g.add_argument("--memory", default="off", choices=["off", *api.MEMORY_POLICIES],
                   help="'off' (default): everything loads on --device as given. 'resident' (both experts on the GPU), "
                        "'low' (only the running expert; the other waits in pinned host memory: 720p x 81 in 16 GB, "
                        "480p x 81 in 12 GB, benchmarks/results/memory.md) or 'auto' (resident if it fits the free "
                        "GPU memory, else low; the choice and why are logged): use auto on 12-24 GB cards. "
                        "Not with torchrun")
    g.add_argument("--attention", default="auto", choices=list(api.ATTENTION_MODES),
                   help="self-attention: 'auto' (default: int8 on a Hopper GPU, sdpa elsewhere and under torchrun; "
                        "the choice is logged), 'sdpa' (PyTorch) or 'int8' (wanquant's 8-bit kernel: INT8 Q.K^T, "
                        "FP8 P.V; CUDA GPUs with FP8 tensor cores, e.g. H100; not with context parallelism yet)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (one compilation serves all blocks; the first step "
                        "at a video size compiles: 5-13 s per expert on an H100). Not with --memory or torchrun yet")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="a LoRA file (diffusers/PEFT, original Wan, ComfyUI or Kohya keys), strength default 1; "
                        "repeatable. Without --lora-2 it goes to both experts; with --lora-2 only to the high-noise "
                        "expert (transformer). E.g. a 4-step Lightning pair: --lora high.safetensors "
                        "--lora-2 low.safetensors --steps 4 --guidance 1")
    g.add_argument("--lora-2", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="a LoRA file for the low-noise expert (transformer_2); repeatable")
    _gen_args(g)

    i = sub.add_parser("inspect", help="per-layer table of a checkpoint (format, rank, clip tables, errors)")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    i.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every file")

    d = sub.add_parser("demo", help="the whole job offline on the embedded testbed model, with a report")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--num-calib", type=int, default=4, help="calibration samples")
    d.add_argument("--num-eval", type=int, default=2, help="evaluation samples shown in the report")
    d.add_argument("--steps", type=int, default=10, help="denoising steps")
    d.add_argument("--preset", default="wanquant", choices=sorted(api.PRESETS))
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def _quant_config(args) -> api.QuantConfig:
    """``--config`` (a whole QuantConfig) or ``--preset``; ``--skip-blocks`` only when given."""
    cfg = api.QuantConfig.from_dict(json.loads(Path(args.config).read_text())) if args.config else api.preset(args.preset)
    if args.skip_blocks is not None:
        if args.config and cfg.precision.skip_blocks and cfg.precision.skip_blocks != args.skip_blocks:
            log.warning("--skip-blocks %s replaces skip_blocks %s from %s", args.skip_blocks,
                        cfg.precision.skip_blocks, args.config)
        cfg.precision.skip_blocks = list(args.skip_blocks)
    return cfg


def cmd_quantize(args) -> int:
    cfg = _quant_config(args)
    settings = _settings(args)
    calib = {"cond_only": args.cond_only, "schedule": args.calib_schedule, "stats_memory_gb": args.stats_memory_gb}
    # Under torchrun: one process per GPU (cuda:LOCAL_RANK, NCCL) or CPU process (gloo).
    dist = api.init_distributed(args.device)
    main = dist is None or dist.is_main
    try:
        if not main:
            logging.getLogger().setLevel(logging.WARNING)
        # Everything that can be wrong without a model is found before one is loaded;
        # rank 0 checks (the output's lock is one file) and tells the others.
        def check() -> None:
            api.check_quantize_inputs(args.model, args.out, cfg, settings, args.blocks_per_pass,
                                      args.reservoir_tokens, args.calib_shards, args.overwrite, **calib)

        if dist is not None:
            dist.on_main(check)
        else:
            check()
        device = dist.device if dist is not None else args.device
        samples = api.load_calibration(args.calib, args.num_samples)
        pipe = api.load_base_pipeline(args.model, device, DTYPES[args.dtype], vae_dtype=DTYPES[args.vae_dtype])
        out = api.quantize(pipe, samples, args.out, cfg, settings, args.blocks_per_pass,
                           args.reservoir_tokens, overwrite=args.overwrite, restart=args.restart,
                           shards=args.calib_shards, dist=dist, **calib)
    finally:
        if dist is not None:
            dist.close()
    if main:
        print(f"wrote {out}")
    return 0


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:STRENGTH]`` -> (path, strength); a colon not followed by a number is part of the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _load_loras(pipe, args) -> None:
    """``--lora`` to both experts, or to the high-noise one when ``--lora-2`` is given too."""
    first = "transformer" if args.lora_2 else "both"
    for items, expert in ((args.lora, first), (args.lora_2, "transformer_2")):
        for text in items:
            path, strength = parse_lora_arg(text)
            name = api.load_lora(pipe, path, strength=strength, expert=expert,
                                 name=f"{Path(path).stem}@{expert}")
            log.info("LoRA %s at strength %g on %s", name, strength, expert)


def cmd_generate(args) -> int:
    # Before the first CUDA allocation: growable segments instead of fixed-size blocks keep
    # the allocator's reserve close to what it hands out (small GPUs), unless the user chose.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # Under torchrun: every rank runs the same generation with the sequence split across
    # ranks (diffusers context parallelism); rank 0 writes the files.
    dist = api.init_distributed(args.device)
    main = dist is None or dist.is_main
    try:
        if not main:
            logging.getLogger().setLevel(logging.WARNING)
        device = dist.device if dist is not None else args.device
        settings = _settings(args)
        out = args.out if main else None
        api.check_generate_inputs(settings, args.prompt, args.image, out, args.backend, device, args.model,
                                  args.quantized)
        api.check_attention(args.attention)  # before loading: int8 needs a GPU with FP8 tensor cores
        if args.compile and (dist is not None or args.memory != "off"):
            raise ValueError("--compile does not support --memory policies or torchrun yet; drop one of them")
        if dist is not None and args.memory == "low":
            raise ValueError("--memory low does not support context parallelism (torchrun) yet; use --memory resident")
        # With a checkpoint, the 16-bit experts are loaded only to verify the source model.
        with_experts = args.quantized is None or args.verify_source
        # The memory policy places every part: a quantized pipeline is loaded into host memory
        # first (a 12 GB GPU never holds both experts at once).
        policy = dist is None and args.memory != "off"
        load_device = "cpu" if policy and not with_experts and torch.device(device).type == "cuda" else device
        pipe = api.load_base_pipeline(args.model, load_device, DTYPES[args.dtype], with_experts=with_experts,
                                      vae_dtype=DTYPES[args.vae_dtype])
        if args.quantized:
            api.load_quantized(pipe, args.quantized, device=load_device, backend=args.backend,
                               allow_mismatch=args.allow_mismatch)
        _load_loras(pipe, args)
        if dist is not None and args.attention == "auto":
            args.attention = "sdpa"  # the 8-bit kernel has no context-parallel path yet
        if dist is not None and args.attention != "sdpa":
            raise ValueError(f"--attention {args.attention} does not support context parallelism (torchrun) yet; "
                             "use --attention sdpa")
        api.set_attention(pipe, args.attention, device)  # after load_quantized: it replaces the experts
        if dist is not None:  # after the W4A4 experts are in place: CP hooks live on module instances
            api.check_context_parallel_shape(pipe, settings.height, settings.width, settings.num_frames)
            api.enable_context_parallel(pipe, args.ulysses_degree, args.ring_degree)
        elif policy:  # last: it places the parts the steps above loaded
            api.set_memory_policy(pipe, args.memory, device, settings)
        api.set_compile(pipe, args.compile)  # last: it compiles the blocks as set up above
        api.generate(pipe, args.image, args.prompt, settings, args.seed, out=out, progress=None if main else False)
    finally:
        if dist is not None:
            dist.close()
    if main:
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


def cmd_inspect(args) -> int:
    """The per-layer table and, per expert, quantized/expected layers; exit 1 on a shortfall."""
    info = api.inspect(args.checkpoint, verify=not args.no_verify)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        _print_layer_table(args.checkpoint, info["layers"])
        for attr, cov in info["experts"].items():
            print(f"{attr} ({cov['role']}): {cov['quantized']} of {cov['expected']} layers quantized")
    short = {a: c for a, c in info["experts"].items() if not c["complete"]}
    for attr, cov in short.items():
        print(f"wanquant inspect: error: {args.checkpoint}: {attr} holds {cov['quantized']} of the "
              f"{cov['expected']} quantized layers its config calls for (missing {cov['missing'][:5]}, unexpected "
              f"{cov['unexpected'][:5]}, other shape {list(cov['wrong_shape'])[:5]}); the checkpoint is incomplete: "
              "re-quantize", file=sys.stderr)
    return 1 if short else 0


def _print_layer_table(title, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(title))
    for col in ("expert", "layer", "shape", "format", "rank", "alpha", "clip (ratio, offset) per bin", "rel_err"):
        table.add_column(col)
    for r in rows:
        clip = " ".join(f"({c:g},{int(o):+d})" for c, o in (r["clip"] or []))
        err = f"{r['rel_err']:.4f}" if isinstance(r["rel_err"], (int, float)) else "-"
        table.add_row(f"{r['expert']} ({r['role']})", r["layer"], "x".join(map(str, r["shape"])), r["format"],
                      str(r["rank"]), str(r["alpha"]), clip, err)
    Console(width=200).print(table)


def cmd_demo(args) -> int:
    from wanquant.demo import run_demo

    report = run_demo(Path(args.out), num_calib=args.num_calib, num_eval=args.num_eval, steps=args.steps,
                      preset_name=args.preset, device=args.device)
    print(f"report: {report}")
    return 0


# Failures a user can fix (bad input, missing or busy files, a wrong checkpoint); anything
# else is a bug and keeps its traceback.
EXPECTED_ERRORS = (api.CheckpointError, api.OutputBusyError, OSError, ValueError, TypeError, KeyError)
COMMANDS = {"quantize": cmd_quantize, "generate": cmd_generate, "inspect": cmd_inspect, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except EXPECTED_ERRORS as e:
        # One line naming the problem and the fix; the traceback only when asked for.
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"wanquant {args.command}: error: {message}", file=sys.stderr)
        if args.verbose or args.debug:
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
