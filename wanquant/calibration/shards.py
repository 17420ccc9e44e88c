"""Calibration shards: splitting the samples and the layers over processes, and merging
the statistics so that the artifacts depend on the shard count, not the process count.

    torchrun --nproc_per_node 2 -m wanquant.cli quantize --model DIR --calib calib.jsonl --out q

The process group is :mod:`wanquant.distributed`; the pass that uses these functions is
:func:`wanquant.calibration.passes.calibrate_pass`. Every process (rank) holds the whole BF16 pipeline on its own device (``cuda:LOCAL_RANK``,
NCCL; or the CPU, gloo) and the work of one calibration pass is split twice:

1. Samples (data parallel). The calibration samples are cut into ``S`` contiguous
   *shards*; rank ``r`` of ``W`` runs the pipeline over shards
   ``r*S/W .. (r+1)*S/W - 1`` with one :class:`StatsCollector` per shard. Shard ``s``
   draws its reservoir keys from seeds offset by ``s * 2**32`` (shard 0 uses the run's
   seed, so ``S = 1`` is exactly the single-process run).
2. Layers (the expensive part). Each quantized layer name is given to one rank (largest
   first, to the least loaded rank); that rank receives every shard's statistics of the
   layer, merges them, runs :func:`quantize_layer` (for every expert: a shared clip
   policy needs both on one rank) and sends the parameters to rank 0, which writes the
   pass to the work directory and, at the end, the checkpoint.

How the statistics are merged, and what is guaranteed:

* absmax (and the histogram's maxima): ``reduce(MAX)``; histogram counts:
  ``reduce(SUM)`` in int64; token counts: sums of integers. All exact, in any order.
* Reservoirs: gathered per shard (keys and tokens in slot order) and folded in shard
  order with :meth:`TokenReservoir.merge` (the smallest keys of the union): exact, and
  the same set whatever the grouping; the same slots as the single-process fold.
* Hessians (fp32 sums of ``X^T X``, as packed upper strips): gathered per shard and added in shard order,
  ``((H_0 + H_1) + H_2) + ...``, exactly as :meth:`LayerStatsAccumulator.merge` folds
  them in one process. fp32 addition is not associative, so this is where the shard
  count shows.

Guarantee: the artifacts depend on the samples, the settings and ``S``, not on ``W``.
A run with ``S`` shards on ``W`` processes (any ``W`` dividing ``S``) writes the same
tensors, bit for bit, as the same run in one process (``CalibrationRun(shards=S)``,
``--calib-shards S``), provided each shard's forward passes compute the same bits on
every rank's device (same GPU model and software; the CPU is deterministic). Tested in
``tests/test_distributed.py`` with two gloo processes.

What differs between ``S = 1`` (the plain single-process run) and ``S > 1``: the Hessian
by fp32 reassociation only (each entry within about ``(n + S) * 2^-24 * sum_t |x_ti x_tj|``
of the exact sum, ``n`` the number of accumulated batches: far below GPTQ's damping of
``0.01 * mean(diag H)``), and the reservoirs, which are an equally uniform sample drawn
with other random keys. Maxima, histograms, counts and the recorded timesteps are the
same. A run on ``W`` GPUs can therefore be reproduced on one GPU with ``--calib-shards W``
(at ``S/W`` times the statistics memory), and an interrupted sharded run may resume on
another number of GPUs: the work directory's run id holds ``S``, not ``W``.

Memory: with ``S = W`` a rank holds the statistics of one shard, as the single-process
run does; the owner of a layer briefly holds the ``S`` gathered Hessians of that layer.
"""

from __future__ import annotations

import logging
from functools import reduce
from typing import Any

import torch
import torch.distributed as tdist

from wanquant.calibration.collect import ExpertRecord
from wanquant.distributed import DistContext
from wanquant.numerics.stats import LayerStatsAccumulator, TokenReservoir

log = logging.getLogger(__name__)

SHARD_SEED_STRIDE = 1 << 32  # shard s seeds its reservoirs with seed + s * stride


# ---------------------------------------------------------------------------------------
# shards and layer ownership


def resolve_shards(shards: int | None, dist: DistContext | None, n_samples: int) -> int:
    """The run's shard count: one per process unless given; checked against the samples."""
    world = dist.world_size if dist is not None else 1
    s = world if shards is None else int(shards)
    if s < 1:
        raise ValueError(f"calibration shards must be >= 1, got {s}")
    if s % world:
        raise ValueError(f"{s} calibration shards cannot be split evenly over {world} processes; "
                         f"use a multiple of {world}")
    if s > n_samples:
        raise ValueError(f"{s} calibration shards need at least {s} samples, got {n_samples}")
    return s


def shard_ranges(n_samples: int, shards: int) -> list[range]:
    """Contiguous, balanced sample ranges (the first ``n % shards`` get one more)."""
    base, extra = divmod(n_samples, shards)
    out, start = [], 0
    for s in range(shards):
        stop = start + base + (1 if s < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def shard_seed(seed: int, shard: int) -> int:
    return seed + shard * SHARD_SEED_STRIDE


def local_shards(shards: int, dist: DistContext | None) -> list[int]:
    if dist is None:
        return list(range(shards))
    per = shards // dist.world_size
    return list(range(dist.rank * per, (dist.rank + 1) * per))


def assign_layers(costs: dict[str, float], world_size: int) -> dict[str, int]:
    """Owner rank of each layer: largest cost first, to the least loaded rank (ties: lowest)."""
    load = [0.0] * world_size
    owner = {}
    for name in sorted(costs, key=lambda n: -costs[n]):  # stable: equal costs keep their order
        r = min(range(world_size), key=lambda j: (load[j], j))
        owner[name] = r
        load[r] += costs[name]
    return {n: owner[n] for n in costs}


def layer_cost(n: int, k: int) -> float:
    return float(n) * k * k + float(k) ** 3  # GPTQ sweep + Cholesky dominate


# ---------------------------------------------------------------------------------------
# merging statistics


def merge_records(per_shard: list[dict[str, ExpertRecord]]) -> dict[str, ExpertRecord]:
    """Timesteps concatenated and forward counts added, in shard order."""
    out: dict[str, ExpertRecord] = {}
    for recs in per_shard:
        for attr, rec in recs.items():
            o = out.setdefault(attr, ExpertRecord())
            o.timesteps.extend(rec.timesteps)
            o.calls.update(rec.calls)
    return out


def fold_shards(shards: list[LayerStatsAccumulator]) -> LayerStatsAccumulator:
    """The single-process merge: shard 0 absorbs the others, in shard order."""
    out = shards[0]
    for other in shards[1:]:
        out.merge(other)
    return out


def reduce_layer_stats(dist: DistContext | None, local: list[LayerStatsAccumulator],
                       owner: int) -> LayerStatsAccumulator | None:
    """Merge one layer's per-shard statistics of every rank on rank ``owner``.

    ``local``: this rank's accumulators, in shard order (every rank holds as many). Called
    by every rank in the same order. Returns the merged accumulator on ``owner`` (equal,
    bit for bit, to :func:`fold_shards` of all shards in one process), ``None`` elsewhere.
    """
    if dist is None:
        return fold_shards(local)
    world, per, is_owner = dist.world_size, len(local), dist.rank == owner
    dev = dist.comm_device
    ref = local[0]

    # Exact in any order: maxima and integer counts.
    amax = reduce(torch.maximum, [a.absmax.value for a in local]).to(dev)
    tdist.reduce(amax, owner, op=tdist.ReduceOp.MAX)
    hist = None
    if ref.hist is not None:
        counts = reduce(torch.add, [a.hist.counts for a in local]).to(dev)
        hmax = reduce(torch.maximum, [a.hist.amax.value for a in local]).to(dev)
        tdist.reduce(counts, owner, op=tdist.ReduceOp.SUM)
        tdist.reduce(hmax, owner, op=tdist.ReduceOp.MAX)
        hist = (counts, hmax)

    # Small per-shard facts every rank needs (the padded sizes of the gathers below).
    meta = [{"n_tokens": a.hessian.n_tokens,
             "res": [(len(r.keys), r.tokens.dtype, r.n_seen, r.seed, r.capacity) for r in a.reservoirs]}
            for a in local]
    metas = [m for ms in dist.all_gather_object(meta) for m in ms]  # shard order: rank-major

    # Hessians: gathered per shard, added in shard order (fp32 addition is not associative).
    hessians: list[torch.Tensor | None] = [None] * (world * per)
    for j, a in enumerate(local):
        h = a.hessian._settled().to(dev)  # the packed strips
        bufs = [torch.empty_like(h) for _ in range(world)] if is_owner else None
        tdist.gather(h, bufs, dst=owner)
        if is_owner:
            for r in range(world):
                hessians[r * per + j] = bufs[r]
        del h, bufs

    # Reservoirs: gathered per shard and bin, folded with TokenReservoir.merge in shard order.
    reservoirs: list[list[TokenReservoir]] = [[] for _ in range(world * per)]
    for b in range(ref.num_bins):
        rows = max(m["res"][b][0] for m in metas)
        dtype = reduce(torch.promote_types, [m["res"][b][1] for m in metas])  # exact upcast for transport
        for j, a in enumerate(local):
            res = a.reservoirs[b]
            keys = torch.zeros(rows, dtype=torch.float64)
            toks = torch.zeros(rows, ref.k, dtype=dtype)
            keys[: len(res.keys)] = res.keys
            toks[: len(res.keys)] = res.tokens.to(dtype)
            kbufs = [torch.empty_like(keys, device=dev) for _ in range(world)] if is_owner else None
            tbufs = [torch.empty_like(toks, device=dev) for _ in range(world)] if is_owner else None
            if rows:
                tdist.gather(keys.to(dev), kbufs, dst=owner)
                tdist.gather(toks.to(dev), tbufs, dst=owner)
            if is_owner:
                for r in range(world):
                    s = r * per + j
                    n, tdtype, n_seen, seed, cap = metas[s]["res"][b]
                    rr = TokenReservoir(ref.k, cap, seed, tdtype, name=ref.name)
                    if rows:
                        rr.load(kbufs[r][:n], tbufs[r][:n], n_seen)
                    rr.n_seen = n_seen
                    reservoirs[s].append(rr)
    if not is_owner:
        return None

    out = LayerStatsAccumulator(ref.k, ref.num_bins, 0, ref.quantile, ref.hessian.packed.dtype, device="meta",
                                name=ref.name, hessian_strip=ref.hessian.strip)
    out.absmax.value = amax.cpu()
    if hist is not None:
        out.hist.counts, out.hist.amax.value = hist[0].cpu(), hist[1].cpu()
    h = hessians[0]
    for other in hessians[1:]:
        h += other  # what HessianAccumulator.merge does
    out.hessian.packed = h.to(ref.hessian.packed.device)
    out.hessian.n_tokens = sum(m["n_tokens"] for m in metas)
    out.reservoirs = []
    for b in range(ref.num_bins):
        merged = reservoirs[0][b]
        for s in range(1, world * per):
            merged.merge(reservoirs[s][b])
        out.reservoirs.append(merged)
    return out


# ---------------------------------------------------------------------------------------
# moving results between ranks


def gather_to_main(dist: DistContext, obj: Any) -> list | None:
    out = [None] * dist.world_size if dist.is_main else None
    tdist.gather_object(obj, out, dst=0)
    return out


def params_to_main(dist: DistContext, experts, names: list[str], owner: dict[str, int], params: dict) -> dict:
    """Every layer's parameters on rank 0, in the single-process order (names, then experts)."""
    out = {e.attr: {} for e in experts}
    for name in names:
        o = owner[name]
        for e in experts:
            if o == 0:
                if dist.is_main and name in params[e.attr]:
                    out[e.attr][name] = params[e.attr][name]
                continue
            if dist.rank == o:
                p = params[e.attr].get(name)
                dist.send_object(None if p is None else _cpu(p), dst=0)
            elif dist.is_main:
                p = dist.recv_object(src=o)
                if p is not None:
                    out[e.attr][name] = p
    return out if dist.is_main else {}


def _cpu(p):
    return p.to(torch.device("cpu"))
