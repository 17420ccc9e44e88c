"""One calibration pass: run the BF16 pipeline with statistics hooks on some blocks, then
quantize those blocks' layers.

:func:`calibrate_pass` is the whole pass, in one process or sharded over several
(:mod:`wanquant.calibration.shards` says how statistics are split and merged). Layers
are only quantized here, not installed: :mod:`wanquant.calibration.run` installs them
after every pass, so all statistics come from the BF16 model.
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from wanquant.calibration.collect import StatsCollector
from wanquant.calibration.config import CalibrationRun
from wanquant.calibration.shards import (
    assign_layers, gather_to_main, layer_cost, local_shards, merge_records, params_to_main, reduce_layer_stats,
    shard_ranges, shard_seed,
)
from wanquant.method.config import QuantConfig
from wanquant.distributed import DistContext
from wanquant.method.shared_clip import shared_clip_table
from wanquant.method.layer import quantize_layer
from wanquant.method.params import QuantizedLinearParams
from wanquant.model.pipeline import encode_prompts, run_pipeline
from wanquant.model.wan import ExpertSpec
from wanquant.numerics.stats import LayerStatsAccumulator

log = logging.getLogger(__name__)


def calibrate_pass(pipe, experts: list[ExpertSpec], targets, samples, cfg: QuantConfig, run: CalibrationRun,
                   dist: DistContext | None = None):
    """Statistics and quantized layers of ``targets``: ``(params[attr][name], report[attr])``.

    With ``run.shards > 1`` or a process group, rank 0 gets every layer of the pass and the
    other ranks get ``({}, {})``.
    """
    if dist is None and (run.shards or 1) == 1:
        collector = collect(pipe, experts, targets, samples, cfg, run, run.seed, run.progress)
        report = {attr: rec.to_dict() for attr, rec in collector.records.items()}
        params = quantize_layers(experts, targets, layer_names(experts, targets), collector.finalize,
                                 collector.release, cfg, run.progress)
        return params, report
    return _sharded_pass(pipe, experts, targets, samples, cfg, run, dist)


def collect(pipe, experts: list[ExpertSpec], targets, samples, cfg: QuantConfig, run: CalibrationRun, seed: int,
            progress: bool) -> StatsCollector:
    """Run the BF16 pipeline over ``samples`` with a collector attached; returns the collector."""
    collector = StatsCollector(experts, targets, cfg, run.reservoir_tokens, seed=seed)
    device = pipe._execution_device
    with collector:
        for s in tqdm(samples, desc="calibration samples", disable=not progress):
            pos, neg = encode_prompts(pipe, s.prompt, run.settings.negative_prompt, run.settings, device)
            collector.set_cond_context(pos)
            run_pipeline(pipe, s.image, s.prompt, run.settings, s.seed, output_type="latent",
                         prompt_embeds=pos, negative_prompt_embeds=neg)
    return collector


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


def _sharded_pass(pipe, experts, targets, samples, cfg, run: CalibrationRun, dist: DistContext | None):
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
            out.append(collect(pipe, experts, targets, part, cfg, run, shard_seed(run.seed, s), progress))
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

    merged: dict[str, dict[str, LayerStatsAccumulator]] = {e.attr: {} for e in experts}
    for name in names:
        for e in experts:
            if name not in collectors[0].acc[e.attr]:
                continue
            acc = reduce_layer_stats(dist, [c.acc[e.attr][name] for c in collectors], owner[name])
            for c in collectors:
                c.release(e.attr, name)
            if acc is not None:
                merged[e.attr][name] = acc
    del collectors

    mine_names = [n for n in names if owner[n] == rank]
    log.info("quantizing %d of %d layer names on rank %d", len(mine_names), len(names), rank)

    def quantize() -> dict:
        return quantize_layers(experts, targets, mine_names, lambda a, n: merged[a][n].finalize(),
                                        lambda a, n: merged[a].pop(n), cfg, progress)

    params = quantize() if dist is None else dist.guarded(quantize)
    if dist is None:
        return params, report
    return params_to_main(dist, experts, names, owner, params), report
