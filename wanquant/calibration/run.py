"""Calibrate and quantize a Wan pipeline: the whole job behind ``wanquant quantize``.

The blocks of both experts are processed in passes of ``blocks_per_pass`` blocks: each
pass runs the BF16 pipeline over the calibration set with hooks on just those blocks,
then quantizes them and writes their layers to a work directory. Host and GPU memory
hold the statistics of one pass only, and an interrupted run resumes at the first pass
that has not finished. Layers are installed only after every pass, so all statistics
come from the BF16 model.

With two experts (and per-expert clip tables) the passes go expert by expert
(``CalibrationRun.schedule = "expert_major"``, :mod:`wanquant.calibration.trajectory`):
the pass for an expert's blocks runs only that expert, replays the earlier expert's
recorded outputs and skips the later one, so with ``blocks_per_pass=None`` the whole
calibration is one trajectory pass, and one expert's weights and statistics are on
the device at a time.

With ``CalibrationRun.shards > 1`` or a process group (``dist``, see
:mod:`wanquant.distributed` and :mod:`wanquant.calibration.shards`), the samples are split
into contiguous shards whose statistics are merged in shard order, and the layers are
quantized by several processes; a run's artifacts depend on its number of shards, not on
its number of processes. One pass is :func:`wanquant.calibration.passes.calibrate_pass`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from wanquant.artifacts.checkpoint import (
    CheckpointError,
    ExpertArtifact,
    fingerprint_module,
    output_lock,
    save_checkpoint,
)
from wanquant.calibration import passes
from wanquant.calibration.config import CalibrationRun
from wanquant.calibration.samples import CalibSample, check_samples, samples_fingerprint
from wanquant.calibration.shards import resolve_shards
from wanquant.calibration.trajectory import Trajectory
from wanquant.distributed import DistContext
from wanquant.method.config import QuantConfig
from wanquant.method.params import QuantizedLinearParams
from wanquant.model.wan import ExpertSpec, bind_expert, blocks_of, experts_of, export_rest, install_layer, quant_targets
from wanquant.runtime.linear import W4A4Linear
from wanquant.validate import check_blocks_left, check_calibration_run, check_checkpoint_out, check_settings

log = logging.getLogger(__name__)


def quantize_pipeline(pipe, samples: list[CalibSample], cfg: QuantConfig, run: CalibrationRun,
                      out_dir: str | Path, overwrite: bool = False, restart: bool = False,
                      dist: DistContext | None = None) -> Path:
    """Calibrate, quantize and save; afterwards ``pipe`` holds the quantized experts.

    ``dist``: a :class:`wanquant.distributed.DistContext` when this process is
    one of several (torchrun). Every rank calls this with the same model, samples and
    settings; rank 0 owns the work directory and writes the checkpoint, and only its
    ``pipe`` gets the quantized experts (the other ranks keep theirs in 16-bit).
    """
    check_samples(samples)
    check_settings(run.settings)
    check_calibration_run(run.blocks_per_pass, run.reservoir_tokens, run.shards)
    out_dir = Path(out_dir)
    if dist is not None or (run.shards or 1) > 1:
        run = dataclasses.replace(run, shards=resolve_shards(run.shards, dist, len(samples)))
    experts = experts_of(pipe)
    for e in experts:
        check_blocks_left(cfg.precision.skip_blocks, len(blocks_of(e.module)))
    targets = {e.attr: quant_targets(e.module, cfg) for e in experts}
    # Rank 0 holds the lock on the output (and so on its work directory) until the
    # checkpoint is written or the run fails: a second run on the same --out stops here.
    with contextlib.ExitStack() as held:
        def claim_output() -> None:
            check_checkpoint_out(out_dir, overwrite)
            held.enter_context(output_lock(out_dir))

        _on_main(dist, claim_output)
        return _quantize_locked(pipe, samples, cfg, run, out_dir, overwrite, restart, dist, experts, targets)


def _quantize_locked(pipe, samples, cfg, run, out_dir: Path, overwrite: bool, restart: bool, dist,
                     experts: list[ExpertSpec], targets: dict) -> Path:
    main = dist is None or dist.is_main
    fingerprints = {e.attr: fingerprint_module(e.module) for e in experts}
    work = out_dir.with_name(out_dir.name + ".partial")
    run_id = _run_id(cfg, run, samples, fingerprints)
    if dist is not None:
        dist.check_agree("the run id (settings, calibration samples and model weights)", run_id)
    done = _on_main(dist, _open_work_dir, work, run_id, restart, targets)

    n_blocks = max(len(blocks_of(e.module)) for e in experts)
    step = run.blocks_per_pass or n_blocks
    block_ranges = [range(s, min(s + step, n_blocks)) for s in range(0, n_blocks, step)]
    major = expert_major(run, cfg, experts)
    # Expert-major: a pass is (expert, blocks), the experts in trajectory order.
    units = [(e.attr, r) for e in experts for r in block_ranges] if major else [(None, r) for r in block_ranges]
    trajectory = Trajectory(experts, run.offload_idle_experts, getattr(pipe, "text_encoder", None)) if major else None
    with trajectory.placement if trajectory is not None else contextlib.nullcontext():
        for attr, blocks in tqdm(units, desc="calibration passes",
                                 disable=not run.progress or not main or len(units) == 1):
            key = _unit_key(attr, blocks)
            if key in done:
                log.info("pass %s already done in %s: skipping", key, work)
                continue
            sel = {a: [t for t in ts if t.block in blocks and attr in (None, a)] for a, ts in targets.items()}
            if attr is not None and not sel[attr]:
                continue  # every block of the range skipped by the precision policy
            params, report = passes.calibrate_pass(pipe, experts, sel, samples, cfg, run, dist, trajectory)
            if not main:  # rank 0 holds every layer of the pass and writes them
                continue
            for a, layers in params.items():
                if layers or attr is None:
                    _save_layers(_pass_file(work, a, key), layers)
            done[key] = {"finished": time.time(), "seen": report}
            _write_json(work / "progress.json", {"run_id": run_id, "done": done})
    # Rank 0 writes the checkpoint; the others wait for it (or for its error).
    return _on_main(dist, _finish, pipe, experts, targets, cfg, run, samples, fingerprints, done, work, out_dir,
                    overwrite, run_id)


def expert_major(run: CalibrationRun, cfg: QuantConfig, experts: list[ExpertSpec]) -> bool:
    """Whether the run goes expert by expert (needs two experts and per-expert clip tables:
    a shared clip table needs both experts' statistics at once)."""
    return run.schedule == "expert_major" and len(experts) > 1 and cfg.clip.per_expert


def _unit_key(attr: str | None, blocks: range) -> str:
    span = f"{blocks.start}-{blocks.stop}"
    return span if attr is None else f"{attr}:{span}"


def _unit_expert(key: str) -> str | None:
    return key.split(":", 1)[0] if ":" in key else None


def _finish(pipe, experts, targets, cfg, run, samples, fingerprints, done, work, out_dir, overwrite, run_id) -> Path:
    """Install every layer from the work directory and write the checkpoint."""
    seen = {}
    for info in done.values():  # every pass runs the same samples; expert-major passes see one expert each
        seen.update(info["seen"])
    layers = {e.attr: _read_work_layers(work, done, e.attr, targets[e.attr]) for e in experts}
    for e in experts:  # all experts checked before any is touched
        _check_complete(work, e.attr, layers[e.attr], targets[e.attr])
    artifacts = [_install_expert(e, layers[e.attr], cfg, fingerprints[e.attr], seen.get(e.attr, {})) for e in experts]
    calib = {"samples": len(samples), "settings": run.settings.to_dict(), "blocks_per_pass": run.blocks_per_pass,
             "run_id": run_id, "schedule": "expert_major" if expert_major(run, cfg, experts) else "interleaved",
             "cond_only": run.cond_only}
    if (run.shards or 1) != 1:
        calib["shards"] = run.shards
    save_checkpoint(out_dir, artifacts, cfg.to_dict(), overwrite=overwrite, extra={"calibration": calib})
    shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _read_work_layers(work: Path, done: dict, attr: str, targets) -> dict[str, QuantizedLinearParams]:
    layers = {}
    for key in done:
        if _unit_expert(key) not in (None, attr):
            continue
        path = _pass_file(work, attr, key)
        if path.exists():
            layers.update(_load_layers(path, targets))
    return layers


def _check_complete(work: Path, attr: str, layers: dict, targets) -> None:
    """Refuse to write a checkpoint in which some layers silently stayed 16-bit."""
    missing = [t.name for t in targets if t.name not in layers]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(
            f"{work} holds {len(targets) - len(missing)} of the {len(targets)} quantized layers of {attr}; missing "
            f"{shown}. Refusing to write a partly quantized checkpoint: re-run the same command (passes whose "
            "files are gone are recomputed) or pass --restart")


def _pass_file(work: Path, attr: str, key: str) -> Path:
    return work / f"{attr}.blocks{key.rsplit(':', 1)[-1]}.safetensors"


def _pass_blocks(key: str) -> range:
    start, stop = key.rsplit(":", 1)[-1].split("-")
    return range(int(start), int(stop))


def _drop_incomplete_passes(work: Path, done: dict, targets: dict) -> dict:
    """Passes recorded as done whose layer files are missing or lack layers are run again."""
    from safetensors import safe_open

    kept = {}
    for key, info in done.items():
        lost = []
        for attr, ts in targets.items():
            if _unit_expert(key) not in (None, attr):
                continue
            names = [t.name for t in ts if t.block in _pass_blocks(key)]
            if not names:
                continue
            path = _pass_file(work, attr, key)
            try:
                with safe_open(str(path), "pt") as f:
                    present = set(f.keys())
            except (OSError, SafetensorError):
                present = set()
            lost += [n for n in names if f"{n}.qweight" not in present]
        if lost:
            log.warning("%s: pass %s is recorded as done but %d of its layers are missing (%s...): running it again",
                        work, key, len(lost), lost[0])
        else:
            kept[key] = info
    return kept


def _on_main(dist, fn, *args):
    """``fn(*args)`` here, or on rank 0 with its result (or error) given to every rank."""
    return fn(*args) if dist is None else dist.on_main(fn, *args)


def _install_expert(e: ExpertSpec, layers: dict[str, QuantizedLinearParams], cfg: QuantConfig,
                    fingerprint: str, seen: dict) -> ExpertArtifact:
    device = next(e.module.parameters()).device
    for name, p in layers.items():
        layer = W4A4Linear.from_params(p.to(device), cfg.weight_format, cfg.act_format)
        install_layer(e.module, name, layer)
    bins = e.timestep_bins(cfg)
    bind_expert(e.module, bins)
    rest = export_rest(e.module, layers)
    return ExpertArtifact(e.attr, e.role, bins.to_dict(), dict(e.module.config), layers, rest, fingerprint,
                          calibration=seen)


def _save_layers(path: Path, layers: dict[str, QuantizedLinearParams]) -> None:
    tensors = {k: v for name, p in layers.items() for k, v in p.flat(name).items()}
    reports = {name: p.report for name, p in layers.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"reports": json.dumps(reports, default=str)})
    os.replace(tmp, path)


def _load_layers(path: Path, targets) -> dict[str, QuantizedLinearParams]:
    from safetensors import safe_open

    flat = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        reports = json.loads(f.metadata()["reports"])
    return {t.name: QuantizedLinearParams.from_flat(flat, t.name, reports[t.name])
            for t in targets if f"{t.name}.qweight" in flat}


def _run_id(cfg, run: CalibrationRun, samples, fingerprints) -> str:
    cfg_d = cfg.to_dict()
    cfg_d["gptq"].pop("cuda_graph", None)  # changes launches, not values: a run resumes with it on or off
    d = {"cfg": cfg_d, "settings": run.settings.to_dict(), "bpp": run.blocks_per_pass,
         "res": run.reservoir_tokens, "seed": run.seed, "samples": samples_fingerprint(samples), "models": fingerprints,
         "cond_only": run.cond_only, "fast_hessian": run.fast_hessian, "schedule": run.schedule}
    if (run.shards or 1) != 1:  # not the number of processes: a sharded run may resume on another count
        d["shards"] = run.shards
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _open_work_dir(work: Path, run_id: str, restart: bool, targets: dict) -> dict:
    progress = work / "progress.json"
    if restart and work.exists():
        shutil.rmtree(work)
    if progress.exists():
        try:
            state = json.loads(progress.read_text())
        except ValueError:
            state = {}
        if state.get("run_id") != run_id:
            # FileExistsError: the CLI reports it on one line, like an existing --out.
            raise FileExistsError(f"{work} holds an unfinished run with other settings, model or samples; pass "
                                  "--restart (restart=True) to discard it, or use the settings it was started with")
        done = _drop_incomplete_passes(work, dict(state["done"]), targets)
        log.info("resuming from %s: %d pass(es) already done", work, len(done))
        return done
    work.mkdir(parents=True, exist_ok=True)
    _write_json(progress, {"run_id": run_id, "done": {}})
    return {}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
