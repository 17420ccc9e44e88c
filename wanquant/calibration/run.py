"""Calibrate and quantize a Wan pipeline: the whole job behind ``wanquant quantize``.

The blocks of both experts are processed in passes of ``blocks_per_pass`` blocks: each
pass runs the BF16 pipeline over the calibration set with hooks on just those blocks,
then quantizes them and writes their layers to a work directory. Host and GPU memory
hold the statistics of one pass only, and an interrupted run resumes at the first pass
that has not finished. Layers are installed only after every pass, so all statistics
come from the BF16 model.

With ``CalibrationRun.shards > 1`` or a process group (``dist``, see
:mod:`wanquant.distributed` and :mod:`wanquant.calibration.shards`), the samples are split
into contiguous shards whose statistics are merged in shard order, and the layers are
quantized by several processes; a run's artifacts depend on its number of shards, not on
its number of processes. One pass is :func:`wanquant.calibration.passes.calibrate_pass`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from wanquant.artifacts.checkpoint import ExpertArtifact, fingerprint_module, save_checkpoint
from wanquant.calibration import passes
from wanquant.calibration.config import CalibrationRun
from wanquant.calibration.samples import CalibSample, check_samples, samples_fingerprint
from wanquant.calibration.shards import resolve_shards
from wanquant.method.config import QuantConfig
from wanquant.distributed import DistContext
from wanquant.model.wan import ExpertSpec, bind_expert, blocks_of, experts_of, export_rest, install_layer, quant_targets
from wanquant.method.params import QuantizedLinearParams
from wanquant.runtime.linear import W4A4Linear

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
    out_dir = Path(out_dir)
    main = dist is None or dist.is_main
    if dist is not None or (run.shards or 1) > 1:
        run = dataclasses.replace(run, shards=resolve_shards(run.shards, dist, len(samples)))

    def check_out() -> None:
        if out_dir.exists() and not overwrite:
            raise FileExistsError(f"{out_dir} already exists; choose another output or pass --overwrite")

    _on_main(dist, check_out)
    experts = experts_of(pipe)
    targets = {e.attr: quant_targets(e.module, cfg) for e in experts}
    fingerprints = {e.attr: fingerprint_module(e.module) for e in experts}
    work = out_dir.with_name(out_dir.name + ".partial")
    run_id = _run_id(cfg, run, samples, {e.attr: fingerprint_module(e.module) for e in experts})
    if dist is not None:
        dist.check_agree("the run id (settings, calibration samples and model weights)", run_id)
    done = _on_main(dist, _open_work_dir, work, run_id, restart)

    n_blocks = max(len(blocks_of(e.module)) for e in experts)
    step = run.blocks_per_pass or n_blocks
    block_ranges = [range(s, min(s + step, n_blocks)) for s in range(0, n_blocks, step)]
    for blocks in tqdm(block_ranges, desc="calibration passes",
                       disable=not run.progress or not main or len(block_ranges) == 1):
        key = f"{blocks.start}-{blocks.stop}"
        if key in done:
            log.info("blocks %s already done in %s: skipping", key, work)
            continue
        sel = {a: [t for t in ts if t.block in blocks] for a, ts in targets.items()}
        params, report = passes.calibrate_pass(pipe, experts, sel, samples, cfg, run, dist)
        if not main:  # rank 0 holds every layer of the pass and writes them
            continue
        for attr, layers in params.items():
            _save_layers(work / f"{attr}.blocks{key}.safetensors", layers)
        done[key] = {"finished": time.time(), "seen": report}
        _write_json(work / "progress.json", {"run_id": run_id, "done": done})
    # Rank 0 writes the checkpoint; the others wait for it (or for its error).
    return _on_main(dist, _finish, pipe, experts, targets, cfg, run, samples, fingerprints, done, work, out_dir,
                    overwrite, run_id)


def _finish(pipe, experts, targets, cfg, run, samples, fingerprints, done, work, out_dir, overwrite, run_id) -> Path:
    """Install every layer from the work directory and write the checkpoint."""
    seen = next(reversed(done.values()))["seen"]  # every pass runs the same samples
    artifacts = []
    for e in experts:
        layers = {}
        for key in done:
            path = work / f"{e.attr}.blocks{key}.safetensors"
            if path.exists():
                layers.update(_load_layers(path, targets[e.attr]))
        artifacts.append(_install_expert(e, layers, cfg, fingerprints[e.attr], seen.get(e.attr, {})))
    calib = {"samples": len(samples), "settings": run.settings.to_dict(), "blocks_per_pass": run.blocks_per_pass,
             "run_id": run_id}
    if (run.shards or 1) != 1:
        calib["shards"] = run.shards
    save_checkpoint(out_dir, artifacts, cfg.to_dict(), overwrite=overwrite, extra={"calibration": calib})
    shutil.rmtree(work, ignore_errors=True)
    return out_dir


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
    d = {"cfg": cfg.to_dict(), "settings": run.settings.to_dict(), "bpp": run.blocks_per_pass,
         "res": run.reservoir_tokens, "seed": run.seed, "samples": samples_fingerprint(samples), "models": fingerprints}
    if (run.shards or 1) != 1:  # not the number of processes: a sharded run may resume on another count
        d["shards"] = run.shards
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _open_work_dir(work: Path, run_id: str, restart: bool) -> dict:
    progress = work / "progress.json"
    if restart and work.exists():
        shutil.rmtree(work)
    if progress.exists():
        state = json.loads(progress.read_text())
        if state.get("run_id") != run_id:
            raise RuntimeError(f"{work} holds an unfinished run with other settings, model or samples; "
                               "delete it or pass --restart to start over")
        log.info("resuming from %s: %d pass(es) already done", work, len(state["done"]))
        return dict(state["done"])
    work.mkdir(parents=True, exist_ok=True)
    _write_json(progress, {"run_id": run_id, "done": {}})
    return {}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
