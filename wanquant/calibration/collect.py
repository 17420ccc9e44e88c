"""Hooks that stream statistics out of a BF16 pipeline run, per expert and timestep bin.

Nothing keeps whole activations: each hooked input updates channel maxima, an fp32
Hessian and a bounded token reservoir of the current bin (:mod:`wanquant.numerics.stats`),
without waiting for the device: one synchronisation per expert forward (its timestep).
Each hook knows its expert, the active timestep bin and whether the forward is the
conditional or the unconditional branch of classifier-free guidance.

What is computed once instead of many times (the results are the same, see
:meth:`LayerStatsAccumulator.update_repeated`):

* layers that read one tensor share one accumulator (:func:`wanquant.model.wan.input_key`:
  a group's members, and the cross-attention k/v of every block, which all read the
  expert's embedded text context);
* inputs the layer table marks ``static_per_video`` (that context) are the same at every
  step of a sample and branch: kept once per (sample, branch) and added with the number
  of forwards that saw them, per bin, when the sample ends (checked on device to really
  be equal at every step);
* ``cond_only``: the unconditional forwards are not collected (the paper's code does this).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from wanquant.method.config import QuantConfig
from wanquant.model.wan import ExpertSpec, QuantTarget, forward_inputs, input_key
from wanquant.numerics.stats import LayerStats, LayerStatsAccumulator


@dataclass
class ExpertRecord:
    """What the collector saw of one expert: timesteps, bins and branches per forward."""

    timesteps: list[float] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)  # (bin, branch) -> forwards

    def to_dict(self) -> dict:
        return {"timesteps": self.timesteps,
                "forwards": {f"bin{b}/{br}": n for (b, br), n in sorted(self.calls.items())}}


@dataclass
class _Static:
    """A static input of the current sample and branch: the tensor and its forwards per bin."""

    x: torch.Tensor
    bins: Counter
    differs: torch.Tensor  # bool on x's device: a later forward saw another tensor


class StatsCollector:
    """Attach to the experts of a pipeline; accumulate statistics of ``targets``.

    ``stats_device``: where the statistics live (default: each expert's device);
    ``host_keys``: ``(expert, input key)`` pairs whose Hessians live in host memory instead (spilled: formed
    on the device, added on the host). ``acc[attr][key]`` holds one accumulator per input.
    """

    def __init__(self, experts: list[ExpertSpec], targets: dict[str, list[QuantTarget]], cfg: QuantConfig,
                 reservoir_tokens: int = 4096, stats_device: torch.device | str | None = None, seed: int = 0,
                 cond_only: bool = False, fast_hessian: bool = True,
                 host_keys: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.experts, self.targets, self.cfg, self.cond_only = experts, targets, cfg, cond_only
        self.bins = {e.attr: e.timestep_bins(cfg) for e in experts}
        self.records = {e.attr: ExpertRecord() for e in experts}
        self._bin = {e.attr: 0 for e in experts}
        self._branch = {e.attr: "cond" for e in experts}
        self._cond_context: torch.Tensor | None = None
        self._plan: dict[str, dict[int, int]] | None = None  # hooked forwards per sample, per expert and bin
        self._samples = 0  # samples started (set_cond_context)
        self._cond_cast: dict = {}
        self._handles: list = []
        q = cfg.smooth.act_quantile
        self.acc: dict[str, dict[str, LayerStatsAccumulator]] = {}
        self.key_of: dict[str, dict[str, str]] = {}
        self._users: dict[str, dict[str, set[str]]] = {}
        self._hooked: dict[str, dict[str, QuantTarget]] = {}  # attr -> key -> the target whose input is hooked
        self._pending: dict[tuple[str, str, str], _Static] = {}  # (attr, key, branch)
        for e in experts:
            dev = stats_device or next(e.module.parameters()).device
            self.acc[e.attr], self.key_of[e.attr], self._users[e.attr], self._hooked[e.attr] = {}, {}, {}, {}
            for i, t in enumerate(targets.get(e.attr, [])):
                key = input_key(t)
                self.key_of[e.attr][t.name] = key
                self._users[e.attr].setdefault(key, set()).add(t.name)
                if key in self.acc[e.attr]:
                    continue
                self._hooked[e.attr][key] = t
                # seed of the first target reading this input: unshared layers keep their old seeds
                self.acc[e.attr][key] = LayerStatsAccumulator(
                    t.shape[1], self.bins[e.attr].num_bins, reservoir_tokens, quantile=q if q < 1.0 else None,
                    device="cpu" if (e.attr, key) in host_keys else dev, seed=seed + 1000 * i, name=f"{e.attr}.{key}",
                    fast_hessian=fast_hessian)

    def expect(self, timesteps: list[float], branches: int, samples: int) -> None:
        """The run ahead: ``samples`` generations, each of these denoising ``timesteps`` with
        ``branches`` forwards per step (2 under classifier-free guidance). Every reservoir
        of a per-forward input then admits only tokens that can end in its sample
        (:meth:`TokenReservoir.expect_batches`): about its capacity in all, not
        ``capacity (1 + ln forwards)``. Checked after every sample against what ran."""
        hooked_branches = 1 if self.cond_only else branches
        per_sample = {}
        for e in self.experts:
            per_bin = Counter(self.bins[e.attr].bin_of(t) for t in timesteps if e.covers(t))
            per_sample[e.attr] = {b: n * hooked_branches for b, n in per_bin.items()}
        self.plan_forwards(per_sample, samples)

    def plan_forwards(self, per_sample: dict[str, dict[int, int]], samples: int, checked: bool = True) -> None:
        """:meth:`expect` from hooked forwards per sample, expert and bin (``checked``: against what runs)."""
        for attr, per_bin in per_sample.items():
            for key, acc in self.acc[attr].items():
                if not self._hooked[attr][key].group.static_per_video:
                    acc.expect_batches({b: n * samples for b, n in per_bin.items()})
        self._plan = per_sample if checked else None

    def _check_plan(self) -> None:
        """Fewer forwards than planned would have made the admission threshold too tight."""
        if self._plan is None or not self._samples:
            return
        for attr, per_bin in self._plan.items():
            calls = self.records[attr].calls
            for b, n in per_bin.items():
                ran = calls[(b, "cond")] + (0 if self.cond_only else calls[(b, "uncond")])
                if ran < n * self._samples:
                    raise RuntimeError(
                        f"{attr}: timestep bin {b} ran {ran} hooked forwards in {self._samples} samples, the plan "
                        f"said {n} per sample (wanquant.calibration.collect.StatsCollector.expect): the reservoirs "
                        "would sample fewer tokens than they should. This is a bug in wanquant's forward plan for "
                        "this pipeline; please report it")

    def set_cond_context(self, prompt_embeds: torch.Tensor) -> None:
        """The conditional text embedding of the sample being run (identifies the branch).
        A new sample: the static inputs of the previous one are added now."""
        self.flush()
        self._check_plan()
        self._samples += 1
        self._cond_context, self._cond_cast = prompt_embeds, {}

    def attach(self) -> "StatsCollector":
        for e in self.experts:
            self._handles.append(e.module.register_forward_pre_hook(self._expert_hook(e.attr), with_kwargs=True))
            for key, t in self._hooked[e.attr].items():
                # Members of a group read one input: hooking the first sees it once.
                self._handles.append(t.members[0].register_forward_pre_hook(self._layer_hook(e.attr, key, t)))
        return self

    def detach(self, check: bool = True) -> None:
        """Remove the hooks, add the last sample's static inputs (``check``: the forward plan)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.flush()
        if check:
            self._check_plan()

    def __enter__(self) -> "StatsCollector":
        return self.attach()

    def __exit__(self, exc_type, *exc) -> None:
        self.detach(check=exc_type is None)  # an interrupted sample ran fewer forwards: not the plan's fault

    def _expert_hook(self, attr: str):
        def hook(module, args, kwargs):
            t, ctx = forward_inputs(args, kwargs)
            t_val = float(t.max().item()) if isinstance(t, torch.Tensor) else float(t)
            b = self.bins[attr].bin_of(t_val)
            branch = "cond" if self._is_cond(ctx) else "uncond"
            self._bin[attr], self._branch[attr] = b, branch
            rec = self.records[attr]
            rec.timesteps.append(t_val)
            rec.calls[(b, branch)] += 1
        return hook

    def _is_cond(self, ctx) -> bool:
        """The pipeline may pass the embedding cast to the expert's dtype (a new tensor every
        forward), so equal values count, not only the same object."""
        cond = self._cond_context
        if cond is None or ctx is cond:
            return True
        if not isinstance(ctx, torch.Tensor) or ctx.shape != cond.shape:
            return False
        cast = self._cond_cast.get((ctx.dtype, ctx.device))
        if cast is None:
            cast = self._cond_cast[(ctx.dtype, ctx.device)] = cond.to(ctx.device, ctx.dtype)
        return bool(torch.equal(ctx, cast))

    def _layer_hook(self, attr: str, key: str, target: QuantTarget):
        acc = self.acc[attr][key]
        static = target.group.static_per_video

        def hook(module, args):
            branch = self._branch[attr]
            if self.cond_only and branch != "cond":
                return
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if not static:
                acc.update(x, self._bin[attr])
                return
            slot = self._pending.get((attr, key, branch))
            if slot is None:
                self._pending[(attr, key, branch)] = _Static(x, Counter({self._bin[attr]: 1}),
                                                             torch.zeros((), dtype=torch.bool, device=x.device))
                return
            if x.shape != slot.x.shape:
                raise RuntimeError(f"{attr}.{key}: its input is marked static_per_video but changed shape within a "
                                   f"sample ({tuple(slot.x.shape)} -> {tuple(x.shape)})")
            slot.differs |= (x != slot.x).any()  # stays on the device: no synchronisation per forward
            slot.bins[self._bin[attr]] += 1
        return hook

    def flush(self) -> None:
        """Add the static inputs of the sample that ran (each once, with its forwards per bin)."""
        pending, self._pending = self._pending, {}
        for (attr, key, branch), slot in pending.items():
            if bool(slot.differs):
                raise RuntimeError(f"{attr}.{key} ({branch}): the layer table marks this input static per video, "
                                   "but it changed between steps of one sample; wanquant.model.wan.BLOCK_TABLE does "
                                   "not match this model")
            self.acc[attr][key].update_repeated(slot.x, dict(slot.bins))

    def settle(self) -> None:
        """Add the pending static inputs and wait for every copy in flight (for timings)."""
        self.flush()
        for accs in self.acc.values():
            for acc in accs.values():
                acc.settle()

    def finalize(self, attr: str, name: str) -> LayerStats:
        self.flush()
        return self.acc[attr][self.key_of[attr][name]].finalize()

    def release(self, attr: str, name: str) -> None:
        """Free a layer's accumulators once every layer reading its input is quantized."""
        key = self.key_of[attr][name]
        users = self._users[attr][key]
        users.discard(name)
        if not users:
            del self.acc[attr][key]
