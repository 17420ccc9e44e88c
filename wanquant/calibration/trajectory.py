"""Expert-major calibration: each expert's part of every trajectory in turn.

A two-expert Wan pipeline runs the high-noise expert for the first steps of a video and
the low-noise expert for the rest. Hooking both in one run needs both experts' BF16
weights and statistics on the device at once (57 GB of weights and about 100 GB of
Hessians at A14B size). In the run for expert ``E`` the other experts' forwards are
replaced (their weights are never read, so they can wait in host memory):

* experts *before* ``E`` in the trajectory return the outputs they produced when they
  ran (recorded in an :class:`OutputCache`): ``E`` sees the same inputs, bit for bit, as
  in a run of the whole pipeline, because every step before it got the same outputs;
* experts *after* ``E`` return zeros: nothing after ``E``'s last step reaches ``E``.

Every expert forward of the trajectory therefore runs once (plus cheap replays), and
each expert's statistics are complete, can be quantized and freed before the next
expert runs. The cache holds one output latent per replayed forward on the host (about
3 MB at 480x832x61; 1.5 GB for 12 samples x 20 steps x 2 branches). If it is lost (a
resumed run), the earlier expert is run once more to refill it.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager

import torch

from wanquant.model.wan import ExpertSpec, forward_inputs

log = logging.getLogger(__name__)


def sample_key(sample) -> tuple:
    """What identifies a calibration sample's trajectory (its prompt, seed and source)."""
    return (sample.source, sample.seed, sample.prompt)


class OutputCache:
    """Recorded expert outputs: ``attr -> sample key -> [(timestep, output on the host)]``."""

    def __init__(self) -> None:
        self._out: dict[str, dict[tuple, list[tuple[float, torch.Tensor]]]] = {}

    def has(self, attr: str, keys: list[tuple]) -> bool:
        got = self._out.get(attr, {})
        return all(k in got for k in keys)

    def start(self, attr: str, key: tuple) -> None:
        self._out.setdefault(attr, {})[key] = []

    def record(self, attr: str, key: tuple, t: float, out: torch.Tensor) -> None:
        self._out[attr][key].append((t, out.detach().to("cpu", copy=True)))

    def get(self, attr: str, key: tuple, i: int, t: float) -> torch.Tensor:
        calls = self._out.get(attr, {}).get(key)
        if calls is None or i >= len(calls):
            raise RuntimeError(f"no recorded output of {attr} for forward {i} of calibration sample {key[0]}: "
                               "the trajectory differs from the recorded one")
        t_rec, out = calls[i]
        if t_rec != t:
            raise RuntimeError(f"{attr} forward {i} of sample {key[0]} runs at timestep {t}, recorded at {t_rec}: "
                               "the calibration settings changed between the expert runs")
        return out

    def nbytes(self) -> int:
        return sum(o.numel() * o.element_size() for per in self._out.values() for calls in per.values()
                   for _, o in calls)


def _t_value(t) -> float:
    return float(t.max().item()) if isinstance(t, torch.Tensor) else float(t)


class ExpertRun:
    """One run of the trajectories in which only ``live`` computes (see the module doc).

    ``record``: keep the live expert's outputs in ``cache`` (an expert after it will
    replay them). Call :meth:`begin_sample` before each sample's pipeline run.
    """

    def __init__(self, experts: list[ExpertSpec], live: str, cache: OutputCache, record: bool) -> None:
        order = [e.attr for e in experts]
        if live not in order:
            raise ValueError(f"{live} is not an expert of this pipeline ({order})")
        self.experts, self.live, self.cache, self.record = experts, live, cache, record
        self.before = [e for e in experts if order.index(e.attr) < order.index(live)]
        self.after = [e for e in experts if order.index(e.attr) > order.index(live)]
        self._key: tuple | None = None
        self._calls: Counter = Counter()

    def begin_sample(self, key: tuple) -> None:
        self._key, self._calls = key, Counter()
        if self.record:
            self.cache.start(self.live, key)

    def _replay(self, e: ExpertSpec):
        def forward(*args, **kwargs):
            t, _ = forward_inputs(args, kwargs)
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            i = self._calls[e.attr]
            self._calls[e.attr] += 1
            out = self.cache.get(e.attr, self._key, i, _t_value(t)).to(hidden.device)
            return _returned(out, kwargs, e.attr)
        return forward

    def _skip(self, e: ExpertSpec):
        out_channels = e.module.config.out_channels

        def forward(*args, **kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            out = hidden.new_zeros((hidden.shape[0], out_channels, *hidden.shape[2:]))
            return _returned(out, kwargs, e.attr)
        return forward

    def _recorder(self):
        def hook(module, args, kwargs, output):
            t, _ = forward_inputs(args, kwargs)
            out = output[0] if isinstance(output, tuple) else output.sample
            self.cache.record(self.live, self._key, _t_value(t), out)
        return hook

    @contextmanager
    def installed(self):
        """The replaced forwards (instance attributes, removed on exit) and the recorder."""
        patched, handles = [], []
        try:
            for e in self.before:
                e.module.forward = self._replay(e)
                patched.append(e.module)
            for e in self.after:
                e.module.forward = self._skip(e)
                patched.append(e.module)
            if self.record:
                live = next(e for e in self.experts if e.attr == self.live)
                handles.append(live.module.register_forward_hook(self._recorder(), with_kwargs=True))
            yield self
        finally:
            for m in patched:
                del m.forward
            for h in handles:
                h.remove()


def _returned(out: torch.Tensor, kwargs: dict, attr: str):
    if kwargs.get("return_dict", True) is not False:
        raise RuntimeError(f"{attr}: expert-major calibration expects the pipeline to call the expert with "
                           "return_dict=False (the Wan pipelines do); use CalibrationRun(schedule='interleaved')")
    return (out,)


class ExpertPlacement:
    """Moves the experts that are not running to host memory (CUDA only), and the text
    encoder once every prompt is encoded; restores all on exit."""

    def __init__(self, experts: list[ExpertSpec], enabled: bool, text_encoder=None) -> None:
        self.experts = experts
        self.home = {e.attr: next(e.module.parameters()).device for e in experts}
        self.enabled = enabled and any(d.type == "cuda" for d in self.home.values())
        self.text_encoder = text_encoder
        self.te_home = next(text_encoder.parameters()).device if text_encoder is not None else None

    def park_text_encoder(self) -> None:
        if self.enabled and self.text_encoder is not None and self.te_home.type == "cuda":
            self.text_encoder.to("cpu")
            torch.cuda.empty_cache()

    def activate(self, attr: str) -> None:
        if not self.enabled:
            return
        for e in self.experts:
            if e.attr != attr and next(e.module.parameters()).device != torch.device("cpu"):
                e.module.to("cpu")
        torch.cuda.empty_cache()
        e = next(e for e in self.experts if e.attr == attr)
        e.module.to(self.home[attr])

    def restore(self) -> None:
        if self.enabled:
            for e in self.experts:
                e.module.to(self.home[e.attr])
            if self.text_encoder is not None:
                self.text_encoder.to(self.te_home)

    def __enter__(self) -> "ExpertPlacement":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


class Trajectory:
    """What persists between the expert runs of a calibration: the output cache, the
    prompt embeddings (encoded once; the text encoder then waits in host memory) and
    the placement of the experts."""

    def __init__(self, experts: list[ExpertSpec], offload: bool, text_encoder=None) -> None:
        self.experts = experts
        self.cache = OutputCache()
        self.placement = ExpertPlacement(experts, offload, text_encoder)
        self.embeddings: dict[tuple, tuple] = {}

    def prompt_embeddings(self, samples, encode) -> dict[tuple, tuple]:
        """``sample key -> encode(sample)`` for ``samples``, encoding only the new ones."""
        new = [s for s in samples if sample_key(s) not in self.embeddings]
        if new and self.placement.text_encoder is not None:
            self.placement.text_encoder.to(self.placement.te_home)
        for s in new:
            self.embeddings[sample_key(s)] = encode(s)
        self.placement.park_text_encoder()
        return {sample_key(s): self.embeddings[sample_key(s)] for s in samples}

    def order(self) -> list[str]:
        return [e.attr for e in self.experts]

    def run_for(self, live: str) -> ExpertRun:
        """The run collecting ``live``'s statistics (it records outputs if a later expert needs them)."""
        order = self.order()
        return ExpertRun(self.experts, live, self.cache, record=order.index(live) < len(order) - 1)

    def missing_before(self, live: str, keys: list[tuple]) -> list[str]:
        """Experts before ``live`` whose outputs are not recorded for every sample."""
        order = self.order()
        return [a for a in order[: order.index(live)] if not self.cache.has(a, keys)]
