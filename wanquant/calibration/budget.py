"""Memory arithmetic of calibration statistics: what they take and what goes to the host.

Per input of ``K`` channels the statistics are an fp32 Hessian stored as its upper strips
(:class:`wanquant.numerics.stats.HessianAccumulator`: ``2 (K^2 + K s)`` bytes for strips of
``s`` rows, against ``4 K^2`` for the full matrix), the channel maxima and, on the host,
the token reservoirs. At A14B size (K = 5120, FFN down 13824, s = 1024) a block's Hessians
are 5 x 63 MB + 410 MB; the cross-attention k/v input is the same in every block (one
Hessian per expert), so one expert's 40 blocks need 29.0 GB (51.7 GB as full matrices):
beside the 28.6 GB BF16 expert they fit an 80 GB GPU, and nothing is spilled by default.
"""

from __future__ import annotations

from wanquant.numerics.stats import HESSIAN_STRIP, packed_numel


def hessian_bytes(k: int, itemsize: int = 4, strip: int | None = HESSIAN_STRIP) -> int:
    """Bytes of one Hessian as stored (``strip`` None: the full ``K x K`` matrix)."""
    return packed_numel(k, strip) * itemsize


def spill_plan(sizes: dict, budget: int) -> frozenset:
    """The inputs whose Hessians go to host memory so that the rest fit in ``budget`` bytes.

    Largest first: a spilled Hessian costs a device-to-host copy and a host addition per
    forward in proportion to its bytes, whatever its size, so spilling few large ones
    keeps the number of transfers (and their fixed costs) low. Ties keep their order.
    """
    if budget < 0:
        raise ValueError(f"statistics budget must be >= 0 bytes, got {budget}")
    total = sum(sizes.values())
    spilled = []
    for key in sorted(sizes, key=lambda k: -sizes[k]):
        if total <= budget:
            break
        spilled.append(key)
        total -= sizes[key]
    return frozenset(spilled)


def expert_stats_bytes(shapes: list[tuple[str, int]], strip: int | None = HESSIAN_STRIP) -> int:
    """Device bytes of one expert's Hessians: ``shapes`` is ``[(input key, K)]``, keys shared once."""
    return sum(hessian_bytes(k, strip=strip) for k in dict(shapes).values())
