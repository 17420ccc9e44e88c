"""One calibration pass: run the BF16 pipeline with statistics hooks on some blocks, then
quantize those blocks' layers.

:func:`calibrate_pass` is the whole pass, in one process or sharded over several
(:mod:`wanquant.calibration.shards` says how statistics are split and merged). Layers
are only quantized here, not installed: :mod:`wanquant.calibration.run` installs them
after every pass, so all statistics come from the BF16 model.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

import torch

from tqdm.auto import tqdm

from wanquant.calibration.collect import StatsCollector
from wanquant.calibration.budget import hessian_bytes, spill_plan
from wanquant.calibration.config import CalibrationRun
from wanquant.calibration.trajectory import ExpertRun, Trajectory, sample_key
from wanquant.calibration.shards import (
    assign_layers, gather_to_main, layer_cost, local_shards, merge_records, params_to_main, reduce_layer_stats,
    shard_ranges, shard_seed,
)
from wanquant.method.config import QuantConfig
from wanquant.distributed import DistContext
from wanquant.method.shared_clip import shared_clip_table
from wanquant.method.layer import quantize_layer
from wanquant.method.params import QuantizedLinearParams
from wanquant.model.pipeline import denoising_timesteps, encode_prompts, guidance_branches, run_pipeline
from wanquant.model.wan import ExpertSpec, input_key
from wanquant.numerics.stats import LayerStatsAccumulator

log = logging.getLogger(__name__)


def calibrate_pass(pipe, experts: list[ExpertSpec], targets, samples, cfg: QuantConfig, run: CalibrationRun,
                   dist: DistContext | None = None, trajectory: Trajectory | None = None):
    """Statistics and quantized layers of ``targets``: ``(params[attr][name], report[attr])``.

    With ``run.shards > 1`` or a process group, rank 0 gets every layer of the pass and the
    other ranks get ``({}, {})``. ``trajectory``: an expert-major pass (``targets`` of one
    expert; :func:`collect`).
    """
    if dist is None and (run.shards or 1) == 1:
        collector = collect(pipe, experts, targets, samples, cfg, run, run.seed, run.progress, trajectory)
        report = {attr: rec.to_dict() for attr, rec in collector.records.items()}
        params = quantize_layers(experts, targets, layer_names(experts, targets), collector.finalize,
                                 collector.release, cfg, run.progress)
        return params, report
    return _sharded_pass(pipe, experts, targets, samples, cfg, run, dist, trajectory)


def collect(pipe, experts: list[ExpertSpec], targets, samples, cfg: QuantConfig, run: CalibrationRun, seed: int,
            progress: bool, trajectory: Trajectory | None = None, copies: int = 1) -> StatsCollector:
    """Run the BF16 pipeline over ``samples`` with a collector attached; returns the collector.

    ``copies``: collectors of this pass alive at once in this process (local shards), which
    share the statistics budget (:func:`host_keys`).

    With a ``trajectory`` (expert-major), ``targets`` belong to one expert: only it computes,
    the experts before it replay their recorded outputs (run first if not recorded) and
    the ones after it are skipped (:mod:`wanquant.calibration.trajectory`).
    """
    hooked = experts if trajectory is None else [e for e in experts if targets.get(e.attr)]

    def make_collector() -> StatsCollector:  # once the experts are placed: the budget sees what is free
        host = host_keys(hooked, targets, run, pipe._execution_device, copies)
        if host:
            log.info("statistics of %d inputs kept in host memory (device budget)", len(host))
        col = StatsCollector(hooked, targets, cfg, run.reservoir_tokens, seed=seed, cond_only=run.cond_only,
                             fast_hessian=run.fast_hessian, host_keys=host)
        col.expect(denoising_timesteps(pipe, run.settings), guidance_branches(run.settings), len(samples))
        return col

    if trajectory is None:
        collector = make_collector()
        with collector:
            _run_samples(pipe, samples, run, progress, collector, None)
        return collector
    if len(hooked) != 1:
        raise ValueError(f"an expert-major pass collects one expert, got {[e.attr for e in hooked]}")
    live = hooked[0].attr
    keys = [sample_key(s) for s in samples]
    device = pipe._execution_device
    embeds = trajectory.prompt_embeddings(
        samples, lambda s: encode_prompts(pipe, s.prompt, run.settings.negative_prompt, run.settings, device))
    for attr in trajectory.missing_before(live, keys):  # a resumed run: record the earlier expert again
        log.info("running %s once more to record the outputs %s replays", attr, live)
        trajectory.placement.activate(attr)
        _run_samples(pipe, samples, run, progress, None, trajectory.run_for(attr), embeds)
    trajectory.placement.activate(live)
    collector = make_collector()
    with collector:
        _run_samples(pipe, samples, run, progress, collector, trajectory.run_for(live), embeds)
    return collector


def _run_samples(pipe, samples, run: CalibrationRun, progress: bool, collector: StatsCollector | None,
                 expert_run: ExpertRun | None, embeds: dict | None = None) -> None:
    device = pipe._execution_device
    with expert_run.installed() if expert_run is not None else contextlib.nullcontext():
        for s in tqdm(samples, desc="calibration samples", disable=not progress):
            if embeds is not None:
                pos, neg = embeds[sample_key(s)]
            else:
                pos, neg = encode_prompts(pipe, s.prompt, run.settings.negative_prompt, run.settings, device)
            if collector is not None:
                collector.set_cond_context(pos)
            if expert_run is not None:
                expert_run.begin_sample(sample_key(s))
            run_pipeline(pipe, s.image, s.prompt, run.settings, s.seed, output_type="latent",
                         prompt_embeds=pos, negative_prompt_embeds=neg)


def host_keys(experts: list[ExpertSpec], targets, run: CalibrationRun, device, copies: int = 1
              ) -> frozenset[tuple[str, str]]:
    """``(expert, input)`` pairs whose Hessians go to host memory (:func:`spill_plan`).

    The device budget is ``run.stats_memory_gb`` (split over ``copies``), or by default
    what is free on the device now less ``run.stats_reserve_gb`` (activations, the VAE).
    Nothing is spilled from a CPU.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return frozenset()
    if run.stats_memory_gb is not None:
        budget = run.stats_memory_gb * 1e9 / copies
    else:
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = max(0.0, free + cached - run.stats_reserve_gb * 1e9)
    sizes = {(e.attr, input_key(t)): hessian_bytes(t.shape[1]) for e in experts for t in targets.get(e.attr, [])}
    return spill_plan(sizes, int(budget))


def layer_names(experts: list[ExpertSpec], targets) -> list[str]:
    return list(dict.fromkeys(t.name for e in experts for t in targets[e.attr]))


def quantize_layers(experts: list[ExpertSpec], targets, names: list[str], stats_of, release, cfg: QuantConfig,
                    progress: bool) -> dict[str, dict[str, QuantizedLinearParams]]:
    """Quantize the layers ``names`` of every expert; ``stats_of(attr, name)`` gives their statistics."""
    params: dict[str, dict[str, QuantizedLinearParams]] = {e.attr: {} for e in experts}
    shared = not cfg.clip.per_expert and len(experts) > 1
    for name in tqdm(names, desc="quantizing layers", disable=not progress):
        owners = [(e, t) for e in experts for t in targets[e.attr] if t.name == name]
        reservoirs = []
        for e, t in owners:
            stats = stats_of(e.attr, name)
            if stats.n_tokens == 0:
                raise RuntimeError(f"{e.attr}.{name} saw no calibration tokens: the {e.role} expert never ran; "
                                   "use more inference steps so that every expert runs")
            w, b = t.fused_weight()
            num_bins = e.timestep_bins(cfg).num_bins
            params[e.attr][name] = quantize_layer(w, b, stats, cfg, num_bins, name=f"{e.attr}.{name}")
            reservoirs.append(stats.reservoirs)
            release(e.attr, name)
        if shared:
            _share_clip_table([params[e.attr][name] for e, _ in owners], reservoirs, cfg,
                              owners[0][0].timestep_bins(cfg).num_bins)
    return params


def _share_clip_table(layers: list[QuantizedLinearParams], reservoirs: list[dict], cfg: QuantConfig,
                      num_bins: int) -> None:
    table, report = shared_clip_table(list(zip(layers, reservoirs)), cfg, num_bins)
    for p in layers:
        if p.clip_table.shape[0] != num_bins:
            raise ValueError("a shared clip policy needs the same number of timestep bins in every expert")
        p.clip_table = table.to(p.clip_table.device)
        p.report["clip_shared"] = report


def _sharded_pass(pipe, experts, targets, samples, cfg, run: CalibrationRun, dist: DistContext | None,
                  trajectory: Trajectory | None):
    """:func:`calibrate_pass` over shards, in one process or several."""
    shards = run.shards
    ranges = shard_ranges(len(samples), shards)
    mine = local_shards(shards, dist)
    main = dist is None or dist.is_main
    progress = run.progress and main

    def collect_shards() -> list[StatsCollector]:
        out = []
        for s in mine:
            part = [samples[i] for i in ranges[s]]
            log.info("shard %d/%d: samples %d..%d", s, shards, ranges[s].start, ranges[s].stop - 1)
            out.append(collect(pipe, experts, targets, part, cfg, run, shard_seed(run.seed, s), progress, trajectory,
                               copies=len(mine)))
        return out

    collectors = collect_shards() if dist is None else dist.guarded(collect_shards)
    records = [c.records for c in collectors]
    if dist is not None:
        gathered = gather_to_main(dist, records)
        records = [r for rs in gathered for r in rs] if main else []
    report = {attr: rec.to_dict() for attr, rec in merge_records(records).items()} if main else {}

    names = layer_names(experts, targets)
    world = dist.world_size if dist is not None else 1
    costs = {n: sum(layer_cost(*t.shape) for e in experts for t in targets[e.attr] if t.name == n) for n in names}
    owner = assign_layers(costs, world)
    rank = dist.rank if dist is not None else 0

    # One reduction per input (layers reading one input share its statistics), to every
    # rank that owns a layer reading it; in one process that is a single fold.
    key_of = collectors[0].key_of
    merged: dict[str, dict[str, LayerStatsAccumulator]] = {e.attr: {} for e in experts}
    for e in experts:
        users: dict[str, list[str]] = {}
        for name in names:
            if name in key_of.get(e.attr, {}):
                users.setdefault(key_of[e.attr][name], []).append(name)
        for key, using in users.items():
            for o in sorted({owner[n] for n in using}):
                acc = reduce_layer_stats(dist, [c.acc[e.attr][key] for c in collectors], o)
                if acc is not None:
                    merged[e.attr][key] = acc
            for c in collectors:
                for n in using:
                    c.release(e.attr, n)
    del collectors

    mine_names = [n for n in names if owner[n] == rank]
    log.info("quantizing %d of %d layer names on rank %d", len(mine_names), len(names), rank)

    left = Counter((e.attr, key_of[e.attr][n]) for n in mine_names for e in experts if n in key_of.get(e.attr, {}))

    def release(attr: str, name: str) -> None:  # a shared input's statistics go with its last layer
        k = (attr, key_of[attr][name])
        left[k] -= 1
        if not left[k]:
            merged[attr].pop(k[1])

    def quantize() -> dict:
        return quantize_layers(experts, targets, mine_names, lambda a, n: merged[a][key_of[a][n]].finalize(),
                               release, cfg, progress)

    params = quantize() if dist is None else dist.guarded(quantize)
    if dist is None:
        return params, report
    return params_to_main(dist, experts, names, owner, params), report
