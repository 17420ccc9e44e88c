"""``wanquant`` command line: quantize, generate, inspect, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from wanquant import api

log = logging.getLogger("wanquant")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _gen_args(p: argparse.ArgumentParser, steps: int) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--height", type=int, help="frame height (default: the model's)")
    g.add_argument("--width", type=int, help="frame width (default: the model's)")
    g.add_argument("--frames", type=int, help="number of frames (default: the model's)")
    g.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    g.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance scale")
    g.add_argument("--negative-prompt", default="", help="negative prompt")


def _settings(args):
    d = api.default_settings(args.model)
    return dataclasses.replace(
        d, height=args.height or d.height, width=args.width or d.width, num_frames=args.frames or d.num_frames,
        num_inference_steps=args.steps, guidance_scale=args.guidance, negative_prompt=args.negative_prompt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanquant", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    q.add_argument("--blocks-per-pass", type=int, help="blocks calibrated per pass (bounds memory; resumable)")
    q.add_argument("--reservoir-tokens", type=int, default=4096, help="sampled tokens kept per layer and bin")
    q.add_argument("--calib-shards", type=int,
                   help="split the samples into this many shards merged in shard order (default: one per process "
                        "under torchrun, else 1); the same shards give the same checkpoint on any number of GPUs")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--restart", action="store_true", help="discard an unfinished run instead of resuming it")
    _gen_args(q, steps=10)

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
    _gen_args(g, steps=40)

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
    # Under torchrun: one process per GPU (cuda:LOCAL_RANK, NCCL) or CPU process (gloo).
    dist = api.init_distributed(args.device)
    main = dist is None or dist.is_main
    try:
        if not main:
            logging.getLogger().setLevel(logging.WARNING)
        device = dist.device if dist is not None else args.device
        samples = api.load_calibration(args.calib, args.num_samples)
        pipe = api.load_base_pipeline(args.model, device, DTYPES[args.dtype])
        out = api.quantize(pipe, samples, args.out, cfg, _settings(args), args.blocks_per_pass,
                           args.reservoir_tokens, overwrite=args.overwrite, restart=args.restart,
                           shards=args.calib_shards, dist=dist)
    finally:
        if dist is not None:
            dist.close()
    if main:
        print(f"wrote {out}")
    return 0


def cmd_generate(args) -> int:
    # Under torchrun: every rank runs the same generation with the sequence split across
    # ranks (diffusers context parallelism); rank 0 writes the files.
    dist = api.init_distributed(args.device)
    main = dist is None or dist.is_main
    try:
        if not main:
            logging.getLogger().setLevel(logging.WARNING)
        device = dist.device if dist is not None else args.device
        # With a checkpoint, the 16-bit experts are loaded only to verify the source model.
        with_experts = args.quantized is None or args.verify_source
        pipe = api.load_base_pipeline(args.model, device, DTYPES[args.dtype], with_experts=with_experts)
        if args.quantized:
            api.load_quantized(pipe, args.quantized, device=device, backend=args.backend,
                               allow_mismatch=args.allow_mismatch)
        settings = _settings(args)
        if dist is not None:  # after the W4A4 experts are in place: CP hooks live on module instances
            api.check_context_parallel_shape(pipe, settings.height, settings.width, settings.num_frames)
            api.enable_context_parallel(pipe, args.ulysses_degree, args.ring_degree)
        api.generate(pipe, args.image, args.prompt, settings, args.seed, out=args.out if main else None,
                     progress=main)
    finally:
        if dist is not None:
            dist.close()
    if main:
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


def cmd_inspect(args) -> int:
    rows = api.inspect(args.checkpoint, verify=not args.no_verify)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(args.checkpoint))
    for col in ("expert", "layer", "shape", "format", "rank", "alpha", "clip (ratio, offset) per bin", "rel_err"):
        table.add_column(col)
    for r in rows:
        clip = " ".join(f"({c:g},{int(o):+d})" for c, o in (r["clip"] or []))
        err = f"{r['rel_err']:.4f}" if isinstance(r["rel_err"], (int, float)) else "-"
        table.add_row(f"{r['expert']} ({r['role']})", r["layer"], "x".join(map(str, r["shape"])), r["format"],
                      str(r["rank"]), str(r["alpha"]), clip, err)
    Console(width=200).print(table)
    return 0


def cmd_demo(args) -> int:
    from wanquant.demo import run_demo

    report = run_demo(Path(args.out), num_calib=args.num_calib, num_eval=args.num_eval, steps=args.steps,
                      preset_name=args.preset, device=args.device)
    print(f"report: {report}")
    return 0


COMMANDS = {"quantize": cmd_quantize, "generate": cmd_generate, "inspect": cmd_inspect, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (api.CheckpointError, FileNotFoundError, FileExistsError, ValueError, TypeError, KeyError) as e:
        print(f"wanquant {args.command}: error: {e}", file=sys.stderr)
        if args.verbose:
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
