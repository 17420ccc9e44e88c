"""Memory arithmetic of calibration statistics: what they take and what goes to the host.

Per input of ``K`` channels the statistics are an fp32 Hessian (``4 K^2`` bytes), the
channel maxima and, on the host, the token reservoirs. At A14B size (K = 5120, FFN down
13824) a block's Hessians are 6 x 105 MB + 764 MB; the cross-attention k/v input is the
same in every block (one Hessian per expert), so one expert's 40 blocks need 50.4 GB.
"""

from __future__ import annotations


def hessian_bytes(k: int, itemsize: int = 4) -> int:
    return k * k * itemsize


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


def expert_stats_bytes(shapes: list[tuple[str, int]]) -> int:
    """Device bytes of one expert's Hessians: ``shapes`` is ``[(input key, K)]``, keys shared once."""
    return sum(hessian_bytes(k) for k in dict(shapes).values())
