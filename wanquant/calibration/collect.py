"""Hooks that stream statistics out of a BF16 pipeline run, per expert and timestep bin.

Nothing keeps whole activations: each hooked input updates channel maxima, an fp32
Hessian and a bounded token reservoir of the current bin (:mod:`wanquant.numerics.stats`).
Each hook knows its expert, the active timestep bin and whether the forward is the
conditional or the unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from wanquant.method.config import QuantConfig
from wanquant.model.wan import ExpertSpec, QuantTarget, forward_inputs
from wanquant.numerics.stats import LayerStats, LayerStatsAccumulator


@dataclass
class ExpertRecord:
    """What the collector saw of one expert: timesteps, bins and branches per forward."""

    timesteps: list[float] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)  # (bin, branch) -> forwards

    def to_dict(self) -> dict:
        return {"timesteps": self.timesteps,
                "forwards": {f"bin{b}/{br}": n for (b, br), n in sorted(self.calls.items())}}


class StatsCollector:
    """Attach to the experts of a pipeline; accumulate statistics of ``targets``."""

    def __init__(self, experts: list[ExpertSpec], targets: dict[str, list[QuantTarget]], cfg: QuantConfig,
                 reservoir_tokens: int = 4096, stats_device: torch.device | str | None = None, seed: int = 0) -> None:
        self.experts, self.targets, self.cfg = experts, targets, cfg
        self.bins = {e.attr: e.timestep_bins(cfg) for e in experts}
        self.records = {e.attr: ExpertRecord() for e in experts}
        self._bin = {e.attr: 0 for e in experts}
        self._branch = {e.attr: "cond" for e in experts}
        self._cond_context: torch.Tensor | None = None
        self._handles: list = []
        q = cfg.smooth.act_quantile
        self.acc: dict[str, dict[str, LayerStatsAccumulator]] = {}
        for e in experts:
            dev = stats_device or next(e.module.parameters()).device
            self.acc[e.attr] = {
                t.name: LayerStatsAccumulator(t.shape[1], self.bins[e.attr].num_bins, reservoir_tokens,
                                              quantile=q if q < 1.0 else None, device=dev,
                                              seed=seed + 1000 * i, name=f"{e.attr}.{t.name}")
                for i, t in enumerate(targets[e.attr])
            }

    def set_cond_context(self, prompt_embeds: torch.Tensor) -> None:
        """The conditional text embedding of the sample being run (identifies the branch)."""
        self._cond_context = prompt_embeds

    def attach(self) -> "StatsCollector":
        for e in self.experts:
            self._handles.append(e.module.register_forward_pre_hook(self._expert_hook(e.attr), with_kwargs=True))
            for t in self.targets[e.attr]:
                # Members of a group read one input: hooking the first sees it once.
                self._handles.append(t.members[0].register_forward_pre_hook(self._layer_hook(e.attr, t.name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "StatsCollector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _expert_hook(self, attr: str):
        def hook(module, args, kwargs):
            t, ctx = forward_inputs(args, kwargs)
            t_val = float(t.max().item()) if isinstance(t, torch.Tensor) else float(t)
            b = self.bins[attr].bin_of(t_val)
            branch = "cond" if self._cond_context is None or ctx is self._cond_context else "uncond"
            self._bin[attr], self._branch[attr] = b, branch
            rec = self.records[attr]
            rec.timesteps.append(t_val)
            rec.calls[(b, branch)] += 1
        return hook

    def _layer_hook(self, attr: str, name: str):
        acc = self.acc[attr][name]

        def hook(module, args):
            x = args[0].detach()
            acc.update(x.reshape(-1, x.shape[-1]), self._bin[attr])
        return hook

    def finalize(self, attr: str, name: str) -> LayerStats:
        return self.acc[attr][name].finalize()

    def release(self, attr: str, name: str) -> None:
        """Free a layer's accumulators once it is quantized (Hessians are large)."""
        del self.acc[attr][name]
