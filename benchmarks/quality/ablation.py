"""The paper's ablation on a testbed pipeline: one component at a time, then ours.

Every configuration is built from a preset with ``dataclasses.replace``, so each row of
the ladder differs from the one before it in exactly one switch, and the paper's full
method is :func:`~wanquant.method.config.paper_preset` itself:

=============  ===========================================================================
``bf16``       the unquantized model (the CPU runs it in fp32: bf16 matmuls are slow there)
``rtn``        W4A4 round-to-nearest: smoothing off, rank 0, GPTQ off, clip search off
``smooth``     + SVDQuant smoothing with the paper's fixed alpha 0.5
``svdquant``   + the 16-bit low-rank branch, rank 16 (the paper's code; see below)
``gptq``       + GPTQ on the low-rank residual
``global_clip``+ activation clip search, one setting per layer for all bins
``per_bin_clip`` the paper: clip settings per expert, per timestep bin (= ``paper_preset()``)
``shared_policy`` the paper with one clip table per layer shared by both experts
``ours``       ``wanquant_preset()``: searched alpha, rank 32 (as SVDQuant), a global clip
               search on a wider grid (clip ratio 0.5-1.0, exponent offset -1..+2)
=============  ===========================================================================

Extras: ``ours_rank16`` (ours at the paper's rank) and ``ours_narrow_clip`` (ours on the
paper's per-bin clip grid), to tell apart what each of our changes buys;
``ours_per_bin_clip`` (per-bin clip tables: the preset until 2026-12-06) and
``ours_no_clip``.

Scale rule (issue 17): ``rtn_safe_ceil`` and ``ours_safe_ceil`` are ``rtn`` and
``ours_per_bin_clip`` with the ``safe_ceil`` MX scale rule for weights and activations; ``ours_safe_ceil_*``
remove one component each (``no_smooth``, ``rank0``, ``no_gptq``, ``no_clip``,
``global_clip``: one clip setting for all bins, ``shared_policy``: one table for both
experts). ``*_rank_w`` rows scale the low-rank size to the width as Wan's rank 32 is to
its 5120 (rank 2 on the testbed's 256).

Rank: the ladder uses the paper's rank 16 so that ``per_bin_clip`` is exactly the
paper's preset. On the testbed (width 256) a rank-r branch is relatively ~20x larger
than on Wan2.2 (width 5120): rank 16 there adds ~47 % to a 256 x 256 layer's 4.25-bit
weight bits, rank 32 ~94 %. The low-rank rows therefore overstate what the branch buys
at full scale; ``ours`` (rank 32) also pays twice the branch of ``per_bin_clip``.

All configs are calibrated on the same calibration samples and evaluated on the same
evaluation samples with the same seeds. Per config, the videos' metrics are written to
``OUT/configs/NAME.json`` and the frames to ``OUT/frames/NAME.npz``, so an interrupted
run resumes, and several processes may each run some configs into one ``OUT``.

Driven by ``python -m benchmarks.testbed_quality`` (which writes the result tables).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmarks.quality import vbench_style as VB
from benchmarks.quality.layer_errors import LayerErrorRecorder, summarize
from wanquant.calibration.run import CalibrationRun, quantize_pipeline
from wanquant.calibration.samples import CalibSample
from wanquant.evaluation import metrics as M
from wanquant.loading import load_quantized
from wanquant.method.config import QuantConfig, paper_preset, wanquant_preset
from wanquant.model.pipeline import GenerationSettings, run_pipeline

log = logging.getLogger(__name__)

ABLATION_ORDER: tuple[str, ...] = ("bf16", "rtn", "smooth", "svdquant", "gptq", "global_clip", "per_bin_clip",
                                   "shared_policy", "ours")
EXTRA_CONFIGS: tuple[str, ...] = ("ours_rank16", "ours_narrow_clip", "ours_per_bin_clip", "ours_no_clip",
                                   "ours_no_smooth", "ours_rank0", "ours_no_gptq", "ours_shared_policy")
# Issue 17: the same ladder pieces on the ``safe_ceil`` MX scale rule (weights and
# activations), each component removed from ``ours_safe_ceil`` one at a time, and the
# low-rank branch scaled to the width (Wan's rank 32 on 5120 = 0.6 % of the width).
SCALE_RULE_CONFIGS: tuple[str, ...] = ("rtn_safe_ceil", "ours_safe_ceil", "ours_safe_ceil_no_smooth",
                                       "ours_safe_ceil_rank0", "ours_safe_ceil_no_gptq", "ours_safe_ceil_no_clip",
                                       "ours_safe_ceil_global_clip", "ours_safe_ceil_shared_policy",
                                       "ours_safe_ceil_rank_w", "ours_rank_w", "svdquant_rank_w")
ALL_CONFIGS: tuple[str, ...] = ABLATION_ORDER + EXTRA_CONFIGS + SCALE_RULE_CONFIGS
# The reduced run of issue 17 (both testbeds): the two scale rules, and what the clip
# search, per-bin tables and per-expert policies add on top of safe_ceil.
KEY_CONFIGS: tuple[str, ...] = ("bf16", "rtn", "rtn_safe_ceil", "ours", "ours_safe_ceil", "ours_safe_ceil_no_clip",
                                "ours_safe_ceil_global_clip", "ours_safe_ceil_shared_policy")
# Wan2.2-A14B's width and the low-rank size the presets use there.
WAN_WIDTH = 5120
WAN_RANK = 32
# Each component row and the row it adds to (for "does the component help").
LADDER: tuple[tuple[str, str], ...] = (("smooth", "rtn"), ("svdquant", "smooth"), ("gptq", "svdquant"),
                                       ("global_clip", "gptq"), ("per_bin_clip", "global_clip"),
                                       ("per_bin_clip", "shared_policy"), ("ours", "per_bin_clip"),
                                       ("ours_rank16", "per_bin_clip"), ("ours", "ours_rank16"),
                                       ("ours", "ours_narrow_clip"), ("ours_per_bin_clip", "ours"),
                                       ("ours", "ours_no_clip"), ("ours", "ours_no_smooth"),
                                       ("ours", "ours_rank0"), ("ours", "ours_no_gptq"),
                                       ("ours", "ours_shared_policy"), ("rtn_safe_ceil", "rtn"),
                                       ("ours_safe_ceil", "ours_per_bin_clip"),
                                       # Each component of the safe_ceil preset: with it vs without it.
                                       ("ours_safe_ceil", "ours_safe_ceil_no_smooth"),
                                       ("ours_safe_ceil", "ours_safe_ceil_rank0"),
                                       ("ours_safe_ceil", "ours_safe_ceil_no_gptq"),
                                       ("ours_safe_ceil_global_clip", "ours_safe_ceil_no_clip"),
                                       ("ours_safe_ceil", "ours_safe_ceil_global_clip"),
                                       ("ours_safe_ceil", "ours_safe_ceil_shared_policy"),
                                       ("ours_safe_ceil_rank_w", "ours_safe_ceil_rank0"),
                                       ("svdquant_rank_w", "smooth"), ("ours_rank_w", "ours_rank0"),
                                       ("ours", "ours_rank_w"))
BASELINE = "bf16"
# Bump when a metric's definition changes: cached rows are then re-measured.
METRICS_VERSION = 1


def rank_for_width(width: int, wan_rank: int = WAN_RANK, wan_width: int = WAN_WIDTH) -> int:
    """The low-rank size that is the same fraction of ``width`` as ``wan_rank`` of Wan's width (at least 1)."""
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    return max(1, round(wan_rank * width / wan_width))


def with_scale_rule(cfg: QuantConfig, rule: str) -> QuantConfig:
    """``cfg`` with the MX scale rule ``rule`` for weights and activations (same format and group)."""
    fmts = {}
    for what in ("weight_format", "act_format"):
        f = getattr(cfg, what)
        if not any(x.name == "scale_rule" for x in dataclasses.fields(f)):
            raise ValueError(f"{what} {f.describe()} has no scale rule")
        fmts[what] = dataclasses.replace(f, scale_rule=rule)
    return replace(cfg, **fmts)


def ablation_configs(width: int = 256) -> dict[str, QuantConfig | None]:
    """Name -> QuantConfig (None: the unquantized model), in :data:`ALL_CONFIGS` order.

    ``width``: the model's hidden size, for the ``*_rank_w`` rows (rank scaled to the width)."""
    paper = paper_preset()
    rtn = replace(paper,
                  smooth=replace(paper.smooth, enabled=False),
                  lowrank=replace(paper.lowrank, rank=0),
                  gptq=replace(paper.gptq, enabled=False),
                  clip=replace(paper.clip, enabled=False))
    smooth = replace(rtn, smooth=paper.smooth)  # alpha 0.5, as the paper's code
    svdquant = replace(smooth, lowrank=paper.lowrank)  # rank 16, as the paper's code
    gptq = replace(svdquant, gptq=paper.gptq)
    global_clip = replace(gptq, clip=replace(paper.clip, per_bin=False))
    per_bin_clip = replace(gptq, clip=paper.clip)  # == paper_preset()
    shared_policy = replace(per_bin_clip, clip=replace(paper.clip, per_expert=False))
    ours = wanquant_preset()
    # Extra row (not in the default run): ours at the paper's rank, to separate what the
    # searched alpha buys from what the larger low-rank branch buys.
    ours_rank16 = replace(ours, lowrank=replace(ours.lowrank, rank=16))
    # Extra row: ours on the paper's clip grid, whose corner (0.6, +1) the search kept
    # choosing; with the OCP floor rule (c, +1) raises the exponent once amax / 2^e >= 4 / c.
    ours_narrow_clip = replace(ours, clip=paper.clip)
    # Extra rows (issue 17's preset decision): ours with per-bin clip tables (the preset until
    # 2026-12-06), and without the search. The safe_ceil rows remove components from the
    # per-bin version, as when they were first run.
    ours_per_bin_clip = replace(ours, clip=replace(ours.clip, per_bin=True))
    ours_no_clip = replace(ours, clip=replace(ours.clip, enabled=False))
    # Each other component the preset keeps, removed one at a time (issue 17's bar: each
    # must help by more than twice its standard error).
    ours_no_smooth = replace(ours, smooth=replace(ours.smooth, enabled=False))
    ours_rank0 = replace(ours, lowrank=replace(ours.lowrank, rank=0))
    ours_no_gptq = replace(ours, gptq=replace(ours.gptq, enabled=False))
    ours_shared_policy = replace(ours, clip=replace(ours.clip, per_expert=False))
    sc = with_scale_rule(ours_per_bin_clip, "safe_ceil")
    rank_w = rank_for_width(width)
    return {"bf16": None, "rtn": rtn, "smooth": smooth, "svdquant": svdquant, "gptq": gptq,
            "global_clip": global_clip, "per_bin_clip": per_bin_clip, "shared_policy": shared_policy, "ours": ours,
            "ours_rank16": ours_rank16, "ours_narrow_clip": ours_narrow_clip,
            "ours_per_bin_clip": ours_per_bin_clip, "ours_no_clip": ours_no_clip,
            "ours_no_smooth": ours_no_smooth, "ours_rank0": ours_rank0, "ours_no_gptq": ours_no_gptq,
            "ours_shared_policy": ours_shared_policy,
            "rtn_safe_ceil": with_scale_rule(rtn, "safe_ceil"), "ours_safe_ceil": sc,
            "ours_safe_ceil_no_smooth": replace(sc, smooth=replace(sc.smooth, enabled=False)),
            "ours_safe_ceil_rank0": replace(sc, lowrank=replace(sc.lowrank, rank=0)),
            "ours_safe_ceil_no_gptq": replace(sc, gptq=replace(sc.gptq, enabled=False)),
            "ours_safe_ceil_no_clip": replace(sc, clip=replace(sc.clip, enabled=False)),
            "ours_safe_ceil_global_clip": replace(sc, clip=replace(sc.clip, per_bin=False)),
            "ours_safe_ceil_shared_policy": replace(sc, clip=replace(sc.clip, per_expert=False)),
            "ours_safe_ceil_rank_w": replace(sc, lowrank=replace(sc.lowrank, rank=rank_w)),
            "ours_rank_w": replace(ours, lowrank=replace(ours.lowrank, rank=rank_w)),
            "svdquant_rank_w": replace(svdquant, lowrank=replace(svdquant.lowrank, rank=rank_w))}


def switches(cfg: QuantConfig | None) -> dict:
    """The ablation's switches of a config, as a small readable dict."""
    if cfg is None:
        return {"quantized": False}
    s = cfg.smooth
    return {
        "quantized": True,
        "format": cfg.describe_formats(),
        "scale_rule": scale_rule(cfg),
        "smooth": (f"alpha {s.alpha_grid[0]}" if len(s.alpha_grid) == 1 else f"alpha searched {s.alpha_grid}")
        if s.enabled else "off",
        "rank": cfg.lowrank.rank,
        "gptq": cfg.gptq.enabled,
        "clip": ("per-bin" if cfg.clip.per_bin else "global") if cfg.clip.enabled else "off",
        "clip_per_expert": cfg.clip.per_expert,
        "clip_grid": (f"ratios {min(cfg.clip.clip_ratios)}-{max(cfg.clip.clip_ratios)}, "
                      f"offsets {min(cfg.clip.exp_offsets):+d}..{max(cfg.clip.exp_offsets):+d}")
        if cfg.clip.enabled else None,
    }


def scale_rule(cfg: QuantConfig | None) -> str | None:
    """The MX scale rule of a config ("w/a" when weights and activations differ; None: 16-bit)."""
    if cfg is None:
        return None
    w, a = (getattr(f, "scale_rule", f.name) for f in (cfg.weight_format, cfg.act_format))
    return w if w == a else f"{w}/{a}"


def short_switches(cfg: QuantConfig | None) -> str:
    sw = switches(cfg)
    if not sw["quantized"]:
        return "16-bit"
    clip = sw["clip"] if sw["clip"] == "off" else (f"{sw['clip']}{'' if sw['clip_per_expert'] else ', shared'} "
                                                   f"({sw['clip_grid']})")
    return (f"{sw['scale_rule']}; smooth {sw['smooth']}; rank {sw['rank']}; GPTQ {'on' if sw['gptq'] else 'off'}; "
            f"clip {clip}")


@dataclass
class AblationSettings:
    """What the ablation runs (the method lives in the configs)."""

    generation: GenerationSettings
    configs: list[str] = field(default_factory=lambda: list(ABLATION_ORDER))
    reservoir_tokens: int = 4096
    eval_seed: int = 0  # video i uses seed eval_seed + i, for every config
    vmaf: bool = True
    brisque: bool = True
    shuffled_prompts: bool = True  # an extra bf16 row with deranged prompts
    layer_errors: bool = True
    layer_error_videos: int = 2  # per-layer errors are recorded on the first videos only
    device: str = "cpu"
    # W4A4 backend of the quantized runs; "reference" is the PyTorch ground truth that the
    # kernels are tested bit-exact against.
    backend: str = "reference"
    # Identity of the 16-bit model (e.g. a hash of its weight files): part of the cache key.
    model_id: str = ""

    def key(self) -> dict:
        """What the generated videos depend on (cached videos with another key are redone).

        The device is recorded in each row (``generated_on``) but is not part of the key, so
        videos generated on a GPU machine can be measured on another."""
        return {"model": self.model_id, "generation": self.generation.to_dict(),
                "reservoir_tokens": self.reservoir_tokens,
                "eval_seed": self.eval_seed, "layer_errors": self.layer_errors,
                "layer_error_videos": self.layer_error_videos}

    def metrics_key(self) -> dict:
        return {"vmaf": self.vmaf, "brisque": self.brisque, "version": METRICS_VERSION}


# ------------------------------------------------------------------------------ run


def evaluate_videos(videos: list[np.ndarray], evals, reference: list[np.ndarray] | None, vmaf: bool = True,
                    brisque: bool = True) -> dict:
    """Per-video and mean metrics of ``videos`` (uint8) against ``reference`` and ground truth."""
    per = []
    for i, (v, s) in enumerate(zip(videos, evals)):
        row = {"index": i, "prompt": s.prompt, **M.ground_truth_accuracy(v, s)}
        if reference is not None:
            fid = M.fidelity(v, reference[i], with_vmaf=vmaf)
            row.update({"psnr_vs_bf16": fid["psnr"], "ssim_vs_bf16": fid["ssim"], "vmaf_vs_bf16": fid["vmaf"]})
        row["vbench_style"] = VB.vbench_style(v, s, with_brisque=brisque)
        per.append(row)
    mean = {k: M.mean_finite([r.get(k) for r in per]) for k in
            ("psnr_vs_bf16", "ssim_vs_bf16", "vmaf_vs_bf16", "gt_psnr", "trajectory_err", "missing_frac")}
    vb = VB.mean_dims([r["vbench_style"] for r in per])
    return {**mean, "vbench_style": vb, "vbench_style_avg": vb["average"], "per_sample": per}


def _generate(pipe, evals, settings: GenerationSettings, seed0: int, prompts=None) -> list[np.ndarray]:
    prompts = prompts or [s.prompt for s in evals]
    return [M.as_uint8(run_pipeline(pipe, s.first_frame(), p, settings, seed=seed0 + i))
            for i, (s, p) in enumerate(zip(evals, prompts))]


def _save_frames(path: Path, videos: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, videos=np.stack(videos))
    os.replace(tmp, path)


def _load_frames(path: Path) -> list[np.ndarray]:
    with np.load(path) as f:
        return list(f["videos"])


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _claim(lock: Path) -> Path | None:
    """Create ``lock`` for this process (None if a live process holds it), so that several
    processes can share the configs of one output directory."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return None  # held by a live process
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except PermissionError:
                return None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    return None


def _cached(path: Path, key: dict) -> dict | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data if data.get("key") == json.loads(json.dumps(key)) else None


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.machine()})"


def generate_config(name: str, cfg: QuantConfig | None, make_pipeline: Callable[[], object],
                    calib: list[CalibSample], evals, settings: AblationSettings, out: Path,
                    base_pipe) -> tuple[dict, list[np.ndarray]]:
    """Quantize (unless ``cfg`` is None) and generate the evaluation videos; no metrics yet."""
    gen = settings.generation
    seconds: dict[str, float] = {}
    row: dict = {"config": name, "switches": switches(cfg), "quant_config": cfg.to_dict() if cfg is not None else None,
                 "generated_on": {"device": device_name(settings.device), "dtype": str(_dtype_of(base_pipe)),
                                  "backend": settings.backend if cfg is not None else None}}
    if cfg is None:
        t0 = time.perf_counter()
        videos = _generate(base_pipe, evals, gen, settings.eval_seed)
        seconds["generate"] = time.perf_counter() - t0
    else:
        qdir = out / "checkpoints" / name
        pipe = make_pipeline()
        t0 = time.perf_counter()
        quantize_pipeline(pipe, calib, cfg, CalibrationRun(gen, reservoir_tokens=settings.reservoir_tokens,
                                                           progress=False), qdir, overwrite=True, restart=True)
        seconds["calibrate_quantize"] = time.perf_counter() - t0
        del pipe
        qpipe = make_pipeline()
        qpipe.register_modules(transformer=None, transformer_2=None)
        load_quantized(qpipe, qdir, device=settings.device, backend=settings.backend)
        t0 = time.perf_counter()
        k = min(settings.layer_error_videos, len(evals)) if settings.layer_errors else 0
        videos = []
        if k:
            # The recorder runs the 16-bit expert beside the quantized one: only on the first k videos.
            with LayerErrorRecorder(qpipe, base_pipe) as rec:
                videos += _generate(qpipe, evals[:k], gen, settings.eval_seed)
            row["layer_errors"] = rec.rows()
            row["layer_error_summary"] = summarize(row["layer_errors"])
            row["layer_error_videos"] = k
        videos += _generate(qpipe, evals[k:], gen, settings.eval_seed + k)
        seconds["generate"] = time.perf_counter() - t0
        manifest = json.loads((qdir / "manifest.json").read_text())
        errs = [lay.get("report", {}).get("final", {}).get("rel_err") for info in manifest["experts"].values()
                for lay in info["layers"].values()]
        errs = [e for e in errs if e is not None]
        row["calibration_mean_layer_rel_err"] = float(np.mean(errs)) if errs else None
    row["seconds"] = seconds
    return row, videos


def _dtype_of(pipe) -> torch.dtype | None:
    expert = getattr(pipe, "transformer", None)
    return next(expert.parameters()).dtype if expert is not None else None


def cached_unit(out: Path, name: str, ckey: dict, produce: Callable[[], tuple[dict, list[np.ndarray]]],
                reference, evals, settings: AblationSettings, overwrite: bool = False, generate: bool = True,
                measure: bool = True, skip_busy: bool = False, need_frames: bool = False, wait_busy: bool = False,
                missing_ok: bool = False):
    """One config's (row, videos), from ``out``'s cache or ``produce()`` (under a lock shared by
    processes), measured against ``reference`` when ``measure``. Returns (None, None) when
    another process holds it and ``measure`` is off or ``skip_busy`` is on; ``wait_busy``
    waits for that process instead (workers that all need the 16-bit videos). A cached row
    already measured with these metric settings is used without its frames (videos None)
    unless ``need_frames``: measured rows travel without their videos."""
    path, fpath = out / "configs" / f"{name}.json", out / "frames" / f"{name}.npz"
    mkey = settings.metrics_key()
    cached = None if overwrite else _cached(path, ckey)
    if cached is not None and fpath.exists():
        log.info("%s: using the cached videos in %s", name, fpath)
        row, videos = cached["row"], _load_frames(fpath)
    elif cached is not None and not need_frames and cached["row"].get("metrics_key") == mkey:
        log.info("%s: using the cached, measured row in %s (no videos)", name, path)
        row, videos = cached["row"], None
    elif not generate:
        if missing_ok:
            log.warning("%s: not generated in %s: left out", name, out)
            return None, None
        raise RuntimeError(f"{name}: no videos for these settings in {out}; run the generation first")
    else:
        lock = _claim(out / "configs" / f"{name}.lock")
        if lock is None and wait_busy:
            log.info("%s: another process is generating it: waiting", name)
            while (out / "configs" / f"{name}.lock").exists():
                time.sleep(2.0)
            return cached_unit(out, name, ckey, produce, reference, evals, settings, False, generate, measure,
                               skip_busy, need_frames, wait_busy=False)
        if lock is None:
            if measure and not skip_busy:
                raise RuntimeError(f"{name}: another process is generating it in {out}; wait for it")
            log.info("%s: another process is generating it: skipping", name)
            return None, None
        try:
            again = None if overwrite else _cached(path, ckey)
            if again is not None and fpath.exists():  # finished by another process meanwhile
                lock.unlink(missing_ok=True)
                return cached_unit(out, name, ckey, produce, reference, evals, settings, False, generate, measure,
                                   skip_busy, need_frames)
            t0 = time.perf_counter()
            row, videos = produce()
            row["seconds"]["total_generation"] = time.perf_counter() - t0
            row.pop("metrics_key", None)
            _save_frames(fpath, videos)
            _write_json(path, {"key": ckey, "row": row})
        finally:
            lock.unlink(missing_ok=True)
    if measure and row.get("metrics_key") != mkey:
        base_frames = out / "frames" / f"{BASELINE}.npz"
        if reference is None and name != BASELINE and base_frames.exists():  # e.g. a row added to a measured run
            reference = _load_frames(base_frames)
        if reference is None and name != BASELINE and ckey.get("config") is not None:
            raise RuntimeError(f"{name}: the 16-bit videos are needed to measure it; generate {BASELINE} first")
        t0 = time.perf_counter()
        row.update(evaluate_videos(videos, evals, reference, vmaf=settings.vmaf, brisque=settings.brisque))
        row["seconds"]["metrics"] = time.perf_counter() - t0
        row["metrics_key"] = mkey
        _write_json(path, {"key": ckey, "row": row})
    if measure:
        log.info("%s: psnr vs bf16 %s, gt psnr %.2f, traj %.2f, vbench avg %.4f", name, row.get("psnr_vs_bf16"),
                 row["gt_psnr"], row["trajectory_err"], row["vbench_style_avg"])
    return row, videos


def run_ablation(make_pipeline: Callable[[], object], calib: list[CalibSample], evals, settings: AblationSettings,
                 out: str | Path, overwrite: bool = False, configs: dict[str, QuantConfig | None] | None = None,
                 generate: bool = True, measure: bool = True, skip_busy: bool = False,
                 missing_ok: bool = False) -> dict:
    """Run (or resume) every config of ``settings.configs``; returns {"rows", "extra_rows", "reference"}.

    ``make_pipeline()`` must return a fresh 16-bit pipeline each call (quantization
    replaces a pipeline's experts in place). Generation and measurement are separate
    steps: ``measure=False`` only generates (e.g. on a GPU machine without ffmpeg);
    ``generate=False`` only measures configs whose videos are already in ``out`` (and
    fails for any that are not). A cached config measured with other metric settings is
    re-measured from its saved frames. ``skip_busy``: configs another process is producing
    are left out (several workers generating and measuring one directory); ``missing_ok``
    leaves out configs that were never generated (see :func:`cached_unit`).
    ``reference``: the 16-bit videos (None when they were not needed).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = configs if configs is not None else ablation_configs()
    unknown = [c for c in settings.configs if c not in table]
    if unknown:
        raise ValueError(f"unknown ablation configs {unknown}; known: {list(table)}")
    key = settings.key()
    key["calib"] = [s.source for s in calib]
    key["eval"] = [s.prompt for s in evals]
    base: list = []

    def base_pipe():
        if not base:
            base.append(make_pipeline())
        return base[0]

    def one(name, ckey, produce, reference, need_frames=False):
        # Workers wait for the 16-bit videos (every other config is measured against them).
        return cached_unit(out, name, ckey, produce, reference, evals, settings, overwrite, generate, measure,
                           skip_busy, need_frames, wait_busy=skip_busy and measure and name == BASELINE,
                           missing_ok=missing_ok and name != BASELINE)

    results: dict[str, dict] = {}
    # The baseline's videos are the reference of every other config's fidelity: always
    # first, unless this call only generates other configs (another process does bf16).
    with_base = measure or BASELINE in settings.configs
    order = ([BASELINE] if with_base else []) + [c for c in settings.configs if c != BASELINE]
    # The 16-bit frames are loaded only if some config still has to be measured.
    need_ref = measure and any(_to_measure(out, c, {**key, "config": table[c].to_dict()}, settings, generate)
                               for c in order if c != BASELINE)
    reference = None
    for name in order:
        cfg = table[name] if name != BASELINE else None
        ckey = {**key, "config": cfg.to_dict() if cfg is not None else None}
        log.info("%s: %s", name, short_switches(cfg))
        row, videos = one(name, ckey, lambda: generate_config(name, cfg, make_pipeline, calib, evals, settings, out,
                                                              base_pipe()),
                          None if name == BASELINE else reference, need_frames=name == BASELINE and need_ref)
        if row is None:
            continue
        results[name] = row
        if name == BASELINE:
            reference = videos
    extras = {}
    if settings.shuffled_prompts and len(evals) > 1 and with_base:
        prompts = [evals[(i + 1) % len(evals)].prompt for i in range(len(evals))]  # a derangement

        def shuffled():
            t0 = time.perf_counter()
            videos = _generate(base_pipe(), evals, settings.generation, settings.eval_seed, prompts)
            return ({"config": "bf16_shuffled_prompts", "switches": {"quantized": False, "prompts": "shuffled"},
                     "generated_on": {"device": device_name(settings.device), "dtype": str(_dtype_of(base_pipe()))},
                     "seconds": {"generate": time.perf_counter() - t0}}, videos)

        row, _ = one("bf16_shuffled_prompts", {**key, "prompts": prompts}, shuffled, reference)
        if row is not None:
            extras["bf16_shuffled_prompts"] = row
    if measure:
        still = [np.repeat(s.frames[:1], s.num_frames, axis=0) for s in evals]
        res = evaluate_videos(still, evals, None, vmaf=False, brisque=False)
        extras["first_frame_held"] = {"config": "first_frame_held",
                                      "switches": {"quantized": False, "video": "frame 0 held"},
                                      **{k: res[k] for k in ("gt_psnr", "trajectory_err", "missing_frac")}}
    return {"rows": results, "extra_rows": extras, "reference": reference}


def _to_measure(out: Path, name: str, ckey: dict, settings: AblationSettings, generate: bool) -> bool:
    """Whether this call will measure config ``name`` (then the 16-bit videos are needed)."""
    cached = _cached(out / "configs" / f"{name}.json", ckey)
    if cached is None:
        return generate
    return cached["row"].get("metrics_key") != settings.metrics_key()


def load_frames(out: str | Path, name: str) -> list[np.ndarray]:
    """The saved evaluation videos of one config."""
    return _load_frames(Path(out) / "frames" / f"{name}.npz")


# --------------------------------------------------------------------------- verdicts


def acceptance(rows: dict[str, dict], ours: str = "ours", rtn: str = "rtn", base: str = BASELINE) -> dict:
    """The issue's bars, measured: VBench-style drop of ``ours`` and its ground-truth loss vs RTN's."""
    b, o, r = rows.get(base), rows.get(ours), rows.get(rtn)
    if b is None or o is None:
        return {}
    out: dict = {}
    drop = (b["vbench_style_avg"] - o["vbench_style_avg"]) / b["vbench_style_avg"] * 100.0
    out["vbench_style_drop_pct"] = {"value": drop, "bar": 0.5, "met": drop <= 0.5}
    if b.get("per_sample") and o.get("per_sample"):
        # Paired over the eval videos: how precisely this many videos pin the drop down.
        per = [(pb["vbench_style"]["average"] - po["vbench_style"]["average"]) / b["vbench_style_avg"] * 100.0
               for pb, po in zip(b["per_sample"], o["per_sample"])]
        out["vbench_style_drop_pct"]["paired_se"] = _se(per)
    per_dim = {k: (b["vbench_style"][k] - o["vbench_style"][k]) / b["vbench_style"][k] * 100.0
               for k in VB.DIMENSIONS if b["vbench_style"][k]}
    out["vbench_style_drop_pct_per_dim"] = per_dim
    if r is not None:
        for metric, sign in (("gt_psnr", 1.0), ("trajectory_err", -1.0)):
            loss_o = sign * (b[metric] - o[metric])  # positive = worse than bf16
            loss_r = sign * (b[metric] - r[metric])
            met = loss_o <= 0.25 * loss_r if loss_r > 0 else loss_o <= 0
            out[f"{metric}_loss"] = {"ours": loss_o, "rtn": loss_r, "ratio": (loss_o / loss_r) if loss_r else None,
                                     "bar": "ours <= 0.25 x rtn", "met": bool(met)}
    return out


def component_verdicts(rows: dict[str, dict], metric: str = "psnr_vs_bf16") -> list[dict]:
    """For each component: the change of ``metric`` (higher better) and paired per-video wins."""
    out = []
    for new, old in LADDER:
        if new not in rows or old not in rows:
            continue
        a, b = rows[new], rows[old]
        pa = [p[metric] for p in a["per_sample"]]
        pb = [p[metric] for p in b["per_sample"]]
        wins = sum(x > y for x, y in zip(pa, pb))
        se = _se([x - y for x, y in zip(pa, pb)])
        out.append({"component": f"{new} vs {old}", "metric": metric, "before": b[metric], "after": a[metric],
                    "delta": a[metric] - b[metric], "delta_paired_se": se, "wins": f"{wins}/{len(pa)}",
                    "helps": a[metric] > b[metric],
                    "delta_ssim": a["ssim_vs_bf16"] - b["ssim_vs_bf16"],
                    "delta_gt_psnr": a["gt_psnr"] - b["gt_psnr"],
                    "delta_traj_err": a["trajectory_err"] - b["trajectory_err"]})
    return out


def _se(values) -> float | None:
    """Standard error of the mean of paired differences (None for fewer than 2)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None


__all__ = ["ABLATION_ORDER", "LADDER", "AblationSettings", "ablation_configs", "switches", "short_switches",
           "run_ablation", "cached_unit", "generate_config", "evaluate_videos", "load_frames", "acceptance", "component_verdicts"]
