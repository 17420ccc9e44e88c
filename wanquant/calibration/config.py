"""How a calibration run is carried out (what the method is: :class:`wanquant.method.config.QuantConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from wanquant.model.pipeline import GenerationSettings


@dataclass
class CalibrationRun:
    """Generation settings of the calibration forwards, memory bounds, seeds, shards."""

    settings: GenerationSettings
    blocks_per_pass: int | None = None  # None: every block in one pass
    reservoir_tokens: int = 4096
    seed: int = 0
    progress: bool = True
    # Calibration shards (contiguous sample ranges, merged in shard order). None: one per
    # process (1 without a process group). Same shards -> same artifacts on any number
    # of processes that divides them; see wanquant.calibration.shards.
    shards: int | None = None
