"""How a calibration run is carried out (what the method is: :class:`wanquant.method.config.QuantConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from wanquant.model.pipeline import GenerationSettings

SCHEDULES = ("expert_major", "interleaved")


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
    # "expert_major": each expert's part of every trajectory in turn (wanquant.calibration.
    # trajectory): only that expert's statistics and BF16 weights on the device, the
    # experts before it replayed from their cached outputs. Same statistics as
    # "interleaved" (both experts hooked in one run per sample), which needs both at once.
    # Used with two experts and per-expert clip tables; otherwise interleaved.
    schedule: Literal["expert_major", "interleaved"] = "expert_major"
    offload_idle_experts: bool = True  # expert_major on CUDA: the experts not running wait in host memory
    # Collect on the conditional forwards only (the paper's code): under classifier-free guidance
    # half the statistics work; the pipeline still runs both branches (the trajectory is unchanged).
    cond_only: bool = False
    fast_hessian: bool = True  # 16-bit GEMM with fp32 output for X^T X where the device has one
    # Device memory for statistics (GB); inputs beyond it keep their Hessians in host memory
    # (formed on the device, added on the host; largest first). None: what is free on the
    # device when collection starts, less stats_reserve_gb for activations and the VAE.
    stats_memory_gb: float | None = None
    stats_reserve_gb: float = 6.0

    def __post_init__(self) -> None:
        # The messages name the CLI flag and the API argument: the CLI and api.quantize build this.
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--calib-schedule (schedule) must be one of {', '.join(SCHEDULES)}; "
                             f"got {self.schedule!r}")
        if not isinstance(self.cond_only, bool):
            raise ValueError(f"cond_only must be True or False, got {self.cond_only!r}")
        gb = self.stats_memory_gb
        if gb is not None and (isinstance(gb, bool) or not isinstance(gb, (int, float)) or not gb >= 0):
            raise ValueError(f"--stats-memory-gb (stats_memory_gb) must be a number of GB >= 0 (or left out: what "
                             f"is free on the device less {self.stats_reserve_gb} GB), got {gb!r}")
        if not self.stats_reserve_gb >= 0:
            raise ValueError(f"stats_reserve_gb must be >= 0, got {self.stats_reserve_gb!r}")
