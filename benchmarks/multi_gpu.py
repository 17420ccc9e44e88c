"""Multi-GPU scaling: calibration wall time on 1 vs 2 GPUs, quantized 720p generation on 1/2/4 GPUs.

Every measurement is a real ``torchrun`` job of this script (``--worker``), using the
code paths users run: :func:`wanquant.calibration.run.quantize_pipeline` with a process
group (sample shards, exact statistics merge, layers quantized across ranks) and
:func:`wanquant.model.parallel.enable_context_parallel` (diffusers Ulysses/ring
attention) over W4A4 experts. The driver starts one job per GPU count and writes
``benchmarks/results/multi_gpu.{json,md}``:

* calibration: wall time of ``quantize_pipeline`` (model build excluded), its collection
  and quantization parts, per-rank peak GPU memory; scaling efficiency ``T1 / (N * TN)``;
  with ``--check-identical`` also the 1-GPU run with ``--calib-shards 2`` and whether its
  checkpoint equals the 2-GPU one bit for bit (the documented guarantee);
* generation: per-forward latency of each expert (CUDA-synchronised, median), denoising
  wall time, per-rank peak GPU memory, for N = 1, 2, 4 (Ulysses degree N by default).

Models: ``--model DIR`` (a diffusers Wan2.2-I2V directory; with ``--quantized Q`` for
generation) or, by default, the real A14B configuration with RANDOM weights built on each
GPU by :mod:`benchmarks.common.a14b` (values change neither time nor memory;
DESIGN.md section 7). For calibration the random model keeps ``--calib-layers`` blocks
per expert (every block costs the same, so scaling is unchanged; the row says how many).

    python -m benchmarks.multi_gpu --tiny                 # CPU/gloo dry run of every path (not results)
    python -m benchmarks.multi_gpu                        # on a host with >= 4 GPUs
    python -m benchmarks.multi_gpu --parts calibrate --gpus 1,2 --check-identical
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common.a14b import random_a14b_pipeline, tiny_testbed_pipeline
from benchmarks.common.compare import saved_difference
from benchmarks.common.inputs import random_calib_samples, random_image
from benchmarks.common.meta import REPO_ROOT, run_metadata, write_results
from benchmarks.common.meters import cuda_sync, peak_gb


# ---------------------------------------------------------------------------------------
# settings (in a worker)


def _settings(args, calib: bool):
    from wanquant.model.pipeline import GenerationSettings

    res = args.calib_res if calib else args.res
    h, w = (int(v) for v in res.split("x"))
    return GenerationSettings(height=h, width=w, num_frames=args.calib_frames if calib else args.frames,
                              num_inference_steps=args.calib_steps if calib else args.steps,
                              guidance_scale=args.guidance, max_sequence_length=args.max_len)


def _quant_config(args):
    from wanquant.method.config import preset

    if not args.tiny:
        return preset(args.preset)
    from wanquant.method.config import ClipConfig, GPTQConfig, LowRankConfig, QuantConfig, SmoothConfig

    return QuantConfig(smooth=SmoothConfig(alpha_grid=[0.4, 0.6]), lowrank=LowRankConfig(rank=8),
                       gptq=GPTQConfig(block_size=32), clip=ClipConfig(clip_ratios=[0.8, 1.0], exp_offsets=[0, 1],
                                                                        max_tokens=512))


# ---------------------------------------------------------------------------------------
# workers (one per rank, started by torchrun)


def worker_calibrate(args, dist) -> dict:
    import torch

    from wanquant.calibration import passes
    from wanquant.calibration import run as run_mod

    device = dist.device if dist else torch.device(args.device if args.device != "cuda" else "cuda:0")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    qcfg = _quant_config(args)
    if args.tiny:
        pipe = tiny_testbed_pipeline(device, dtype)
    elif args.model:
        from wanquant.api import load_base_pipeline

        pipe = load_base_pipeline(args.model, device, dtype)
    else:
        pipe = random_a14b_pipeline(device, args.calib_layers, False, qcfg, args.max_len)
    settings = _settings(args, calib=True)
    samples = random_calib_samples(args.calib_samples, settings.height, settings.width)
    parts = {"collect": 0.0, "quantize": 0.0}
    for name, key in (("collect", "collect"), ("quantize_layers", "quantize")):  # the two halves of every pass
        real = getattr(passes, name)

        def timed(*a, _real=real, _key=key, **k):
            t = time.perf_counter()
            out = _real(*a, **k)
            cuda_sync(device)
            parts[_key] += time.perf_counter() - t
            return out

        setattr(passes, name, timed)  # this worker process only
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = run_mod.CalibrationRun(settings, args.blocks_per_pass, args.reservoir_tokens, progress=False,
                                 shards=args.calib_shards)
    if dist:
        dist.barrier()
    t0 = time.perf_counter()
    run_mod.quantize_pipeline(pipe, samples, qcfg, run, args.work_out, overwrite=True, restart=True, dist=dist)
    cuda_sync(device)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "collect_s": parts["collect"], "quantize_s": parts["quantize"],
            "peak_gb": peak_gb(device), "device": str(device)}


def worker_generate(args, dist) -> dict:
    import torch

    from wanquant.model.pipeline import run_pipeline

    device = dist.device if dist else torch.device(args.device if args.device != "cuda" else "cuda:0")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    qcfg = _quant_config(args)
    settings = _settings(args, calib=False)
    if args.tiny:
        from wanquant.loading import load_quantized

        pipe = tiny_testbed_pipeline(device, dtype)
        pipe.register_modules(transformer=None, transformer_2=None)
        load_quantized(pipe, args.quantized, device=device)
    elif args.model:
        from wanquant.api import load_base_pipeline, load_quantized

        pipe = load_base_pipeline(args.model, device, dtype, with_experts=False)
        load_quantized(pipe, args.quantized, device=device)
    else:
        pipe = random_a14b_pipeline(device, None, True, qcfg, args.max_len)
    cp = None
    if dist is not None:  # after the W4A4 experts are in place
        from wanquant.model.parallel import check_context_parallel_shape, enable_context_parallel

        check_context_parallel_shape(pipe, settings.height, settings.width, settings.num_frames)
        info = enable_context_parallel(pipe, args.ulysses or None, args.ring)
        cp = {"ulysses": info.ulysses_degree, "ring": info.ring_degree, "backend": info.attention_backend}
    times: dict[str, list[float]] = {"transformer": [], "transformer_2": []}
    for attr in times:
        m = getattr(pipe, attr)
        start = {}

        def pre(mod, a, k, _s=start):
            cuda_sync(device)
            _s["t"] = time.perf_counter()

        def post(mod, a, k, out, _s=start, _attr=attr):
            cuda_sync(device)
            times[_attr].append(time.perf_counter() - _s["t"])

        m.register_forward_pre_hook(pre, with_kwargs=True)
        m.register_forward_hook(post, with_kwargs=True)
    image = random_image(settings.height, settings.width)
    out_type = "np" if args.decode else "latent"
    for _ in range(args.warmup):  # kernels, autotuning, NCCL communicators
        run_pipeline(pipe, image, "a red ball moves left", settings, 0, output_type=out_type)
    for v in times.values():
        v.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if dist:
        dist.barrier()
    t0 = time.perf_counter()
    frames = run_pipeline(pipe, image, "a red ball moves left", settings, 0, output_type=out_type)
    cuda_sync(device)
    wall = time.perf_counter() - t0
    if dist is None or dist.is_main:  # what the 1-GPU row is compared with
        torch.save(torch.as_tensor(frames).float().cpu(), args.part + ".output.pt")
    med = {a: (statistics.median(v) if v else None) for a, v in times.items()}
    return {"wall_s": wall, "forward_median_s": med, "forwards": {a: len(v) for a, v in times.items()},
            "peak_gb": peak_gb(device), "device": str(device), "cp": cp}


def worker_main(args) -> int:
    from wanquant.distributed import init_distributed

    dist = init_distributed(args.device)
    try:
        fn = worker_calibrate if args.worker == "calibrate" else worker_generate
        row = fn(args, dist)
        rows = dist.all_gather_object(row) if dist else [row]
        if dist is None or dist.is_main:
            Path(args.part).write_text(json.dumps({"ranks": rows}, indent=1))
    finally:
        if dist is not None:
            dist.close()
    return 0


# ---------------------------------------------------------------------------------------
# driver


def _launch(args, worker: str, nproc: int, part: Path, extra: list[str]) -> dict:
    # --module: each rank runs ``python -m benchmarks.multi_gpu`` from the repository root.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--module", "benchmarks.multi_gpu", "--worker", worker, "--part", str(part), *extra]
    # torchrun sets OMP_NUM_THREADS=1 only when it starts several processes: give every
    # job the same CPU threads per process, or the 1-process rows are not comparable.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.job_timeout, cwd=REPO_ROOT, env=env)
    job = {"command": " ".join(cmd[1:]), "returncode": r.returncode, "job_s": time.perf_counter() - t,
           "omp_threads": args.threads}
    if r.returncode != 0 or not part.exists():
        job["error"] = (r.stderr or r.stdout)[-3000:]
        print(f"FAILED ({worker}, {nproc} proc): {job['error'][-1500:]}", file=sys.stderr)
        return job
    job.update(json.loads(part.read_text()))
    return job


def _common(args) -> list[str]:
    out = ["--device", args.device, "--preset", args.preset, "--guidance", str(args.guidance),
           "--max-len", str(args.max_len)]
    if args.tiny:
        out.append("--tiny")
    if args.model:
        out += ["--model", args.model]
    return out


def _identical(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    for sub in ("transformer", "transformer_2"):
        fa, fb = a / sub / "diffusion_pytorch_model.safetensors", b / sub / "diffusion_pytorch_model.safetensors"
        if not fa.exists() or not fb.exists():
            return False
        ta, tb = load_file(str(fa)), load_file(str(fb))
        if ta.keys() != tb.keys() or any(not torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def run_calibration(args, work: Path) -> dict:
    gpus = [int(g) for g in args.gpus.split(",") if int(g) <= 2]
    base = _common(args) + ["--calib-res", args.calib_res, "--calib-frames", str(args.calib_frames),
                            "--calib-steps", str(args.calib_steps), "--calib-samples", str(args.calib_samples),
                            "--reservoir-tokens", str(args.reservoir_tokens)]
    if args.blocks_per_pass:
        base += ["--blocks-per-pass", str(args.blocks_per_pass)]
    if args.calib_layers:
        base += ["--calib-layers", str(args.calib_layers)]
    rows = []
    for n in gpus:
        out = work / f"calib_{n}"
        job = _launch(args, "calibrate", n, work / f"calib_{n}.json", base + ["--work-out", str(out)])
        rows.append({"gpus": n, "shards": n, **job})
    if args.check_identical and 2 in gpus:
        out = work / "calib_1_shards2"
        job = _launch(args, "calibrate", 1, work / "calib_1s2.json",
                      base + ["--work-out", str(out), "--calib-shards", "2"])
        job["identical_to_2_gpus"] = _identical(out, work / "calib_2")
        rows.append({"gpus": 1, "shards": 2, **job})
    one = next((r for r in rows if r["gpus"] == 1 and r["shards"] == 1 and "ranks" in r), None)
    for r in rows:
        if "ranks" in r:
            r["wall_s"] = max(x["wall_s"] for x in r["ranks"])
            r["peak_gb_per_rank"] = [x["peak_gb"] for x in r["ranks"]]
            if one and r["shards"] == r["gpus"]:
                r["speedup"] = one["ranks"][0]["wall_s"] / r["wall_s"]
                r["scaling_efficiency"] = r["speedup"] / r["gpus"]
    return {"settings": {"res": args.calib_res, "frames": args.calib_frames, "steps": args.calib_steps,
                         "samples": args.calib_samples, "blocks_per_pass": args.blocks_per_pass,
                         "layers_per_expert": args.calib_layers if not (args.model or args.tiny) else "model's",
                         "reservoir_tokens": args.reservoir_tokens}, "rows": rows}


def run_generation(args, work: Path, qdir: str | None) -> dict:
    # (GPUs, ring degree): Ulysses over all N by default; --ring-gpus adds pure-ring rows
    layouts = [(int(g), args.ring if int(g) > 1 else 1) for g in args.gpus.split(",")]
    layouts += [(int(g), int(g)) for g in args.ring_gpus.split(",") if g]
    base = _common(args) + ["--res", args.res, "--frames", str(args.frames), "--steps", str(args.steps),
                            "--warmup", str(args.warmup)]
    if args.decode:
        base.append("--decode")
    if qdir:
        base += ["--quantized", qdir]
    rows = []
    for n, ring in layouts:
        extra = ["--ring", str(ring), "--ulysses", str(n // ring)] if n > 1 else ["--ring", "1"]
        part = work / f"gen_{n}_ring{ring}.json"
        job = _launch(args, "generate", n, part, base + extra)
        rows.append({"gpus": n, "ring": ring, "ulysses": n // ring, **job})
        rows[-1]["vs_1_gpu"] = saved_difference(work / "gen_1_ring1.json.output.pt", Path(str(part) + ".output.pt"))
    one = next((r for r in rows if r["gpus"] == 1 and "ranks" in r), None)
    for r in rows:
        if "ranks" not in r:
            continue
        r0 = r["ranks"][0]
        r["wall_s"] = max(x["wall_s"] for x in r["ranks"])
        r["peak_gb_per_rank"] = [x["peak_gb"] for x in r["ranks"]]
        r["forward_median_s"] = r0["forward_median_s"]
        if one:
            r["speedup"] = one["ranks"][0]["wall_s"] / r["wall_s"]
            r["scaling_efficiency"] = r["speedup"] / r["gpus"]
            r["forward_speedup"] = {a: (one["ranks"][0]["forward_median_s"][a] / t if t else None)
                                    for a, t in r0["forward_median_s"].items()}
    return {"settings": {"res": args.res, "frames": args.frames, "steps": args.steps, "guidance": args.guidance,
                         "decode": args.decode, "ring_degree": args.ring,
                         "model": args.model or ("tiny testbed" if args.tiny else "A14B config, random weights")},
            "rows": rows}


def _f(v, nd=2) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _vs(row: dict) -> str:
    d = row.get("vs_1_gpu")
    if not d or row["gpus"] == 1:
        return "-"
    return d.get("error") or f"{d['rel_l2']:.2e}, {d['psnr_db']:.1f}"


def markdown(payload: dict) -> str:
    lines = []
    c = payload.get("calibration")
    if c:
        lines += ["## Calibration", "", f"settings: `{json.dumps(c['settings'])}`", "",
                  "| GPUs | shards | wall s | collect s (rank 0) | quantize s (rank 0) | speed-up | efficiency | "
                  "peak GB per rank | identical to 2 GPUs |", "|---|---|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            r0 = (r.get("ranks") or [{}])[0]
            lines.append(f"| {r['gpus']} | {r['shards']} | {_f(r.get('wall_s'))} | {_f(r0.get('collect_s'))} | "
                         f"{_f(r0.get('quantize_s'))} | {_f(r.get('speedup'))} | {_f(r.get('scaling_efficiency'))} | "
                         f"{_f(r.get('peak_gb_per_rank'))} | {_f(r.get('identical_to_2_gpus'))} |")
        lines.append("")
    g = payload.get("generation")
    if g:
        lines += ["## Quantized generation (context parallel)", "", f"settings: `{json.dumps(g['settings'])}`", "",
                  "| GPUs | CP | wall s | high fwd s | low fwd s | speed-up | efficiency | peak GB per rank | "
                  "vs 1 GPU: rel L2, PSNR dB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in g["rows"]:
            fm = r.get("forward_median_s") or {}
            cp = ((r.get("ranks") or [{}])[0]).get("cp")
            lines.append(f"| {r['gpus']} | {_f(cp)} | {_f(r.get('wall_s'))} | {_f(fm.get('transformer'), 3)} | "
                         f"{_f(fm.get('transformer_2'), 3)} | {_f(r.get('speedup'))} | "
                         f"{_f(r.get('scaling_efficiency'))} | {_f(r.get('peak_gb_per_rank'))} | {_vs(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU/gloo dry run at test size (never written to results/)")
    p.add_argument("--parts", default="calibrate,generate")
    p.add_argument("--gpus", default="1,2,4", help="process counts (calibration uses those <= 2)")
    p.add_argument("--device", default=None, help="cuda (default with GPUs) or cpu")
    p.add_argument("--model", default=None, help="diffusers Wan2.2-I2V directory (default: random A14B weights)")
    p.add_argument("--quantized", default=None, help="checkpoint for --model generation (default: calibrated here)")
    p.add_argument("--preset", default="wanquant")
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--max-len", type=int, default=512)
    # calibration workload
    p.add_argument("--calib-res", default="480x832")
    p.add_argument("--calib-frames", type=int, default=17)
    p.add_argument("--calib-steps", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--calib-layers", type=int, default=4, help="blocks per random expert in calibration")
    p.add_argument("--calib-shards", type=int, default=None)
    p.add_argument("--blocks-per-pass", type=int, default=2)
    p.add_argument("--reservoir-tokens", type=int, default=4096)
    p.add_argument("--check-identical", action="store_true", help="also 1 GPU with 2 shards; compare checkpoints")
    # generation workload
    p.add_argument("--res", default="720x1280")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=4, help="timed denoising steps (per-forward medians are reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ring", type=int, default=1, help="ring degree (the rest of N is Ulysses)")
    p.add_argument("--ulysses", type=int, default=0)
    p.add_argument("--ring-gpus", default="", help="extra generation rows with ring attention over all N GPUs")
    p.add_argument("--decode", action="store_true", help="include VAE decoding (redundant on every rank)")
    p.add_argument("--job-timeout", type=int, default=3600)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process, the same in every job (default: cores / max GPUs; 1 with --tiny)")
    p.add_argument("--out", default=None, help="folder of the jobs' files (default: a temporary one)")
    p.add_argument("--results-dir", default=None)
    # worker side
    p.add_argument("--worker", choices=("calibrate", "generate"), help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--work-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.worker:
        return worker_main(args)
    if args.threads is None:
        args.threads = 1 if args.tiny else max(1, (os.cpu_count() or 1) // max(int(g) for g in args.gpus.split(",")))

    if args.tiny:  # the test-size workload
        args.calib_res = args.res = "32x32"
        args.calib_frames = args.frames = 5
        args.calib_steps = args.steps = 12
        args.calib_samples, args.max_len, args.blocks_per_pass = 2, 32, 1
        args.reservoir_tokens, args.gpus, args.warmup = 256, "1,2", 0
    elif args.device == "cuda":
        import torch

        have = torch.cuda.device_count()
        want = max(int(g) for g in args.gpus.split(","))
        if have < want:
            print(f"this host has {have} GPU(s); --gpus {args.gpus} needs {want}", file=sys.stderr)
            return 2
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="wanquant_multi_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    payload: dict = {**run_metadata(), "tiny": args.tiny, "work_dir": str(work), "omp_threads": args.threads}
    parts = args.parts.split(",")
    qdir = args.quantized
    if "calibrate" in parts:
        payload["calibration"] = run_calibration(args, work)
        if qdir is None and (args.tiny or args.model):
            qdir = str(work / "calib_1")  # generate with what was just calibrated
    if "generate" in parts:
        if qdir is None and (args.tiny or args.model):
            print("generation with --model needs --quantized (or the calibrate part)", file=sys.stderr)
            return 2
        payload["generation"] = run_generation(args, work, qdir)
    md = markdown(payload)
    if args.tiny:  # a dry run of the code paths, not a measurement of GPUs
        (work / "multi_gpu_tiny.json").write_text(json.dumps(payload, indent=2))
        (work / "multi_gpu_tiny.md").write_text(md)
        print(md)
        print(f"dry run: {work}/multi_gpu_tiny.json (benchmarks/results untouched)")
    else:
        jpath, _ = write_results("multi_gpu", payload, md, args.results_dir)
        print(md)
        print(f"wrote {jpath}")
    failed = [r for part in ("calibration", "generation") for r in payload.get(part, {}).get("rows", [])
              if r.get("returncode")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
