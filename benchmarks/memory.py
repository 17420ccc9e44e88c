"""Memory policies at full A14B scale (issue 15): 720p x 81 in 16 GB, 480p x 81 in 12 GB.

Wan2.2-I2V-A14B with RANDOM weights (values change neither memory nor time, DESIGN.md
section 7), through the user's path as far as the time allows:

1. ``prepare`` (a child process, on the GPU): the random pipeline is built in place
   (:mod:`benchmarks.common.a14b`: experts directly as W4A4, UMT5-XXL encoder, Wan VAE) and
   written to ``--workdir``: a base model directory in the diffusers layout (text encoder,
   VAE, tokenizer, scheduler, model_index.json, the experts' config.json only: their
   16-bit weights are never read) and a wanquant checkpoint of the two quantized experts.
2. ``run`` (a fresh child process, so its host memory is the user's): the pipeline is
   loaded through ``wanquant.api`` into host memory (``load_base_pipeline(...,
   with_experts=False)`` + ``load_quantized``), then every job sets its policy with
   ``wanquant.api.set_memory_policy`` and generates with ``wanquant.api.generate``: text
   encoding, image encoding, 2 denoising steps (UniPC shift 5: t=999 on the high-noise
   expert, t=833 on the low-noise one: the steps straddle the boundary), VAE decoding.

If ``prepare`` fails or runs out of its time, ``run`` builds the same pipeline in memory
(``"source": "memory"`` in the results; ``--source memory`` asks for it). Jobs are
``MODE:RESOLUTION:CAP_GB[:trace]``: ``,`` runs jobs one after another in one process
(switching policy in place), ``/`` starts a fresh process that loads the pipeline again.
A cap sets ``torch.cuda.set_per_process_memory_fraction`` (and the policy plans for it);
``resident`` jobs plan for ``--resident-budget-gb`` (a 24 GB card) with chunks of 8192
tokens, as ``full_scale`` measured them. Per stage: peak allocated and reserved GPU
memory; per job: host peak RSS (``VmHWM`` reset per job, plus a 20 ms sampler), the time
of every expert forward and step (the warm-up's compiling forward excluded), and the step
time against ``resident`` at the same resolution. The first ``low`` job also times the
expert swap's parts: the copy of a whole expert and the rebuild of its fast-path operands.

The census (:func:`census`), taken before and after the policy is placed, as every stage
starts, after each expert's first forward and after the video: GPU bytes per pipeline part
(parameters and buffers, plus tensors the parts hold otherwise, e.g. fast-path operands),
the allocator's allocated and reserved bytes, and what is allocated but owned by no part;
past 0.25 GB the largest such tensors with what refers to them (gc), and with ``:trace``
(``torch.cuda.memory._record_memory_history``) the Python frames that allocated them.
That is how the first full-scale runs' 29-62 GB were found: the prompt embeddings'
autograd graph holding every streamed text-encoder block.

    python -m benchmarks.memory --out OUT            # one H100, about 6 minutes
    python -m benchmarks.memory --tiny               # CPU dry run at toy sizes (/tmp)
    python -m benchmarks.memory --merge A.json B.json --notes "..." "..." --out OUT

Writes ``OUT/memory.{json,md}`` (copy to benchmarks/results/) and ``OUT/log.txt`` as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from benchmarks.common.meta import REPO_ROOT, run_metadata, write_results

JOBS = "resident:480x832:0,low:480x832:12,low:720x1280:16,resident:720x1280:0"
TINY_JOBS = "low:64x64:0,resident:64x64:0/resident:64x64:0:trace"
# Rough wall time of one job on an H100 (load excluded), to skip what cannot finish in time.
JOB_ESTIMATE_S = {"480x832": 40.0, "720x1280": 80.0}
LOAD_ESTIMATE_S = {"disk": 30.0, "memory": 15.0}  # a process loading (or building) the pipeline
GB = 1e9
TARGETS = {  # (mode, resolution) -> what the issue asks
    ("low", "720x1280", 16): ("peak_reserved_gb", 15.0),
    ("low", "480x832", 12): ("peak_reserved_gb", 11.0),
    ("resident", "480x832", 0): ("peak_alloc_gb", 20.0),
}
STEP_RATIO_TARGET = 1.10
HOST_TARGET_GB = 32.0


def say(msg: str, log: Path | None = None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(line + "\n")


# ---------------------------------------------------------------------------------------
# host memory
RSS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "VmLck", "VmPin")


def proc_status() -> dict[str, int]:
    """This process's memory figures from ``/proc/self/status``, in bytes (empty off Linux):
    ``VmRSS`` = ``RssAnon`` (heap, tensors, pinned buffers) + ``RssFile`` (pages of mapped
    files: shared libraries, weights a loader memory-mapped) + ``RssShmem``; ``VmHWM`` the
    peak since the last reset; ``VmLck``/``VmPin`` locked and pinned pages."""
    out = {}
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, rest = line.partition(":")
        if key in RSS_KEYS:
            out[key] = int(rest.split()[0]) * 1024
    return out


class HostMeter:
    """Peak resident set size of this process since :meth:`reset`: the kernel's ``VmHWM``
    (reset through ``/proc/self/clear_refs``) and a 20 ms sampler as a fallback."""

    def __init__(self):
        self.sampled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _status(key: str) -> int:
        return proc_status().get(key.rstrip(":"), 0)

    def rss(self) -> int:
        return self._status("VmRSS:")

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.sampled = max(self.sampled, self.rss())

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.sampled = self.rss()

    def peak(self) -> int:
        return max(self.sampled, self._status("VmHWM:"), self.rss())


# ---------------------------------------------------------------------------------------
# what is on the GPU: the census
COMPONENTS = ("text_encoder", "transformer", "transformer_2", "vae", "image_encoder")


def _holders(obj, skip: set[int], depth: int = 2) -> str:
    """Who refers to ``obj`` (for an unowned tensor): ``Type.attr``, containers, frames."""
    import gc
    import inspect

    names = []
    for r in gc.get_referrers(obj):
        if id(r) in skip or inspect.isframe(r) and r.f_code.co_name in ("_holders", "unowned_tensors"):
            continue
        if isinstance(r, dict):
            key = next((k for k, v in r.items() if v is obj), "?")
            owner = next((o for o in gc.get_referrers(r) if getattr(o, "__dict__", None) is r), None)
            names.append(f"{type(owner).__name__}.{key}" if owner is not None else f"dict[{key!r}]")
        elif isinstance(r, (list, tuple)) and depth > 1:
            names.append(f"{type(r).__name__}[{len(r)}] <- ({_holders(r, skip | {id(r)}, depth - 1)})")
        elif inspect.isframe(r):
            names.append(f"frame {r.f_code.co_name}")
        else:
            names.append(type(r).__name__)
        if len(names) >= 3:
            break
    return ", ".join(names) or "no Python referrer"


def unowned_tensors(owned: set, device, top: int = 6) -> list[dict]:
    """The largest live tensors on ``device`` whose storage no pipeline component owns (gc scan)."""
    import gc

    import torch

    objs = gc.get_objects()
    cands, keys = [], set()
    for o in objs:
        try:
            if not (isinstance(o, torch.Tensor) and o.device.type == device.type):
                continue
            key = (str(o.device), o.untyped_storage().data_ptr())
        except Exception:  # noqa: BLE001, S112 - tensor subclasses without storage
            continue
        if key not in owned and key not in keys:
            keys.add(key)
            cands.append(o)
    del objs
    cands.sort(key=lambda t: -t.untyped_storage().nbytes())
    skip = {id(cands)}
    return [{"gb": t.untyped_storage().nbytes() / GB, "shape": list(t.shape), "dtype": str(t.dtype),
             "held_by": _holders(t, skip)} for t in cands[:top]]


def traced_blocks(owned: set, top: int = 6) -> list[dict]:
    """With ``torch.cuda.memory._record_memory_history`` on: the largest live allocations no
    component owns, with the Python frames that allocated them (wanquant/diffusers/benchmarks)."""
    import torch

    ptrs = {p for _, p in owned}
    out = []
    for seg in torch.cuda.memory._snapshot().get("segments", []):
        for b in seg.get("blocks", []):
            if b.get("state") != "active_allocated" or b.get("address") in ptrs:
                continue
            frames = [f"{Path(f.get('filename', '?')).name}:{f.get('line')} {f.get('name')}" for f in b.get("frames", [])
                      if any(k in f.get("filename", "") for k in ("wanquant", "diffusers", "benchmarks", "transformers"))]
            out.append({"gb": b.get("size", 0) / GB, "frames": frames[:6]})
    out.sort(key=lambda b: -b["gb"])
    return out[:top]


def census(pipe, device, point: str, trace: bool = False) -> dict:
    """GPU (and host) bytes per pipeline component at ``point``, what the allocator holds
    beyond them, and (past 0.25 GB) the largest tensors nobody owns and who holds them."""
    import torch

    from wanquant.kernels import dispatch
    from wanquant.model import offload
    from wanquant.runtime.memory import device_census, host_census, owned_storages

    comps = {c: getattr(pipe, c, None) for c in COMPONENTS}
    state = offload.memory_state_of(pipe)
    others = {"fp8_scratch": list(getattr(dispatch, "_SCRATCH", {}).values())}
    if state is not None:  # the policy's flat buffers (host copies; device buffers of resident groups)
        groups = [g for seq in [*state.experts.values(), *state.per_forward.values(),
                                *([state.text_encoder] if state.text_encoder else [])] for g in seq.groups]
        groups += [state.vae] if state.vae is not None else []
        others["policy_groups"] = [t for g in groups for t in (g.host, g.device_buffer) if t is not None]
    c = device_census(comps, others)
    dev = str(device) if device.index is not None or device.type != "cuda" else f"cuda:{torch.cuda.current_device()}"
    out = {"point": point, "gpu_gb": {k: round(v["params"].get(dev, 0) / GB + v["held"].get(dev, 0) / GB, 3)
                                      for k, v in c["components"].items()},
           "held_gpu_gb": {k: round(v["held"].get(dev, 0) / GB, 3) for k, v in c["components"].items()
                           if v["held"].get(dev, 0)},
           "host_gb": {k: round((v["params"].get("cpu", 0) + v["held"].get("cpu", 0)) / GB, 3)
                       for k, v in c["components"].items()},
           # host bytes per part by kind (pinned / pageable / in a mapped file) and the process's RSS
           "host_kinds_gb": {k: {kind: round(n / GB, 3) for kind, n in kinds.items() if n}
                             for k, kinds in host_census(comps, others).items()},
           "rss_gb": {k: round(v / GB, 3) for k, v in proc_status().items()}}
    if state is not None:
        res = state.residency()
        out["resident_groups"] = sum(res.values())
        out["groups"] = len(res)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        alloc = torch.cuda.memory_allocated(device)
        owned_gpu = c["total"].get(dev, 0)
        out.update(allocated_gb=alloc / GB, reserved_gb=torch.cuda.memory_reserved(device) / GB,
                   unowned_gb=(alloc - owned_gpu) / GB)
        if alloc - owned_gpu > 0.25 * GB:
            owned = owned_storages(comps) | {(str(t.device), t.untyped_storage().data_ptr())
                                             for ts in others.values() for t in ts}
            out["unowned_top"] = unowned_tensors(owned, device)
            if trace:
                out["traced_top"] = traced_blocks(owned)
    return out


def host_line(c: dict) -> str:
    """The host side of a census: the RSS split and the host bytes of each part by kind."""
    r = c.get("rss_gb", {})
    parts = "; ".join(f"{k} " + " + ".join(f"{n:.2f} {kind}" for kind, n in kinds.items())
                      for k, kinds in c.get("host_kinds_gb", {}).items() if kinds)
    counted = sum(n for kinds in c.get("host_kinds_gb", {}).values() for n in kinds.values())
    return (f"{c['point']}: RSS {r.get('VmRSS', 0):.2f} GB (anon {r.get('RssAnon', 0):.2f}, file "
            f"{r.get('RssFile', 0):.2f}; locked {r.get('VmLck', 0):.2f}; peak since reset {r.get('VmHWM', 0):.2f}); "
            f"tensors of the parts {counted:.2f} GB: {parts or 'none'}")


def census_line(c: dict) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in c["gpu_gb"].items() if v)
    line = (f"{c['point']}: allocated {c.get('allocated_gb', 0):.2f} GB (reserved {c.get('reserved_gb', 0):.2f}); "
            f"GPU by part: {parts or 'nothing'}; not owned {c.get('unowned_gb', 0):.2f}")
    if "groups" in c:
        line += f"; policy groups resident {c['resident_groups']}/{c['groups']}"
    for t in c.get("unowned_top", [])[:3]:
        line += f"; [{t['gb']:.2f} GB {t['dtype']} {t['shape']} held by {t['held_by']}]"
    for t in c.get("traced_top", [])[:3]:
        line += f"; [{t['gb']:.2f} GB from {' < '.join(t['frames'][:3])}]"
    return line


# ---------------------------------------------------------------------------------------
# the random pipeline
def sizes(tiny: bool) -> dict:
    from benchmarks.common import a14b

    if tiny:
        return dict(expert=a14b.TINY_EXPERT, te=a14b.TINY_UMT5, vae=a14b.TINY_VAE, max_len=32)
    return dict(expert=a14b.A14B, te=a14b.UMT5_XXL, vae=a14b.VAE_FULL, max_len=512)


def build_random_pipeline(tiny: bool, device):
    """The whole I2V pipeline with random weights on ``device``, experts W4A4 from the start."""
    import torch
    from diffusers import WanImageToVideoPipeline

    from benchmarks.common import a14b
    from wanquant.method.config import wanquant_preset

    qcfg = wanquant_preset()
    sz = sizes(tiny)
    torch.manual_seed(0)
    experts = [a14b.build_expert(sz["expert"], True, device, qcfg) for _ in range(2)]
    pipe = WanImageToVideoPipeline(tokenizer=a14b.build_tokenizer(sz["max_len"]),
                                   text_encoder=a14b.build_text_encoder(sz["te"], device),
                                   vae=a14b.build_vae(sz["vae"], device), scheduler=a14b.build_scheduler(),
                                   image_processor=None, image_encoder=None, transformer=experts[0],
                                   transformer_2=experts[1], boundary_ratio=a14b.BOUNDARY_RATIO, expand_timesteps=False)
    a14b.bind_experts(pipe, qcfg)
    return pipe, qcfg


def save_checkpoint_of(pipe, qcfg, qdir: Path) -> None:
    """The quantized experts as a wanquant checkpoint (what ``wanquant quantize`` writes)."""
    from wanquant.artifacts.checkpoint import ExpertArtifact, save_checkpoint
    from wanquant.model.wan import experts_of, export_rest
    from wanquant.runtime.expert import quantized_layers

    artifacts = []
    for spec in experts_of(pipe):
        layers = {n: m.to_params().to("cpu") for n, m in quantized_layers(spec.module).items()}
        rest = {k: v.detach().cpu() for k, v in export_rest(spec.module, layers).items()}
        artifacts.append(ExpertArtifact(spec.attr, spec.role, spec.timestep_bins(qcfg).to_dict(),
                                        dict(spec.module.config), layers, rest, "random-weights",
                                        calibration={"note": "random weights (benchmarks.memory)"}))
    save_checkpoint(qdir, artifacts, qcfg.to_dict(), overwrite=True)


def save_base_model(pipe, model_dir: Path) -> None:
    """Text encoder, VAE, tokenizer, scheduler in the diffusers layout; the experts as configs only."""
    from diffusers import WanImageToVideoPipeline

    base = WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                   scheduler=pipe.scheduler, image_processor=None, image_encoder=None,
                                   transformer=None, transformer_2=None, boundary_ratio=pipe.config.boundary_ratio,
                                   expand_timesteps=False)
    base.save_pretrained(str(model_dir))
    index_file = model_dir / "model_index.json"
    index = json.loads(index_file.read_text())
    for attr in ("transformer", "transformer_2"):
        index[attr] = ["diffusers", "WanTransformer3DModel"]
        getattr(pipe, attr).save_config(str(model_dir / attr))
    index_file.write_text(json.dumps(index, indent=2))


def phase_prepare(args) -> int:
    import torch

    device = torch.device("cpu" if args.tiny else "cuda")
    work = Path(args.workdir)
    log = Path(args.out) / "log.txt"
    facts: dict = {}
    t0 = time.perf_counter()
    pipe, qcfg = build_random_pipeline(args.tiny, device)
    facts["build_s"] = time.perf_counter() - t0
    say(f"prepare: built the random pipeline on {device} in {facts['build_s']:.1f} s", log)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    save_checkpoint_of(pipe, qcfg, work / "quantized")
    facts["checkpoint_s"] = time.perf_counter() - t0
    facts["checkpoint_gb"] = _dir_bytes(work / "quantized") / GB
    say(f"prepare: checkpoint {facts['checkpoint_gb']:.2f} GB in {facts['checkpoint_s']:.1f} s", log)
    t0 = time.perf_counter()
    save_base_model(pipe, work / "model")
    facts["base_model_s"] = time.perf_counter() - t0
    facts["base_model_gb"] = _dir_bytes(work / "model") / GB
    say(f"prepare: base model {facts['base_model_gb']:.2f} GB in {facts['base_model_s']:.1f} s", log)
    (Path(args.out) / "prepare.json").write_text(json.dumps(facts, indent=1))
    return 0


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------
# the run
def parse_jobs(text: str) -> list[tuple[str, str, float, bool]]:
    """``MODE:RESOLUTION:CAP_GB[:trace]`` items, comma-separated (one process: see :func:`job_groups`)."""
    jobs = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[0] not in ("auto", "resident", "low") or parts[3:] not in ([], ["trace"]):
            raise SystemExit(f"job {item}: write MODE:HxW:CAP_GB[:trace] with MODE auto, resident or low")
        jobs.append((parts[0], parts[1], float(parts[2]), parts[3:] == ["trace"]))
    return jobs


def job_groups(text: str) -> list[str]:
    """Jobs split into processes at ``/``: each group loads the pipeline afresh (the user's
    situation: one policy per process); jobs of one group switch policy in place."""
    groups = [g for g in text.split("/") if g.strip()]
    for g in groups:
        parse_jobs(g)
    return groups


class CensusMeter:
    """:class:`benchmarks.common.meters.Meter` that takes a census as each stage starts
    (before the stage's clock and peak reset: the census costs neither)."""

    def __new__(cls, device, look):
        from benchmarks.common.meters import Meter

        class _Meter(Meter):
            def enter(self, stage):
                if stage is not None and stage != self.current and stage != "start":
                    look(f"{stage} starts")
                super().enter(stage)

        return _Meter(device)


def _after_first_forward(module, fn):
    """Call ``fn()`` once, after ``module``'s next forward; returns the undo."""
    handle = None

    def hook(mod, args, output):
        handle.remove()
        fn()

    handle = module.register_forward_hook(hook)
    return handle.remove


class Runner:
    def __init__(self, args):
        import torch

        self.args = args
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.out = Path(args.out)
        self.log = self.out / "log.txt"
        self.host = HostMeter()
        self.pipe = None
        self.source = {}
        self.warmed: set[str] = set()  # resolutions compiled for
        self.swap = None

    def say(self, msg: str) -> None:
        say(msg, self.log)

    def load(self) -> dict:
        """The pipeline into host memory: from disk through the API, or built in memory."""
        import wanquant.api as wq

        work = Path(self.args.workdir)
        self.host.reset()
        t0 = time.perf_counter()
        if self.args.source == "disk":
            self.pipe = wq.load_base_pipeline(work / "model", device="cpu", with_experts=False)
            te_s = time.perf_counter() - t0
            wq.load_quantized(self.pipe, work / "quantized", device="cpu", verify=self.args.verify)
            info = {"source": "disk", "base_model_s": te_s, "checkpoint_s": time.perf_counter() - t0 - te_s,
                    "verify": self.args.verify}
        else:
            self.pipe, _ = build_random_pipeline(self.tiny, self.device)
            info = {"source": "memory", "note": "built in place on the GPU, never on disk"}
        self.pipe.set_progress_bar_config(disable=True)
        info.update(load_s=time.perf_counter() - t0, host_peak_gb=self.host.peak() / GB,
                    host_after_gb=self.host.rss() / GB,
                    rss_after_gb={k: round(v / GB, 3) for k, v in proc_status().items()})
        self.say(f"loaded ({info['source']}) in {info['load_s']:.1f} s, host peak {info['host_peak_gb']:.2f} GB")
        return info

    def settings(self, res: str):
        from benchmarks.common.a14b import NEGATIVE
        from wanquant.model.pipeline import GenerationSettings

        h, w = (int(v) for v in res.split("x"))
        return GenerationSettings(height=h, width=w, num_frames=self.args.frames, num_inference_steps=self.args.steps,
                                  guidance_scale=5.0, negative_prompt=NEGATIVE,
                                  max_sequence_length=sizes(self.tiny)["max_len"])

    def cap(self, cap_gb: float) -> None:
        import torch

        if self.device.type != "cuda":
            return
        torch.cuda.empty_cache()
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * GB / total) if cap_gb else 1.0, index)

    def run_job(self, mode: str, res: str, cap_gb: float, trace: bool = False) -> dict:
        import torch

        import wanquant.api as wq
        from benchmarks.common.a14b import PROMPT
        from benchmarks.common.inputs import random_image
        from benchmarks.common.meters import ForwardTimer, free, wrap_method

        row = {"mode": mode, "resolution": res, "cap_gb": cap_gb or None, "frames": self.args.frames,
               "steps": self.args.steps, "source": self.source.get("source"), "process": self.args.process,
               "census": []}
        settings = self.settings(res)
        pipe = self.pipe
        look = lambda point: row["census"].append(self.census(point, trace))
        meter = CensusMeter(self.device, look)
        timer = ForwardTimer(meter)
        undo = []
        try:
            free()
            self.cap(cap_gb)
            if trace and self.device.type == "cuda":
                torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=200_000)
            look("before the policy")
            # The timer's hooks first: a forward's time then includes the policy's moves.
            for attr, role in (("transformer", "high"), ("transformer_2", "low")):
                timer.attach(getattr(pipe, attr), role)
            t0 = time.perf_counter()
            self.host.reset()
            resident = mode == "resident"
            budget = self.args.resident_budget_gb if resident and not cap_gb else None
            if cap_gb and not hasattr(torch.cuda, "get_per_process_memory_fraction"):
                budget = cap_gb - 1.0  # this torch cannot tell the policy about the cap: say it
            plan = wq.set_memory_policy(pipe, mode, self.device, settings, budget_gb=budget,
                                        chunk_tokens=8192 if resident and not self.tiny else None)
            row["placement_s"] = time.perf_counter() - t0
            row["host_peak_placing_gb"] = self.host.peak() / GB  # pinning the groups (from the last job's state)
            row["plan"] = plan.describe()
            row["plan_detail"] = {k: plan.to_dict()[k] for k in ("policy", "text_encoder", "chunk_tokens", "fits",
                                                                 "kv_cache", "need_bytes", "budget_bytes",
                                                                 "kept_blocks")}
            self.say(row["plan"])
            look("policy placed")
            if res not in self.warmed and (not self.warmed or not self.args.warm_once):
                row["warmup_s"] = self.warmup(settings)
                look("after the warm-up")
            timer.records.clear()  # the warm-up's forward (compiling) is not a step
            free()
            self.host.reset()
            undo = [wrap_method(pipe, "encode_prompt", lambda: meter.enter("text_encoding")),
                    wrap_method(pipe.vae, "encode", lambda: meter.enter("image_encoding")),
                    wrap_method(pipe.vae, "decode", lambda: meter.enter("decoding"))]
            for attr in ("transformer", "transformer_2"):  # after each expert's first forward
                undo.append(_after_first_forward(getattr(pipe, attr), lambda a=attr: look(f"after {a}'s 1st forward")))
            meter.enter("start")
            frames = wq.generate(pipe, random_image(settings.height, settings.width), PROMPT, settings, seed=0)
            meter.stop()
            look("after the video")
            row["video_shape"] = list(frames.shape)
            row["host_peak_gb"] = self.host.peak() / GB
            st = meter.stages
            st.pop("start", None)
            row["stage_peak_alloc_gb"] = {k: v["peak_allocated"] / GB for k, v in st.items()}
            row["stage_peak_reserved_gb"] = {k: v["peak_reserved"] / GB for k, v in st.items()}
            row["stage_resident_at_start_gb"] = {k: v["resident_at_start"] / GB for k, v in st.items()}
            row["stage_s"] = {k: v["seconds"] for k, v in st.items()}
            row["peak_alloc_gb"] = max(row["stage_peak_alloc_gb"].values())
            row["peak_reserved_gb"] = max(row["stage_peak_reserved_gb"].values())
            steps = timer.steps()
            row["per_step"] = steps
            row["forward_s"] = timer.records
            row["step_s"] = sum(s["seconds"] for s in steps) / max(1, len(steps))
            row["swap_overhead_s"] = self.first_forward_overheads(timer.records)
            if mode == "low" and self.swap is None:
                self.swap = row["swap_parts"] = self.measure_swap()
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory in stage {meter.current}: {str(e).splitlines()[0]}"
            row["stage_peak_alloc_gb"] = {k: v["peak_allocated"] / GB for k, v in meter.stages.items()}
            del e
            look("after the out-of-memory error")
        except Exception as e:  # noqa: BLE001 - keep the other jobs
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()
        finally:
            for u in undo:
                u()
            timer.detach()
            if trace and self.device.type == "cuda":
                torch.cuda.memory._record_memory_history(enabled=None)
        return row

    def census(self, point: str, trace: bool) -> dict:
        c = census(self.pipe, self.device, point, trace)
        self.say("  census " + census_line(c))
        self.say("  host   " + host_line(c))
        return c

    def warmup(self, settings) -> float:
        """One forward of the high-noise expert at the job's shape (Triton compiles here), then
        every expert evicted again: the timed run starts as a first video does."""
        import torch

        from wanquant.model import offload
        from wanquant.model.pipeline import encode_prompts

        pipe = self.pipe
        t0 = time.perf_counter()
        pos, _ = encode_prompts(pipe, "warm up", "", settings, self.device)
        pos = pos.to(pipe.transformer.dtype)  # diffusers' dtype: not that of the fp32-kept modules
        f = (settings.num_frames - 1) // 4 + 1
        x = torch.randn(1, pipe.transformer.config.in_channels, f, settings.height // 8, settings.width // 8,
                        device=self.device, dtype=torch.bfloat16)
        with torch.inference_mode():
            pipe.transformer(hidden_states=x, timestep=torch.tensor([999.0], device=self.device),
                             encoder_hidden_states=pos, return_dict=False)
        state = offload.memory_state_of(pipe)
        for attr in state.experts:
            state.evict_expert(attr)
        from wanquant.runtime.memory import release_static_caches

        release_static_caches(pipe.transformer)
        self.warmed.add(f"{settings.height}x{settings.width}")
        _sync(self.device)
        return time.perf_counter() - t0

    @staticmethod
    def first_forward_overheads(records: list[dict]) -> dict:
        """Per expert: its first forward minus its last (the first one moved it in)."""
        out = {}
        for role in ("high", "low"):
            fw = [r["seconds"] for r in records if r["expert"] == role]
            if len(fw) >= 2:
                out[role] = fw[0] - fw[-1]
        return out

    def measure_swap(self) -> dict:
        """The parts of moving the high-noise expert in, timed alone (after the run, expert out):
        the copy of all its groups, the rebuild of its fast-path operands, and what moving
        those operands instead would copy."""
        from wanquant.model import offload
        from wanquant.runtime.expert import quantized_layers

        state = offload.memory_state_of(self.pipe)
        seq = state.experts["transformer"]
        _sync(self.device)
        t0 = time.perf_counter()
        seq.start(len(seq.groups))
        for g in seq.groups:
            g.wait()
        _sync(self.device)
        copy_s = time.perf_counter() - t0
        layers = list(quantized_layers(self.pipe.transformer).values())
        t0 = time.perf_counter()
        for layer in layers:
            layer._resolve_backend(self.device)
        _sync(self.device)
        rebuild_s = time.perf_counter() - t0
        extra = 0
        for layer in layers:
            fast = layer._fast
            if fast is not None:
                own = {t.data_ptr() for t in layer.buffers()}
                extra += sum(t.numel() * t.element_size() for t in vars(fast).values()
                             if hasattr(t, "data_ptr") and hasattr(t, "numel") and t.data_ptr() not in own)
        state.evict_expert("transformer")
        gbps = seq.nbytes / GB / copy_s if copy_s > 0 else None
        return {"expert_gb": seq.nbytes / GB, "copy_s": copy_s, "copy_gb_per_s": gbps, "rebuild_s": rebuild_s,
                "fast_extra_gb": extra / GB, "move_extra_copy_s": extra / GB / gbps if gbps else None,
                "backend": layers[0].backend_reason if layers else None}

    def run(self, jobs, deadline: float) -> None:
        payload_file = self.out / f"rows-{self.args.process}.json"
        rows = []
        for i, (mode, res, cap, trace) in enumerate(jobs):
            left = deadline - time.time()
            warm = res not in self.warmed and (not self.warmed or not self.args.warm_once)
            need = 5.0 if self.tiny else JOB_ESTIMATE_S.get(res, 60.0) + (15.0 if warm else 0.0)
            need += 0.0 if self.pipe is not None or self.tiny else LOAD_ESTIMATE_S[self.args.source]
            if left < need:
                self.say(f"--- {mode} {res} cap {cap:g}: skipped ({left:.0f} s left, needs ~{need:.0f})")
                rows.append({"mode": mode, "resolution": res, "cap_gb": cap or None, "process": self.args.process,
                             "error": "not run: the device call's time budget ran out"})
                payload_file.write_text(json.dumps({"load": self.source, "rows": rows}, indent=1, default=str))
                continue
            if self.pipe is None:
                self.source = self.load()
            self.say(f"--- {mode} {res} cap {cap:g} GB{' (allocations traced)' if trace else ''}")
            t0 = time.perf_counter()
            row = self.run_job(mode, res, cap, trace)
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            self.say(summary(row))
            payload_file.write_text(json.dumps({"load": self.source, "rows": rows}, indent=1, default=str))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def phase_run(args) -> int:
    import torch

    if args.tiny:
        torch.set_num_threads(2)
    Runner(args).run(parse_jobs(args.jobs), args.deadline)
    return 0


# ---------------------------------------------------------------------------------------
# reporting
def summary(r: dict) -> str:
    if "error" in r:
        return f"{r['mode']} {r['resolution']}: ERROR {r['error']}\n{r.get('traceback', '')}"
    return (f"{r['mode']} {r['resolution']} cap {r['cap_gb']}: peak alloc {r['peak_alloc_gb']:.2f} GB, reserved "
            f"{r['peak_reserved_gb']:.2f} GB, host {r['host_peak_gb']:.2f} GB, step {r['step_s']:.2f} s, "
            f"stages {({k: round(v, 2) for k, v in r['stage_peak_reserved_gb'].items()})}")


def fill_resident_ratio(rows: list[dict]) -> None:
    """``step_s_resident``: the resident step at the same resolution in the same device run."""
    def run_of(r):
        return (r.get("run") or {}).get("date")

    resident = {(run_of(r), r["resolution"]): r["step_s"] for r in rows if r["mode"] == "resident" and "step_s" in r}
    for r in rows:
        r["step_s_resident"] = resident.get((run_of(r), r["resolution"]))


def _fmt(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def targets(rows: list[dict], load: dict) -> list[str]:
    out = []
    for r in rows:
        key = (r["mode"], r["resolution"], int(r.get("cap_gb") or 0))
        if key in TARGETS and "error" not in r:
            field, limit = TARGETS[key]
            v = r[field]
            out.append(f"{r['mode']} {r['resolution']} cap {key[2] or 'none'}: {field} {v:.2f} GB <= {limit:.1f} -> "
                       f"{'met' if v <= limit else 'MISSED'}")
    for r in rows:
        if r["mode"] == "low" and r.get("step_s") and r.get("step_s_resident"):
            ratio = r["step_s"] / r["step_s_resident"]
            out.append(f"low / resident step time at {r['resolution']}: {ratio:.3f}x ({r['step_s']:.2f} vs "
                       f"{r['step_s_resident']:.2f} s) <= {STEP_RATIO_TARGET:.2f}x -> "
                       f"{'met' if ratio <= STEP_RATIO_TARGET else 'MISSED'}")
    hosts = [r["host_peak_gb"] for r in rows if "host_peak_gb" in r]
    if hosts:
        out.append(f"host peak RSS while generating: {max(hosts):.2f} GB <= {HOST_TARGET_GB:.0f} -> "
                   f"{'met' if max(hosts) <= HOST_TARGET_GB else 'MISSED'}")
    placing = [(r["host_peak_placing_gb"], r["mode"], r["resolution"]) for r in rows if "host_peak_placing_gb" in r]
    if placing:
        out.append("host peak RSS while placing each policy (after the job before): "
                   + ", ".join(f"{m} {res} {v:.2f} GB" for v, m, res in placing))
    if load.get("host_peak_gb") is not None:
        out.append(f"host peak RSS while loading ({load.get('source')}): {load['host_peak_gb']:.2f} GB")
    return out


def markdown(payload: dict) -> str:
    rows, load = payload["rows"], payload.get("load", {})
    lines = ["GB = 1e9 bytes. Random weights (values change neither memory nor time). "
             f"{payload.get('frames', 81)} frames, 2 steps (t=999 high-noise expert, t=833 low-noise expert), CFG "
             "(2 forwards per step). Peaks are `max_memory_allocated` / `max_memory_reserved`, reset per stage; "
             "step time = mean CUDA-synchronised cond+uncond pair, the swap included.", "",
             "| mode | resolution | cap GB | peak alloc | peak reserved | text enc | image enc | denoising | decoding "
             "(reserved) | host peak | step (s) | step resident (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['resolution']} | {r.get('cap_gb') or '-'} | **{r['error'][:90]}** "
                         "| | | | | | | | |")
            continue
        sr = r["stage_peak_reserved_gb"]
        lines.append(f"| {r['mode']} | {r['resolution']} | {r.get('cap_gb') or '-'} | {_fmt(r['peak_alloc_gb'])} | "
                     f"{_fmt(r['peak_reserved_gb'])} | {_fmt(sr.get('text_encoding'))} | "
                     f"{_fmt(sr.get('image_encoding'))} | {_fmt(sr.get('denoising'))} | {_fmt(sr.get('decoding'))} | "
                     f"{_fmt(r['host_peak_gb'])} | {_fmt(r['step_s'])} | {_fmt(r.get('step_s_resident'))} |")
    runs = list({json.dumps(r["run"], sort_keys=True): r["run"] for r in rows if r.get("run")}.values())
    if runs:
        lines += ["", "## Runs", ""] + [f"- {r['device']}, {r['date']}, commit {r['commit']}, source {r.get('source')}: "
                                        f"{r.get('note') or '-'}" for r in runs]
    lines += ["", "## Targets", ""] + [f"- {t}" for t in targets(rows, load)]
    lines += ["", "## Loading", "", f"- {json.dumps(load, default=str)}"]
    if payload.get("prepare"):
        lines.append(f"- prepare (build + write to disk): {json.dumps(payload['prepare'])}")
    swap = next((r["swap_parts"] for r in rows if r.get("swap_parts")), None)
    if swap:
        lines += ["", "## The expert swap, part by part (high-noise expert, alone)", "",
                  f"- copy of the whole expert ({swap['expert_gb']:.2f} GB, pinned host -> GPU): "
                  f"{swap['copy_s']:.3f} s ({_fmt(swap['copy_gb_per_s'], 1)} GB/s)",
                  f"- rebuilding its fast-path operands (transient, what `low` does): {swap['rebuild_s']:.3f} s",
                  f"- moving them instead: {swap['fast_extra_gb']:.2f} GB more pinned host memory and copy "
                  f"({_fmt(swap['move_extra_copy_s'], 3)} s at the same rate)"]
    lines += ["", "## Per job", ""]
    for r in rows:
        if "plan" not in r:
            continue
        run = r.get("run")
        where = f"process {r.get('process', 0)}" + (f", {run['device']}, {run['date']}, {run['commit']}, "
                                                   f"source {run.get('source')}{'; ' + run['note'] if run.get('note') else ''}"
                                                   if run else "")
        lines.append(f"- **{r['mode']} {r['resolution']}** ({where}): {r['plan']}; "
                     f"first-forward overhead (moves in, operands rebuilt) "
                     f"{({k: round(v, 3) for k, v in r.get('swap_overhead_s', {}).items()})} s; "
                     f"stage peaks allocated {({k: round(v, 2) for k, v in r.get('stage_peak_alloc_gb', {}).items()})}")
    lines += ["", "## Census: GB on the GPU per pipeline part, and allocated memory no part owns", ""]
    for r in rows:
        for c in r.get("census", []):
            lines.append(f"- {r['mode']} {r['resolution']} (process {r.get('process', 0)}) {census_line(c)}")
    lines += ["", "## Host census: the process's RSS and the parts' host tensors (GB; `file`: inside a "
              "memory-mapped file, resident only where read; pinned: page-locked)", ""]
    for r in rows:
        for c in r.get("census", []):
            if "rss_gb" in c:
                lines.append(f"- {r['mode']} {r['resolution']} (process {r.get('process', 0)}) {host_line(c)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
def _child(args, phase: str, timeout: float, extra: list[str]) -> int | None:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--phase", phase, "--out", args.out, "--workdir", args.workdir,
           "--frames", str(args.frames), "--steps", str(args.steps), *extra] + (["--tiny"] if args.tiny else [])
    env = dict(os.environ)
    if not args.no_expandable:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env, timeout=max(1.0, timeout)).returncode
    except subprocess.TimeoutExpired:
        return None


def orchestrate(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    start = time.time()
    meta = run_metadata()
    if args.commit:
        meta["commit"] = args.commit
    for stale in ("prepare.json",):
        (out / stale).unlink(missing_ok=True)
    source = args.source
    prepare = None
    if source == "disk":
        say(f"prepare: writing the random model to {args.workdir} (at most {args.prepare_s:.0f} s)", log)
        rc = _child(args, "prepare", args.prepare_s, [])
        if rc == 0:
            prepare = json.loads((out / "prepare.json").read_text())
        else:
            say(f"prepare {'timed out' if rc is None else f'failed (exit {rc})'}: building in memory instead", log)
            source = "memory"
            prepare = {"error": "timed out" if rc is None else f"exit {rc}"}
    deadline = start + args.budget_s
    loads, rows = [], []
    for i, group in enumerate(job_groups(args.jobs)):
        (out / f"rows-{i}.json").unlink(missing_ok=True)
        say(f"process {i}: {group}", log)
        rc = _child(args, "run", deadline - time.time() + 10.0,
                    ["--jobs", group, "--source", source, "--deadline", str(deadline), "--process", str(i),
                     *(["--warm-once"] if args.warm_once else []),
                     "--resident-budget-gb", str(args.resident_budget_gb)] + (["--verify"] if args.verify else []))
        if rc != 0:
            say(f"run {'timed out' if rc is None else f'exit {rc}'}: reporting the jobs that finished", log)
        f = out / f"rows-{i}.json"
        got = json.loads(f.read_text()) if f.exists() else {"load": {}, "rows": []}
        loads.append(dict(got["load"], process=i))
        done = {(r["mode"], r["resolution"]) for r in got["rows"]}
        rows += got["rows"] + [{"mode": m, "resolution": r, "cap_gb": c or None, "process": i,
                                "error": "not run: the process ended first" if rc == 0 else f"process exit {rc}"}
                               for m, r, c, _ in parse_jobs(group) if (m, r) not in done]
    got = {"load": max(loads, key=lambda d: d.get("host_peak_gb") or 0) if loads else {}, "rows": rows}
    fill_resident_ratio(got["rows"])
    env = {"PYTORCH_CUDA_ALLOC_CONF": "" if args.no_expandable else
           os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    payload = dict(meta, environment=env, frames=args.frames, prepare=prepare, load=got["load"], loads=loads,
                   rows=got["rows"])
    jpath, mpath = write_results("memory", payload, markdown(payload), results_dir=out)
    say(f"wrote {jpath} and {mpath}", log)
    if not args.keep_workdir:
        shutil.rmtree(args.workdir, ignore_errors=True)
    print(markdown(payload))
    return 0


def merge(args) -> int:
    """Rows of several result files (device calls of one session) in one file: each row keeps
    its run's device, date, commit and command; the newest run's load and prepare figures."""
    runs = [json.loads(Path(f).read_text()) for f in args.merge]
    notes = (args.notes or []) + [""] * len(runs)
    rows = []
    for run, note in zip(runs, notes):
        meta = {k: run.get(k) for k in ("device", "date", "commit", "command")}
        meta.update(note=note, source=(run.get("load") or {}).get("source"),
                    load_host_peak_gb=(run.get("load") or {}).get("host_peak_gb"))
        rows += [dict(r, run=r.get("run", meta)) for r in run["rows"]]
    last = runs[-1]
    devices = sorted({r["run"]["device"] for r in rows})
    payload = dict(last, device=" + ".join(devices), date=last["date"],
                   commit=" / ".join(dict.fromkeys(r["run"]["commit"] for r in rows)),
                   command=" ; ".join(dict.fromkeys(r["run"]["command"] for r in rows)), rows=rows)
    fill_resident_ratio(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = write_results("memory", payload, markdown(payload), results_dir=out)
    print(f"wrote {jpath} and {mpath}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (dry run)")
    p.add_argument("--out", default=None, help="results folder (default /tmp/memory_tiny with --tiny)")
    p.add_argument("--jobs", default=None,
                   help=f"MODE:HxW:CAP_GB[:trace] jobs, run in order: ',' within one process, '/' starts a fresh "
                        f"process that loads the pipeline again (default {JOBS})")
    p.add_argument("--source", default="disk", choices=("disk", "memory"),
                   help="disk: write the random model and checkpoint, load them through wanquant.api (default)")
    p.add_argument("--workdir", default=None, help="where the model and checkpoint are written (deleted after)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--verify", action="store_true", help="check the checkpoint's sha256 on load (the API default)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=2, help="2 with shift 5: t=999 (high expert), 833 (low expert)")
    p.add_argument("--resident-budget-gb", type=float, default=24.0,
                   help="the budget resident jobs without a cap plan for (a 24 GB card)")
    p.add_argument("--budget-s", type=float, default=430.0,
                   help="wall time for everything (one device call allows 480 s)")
    p.add_argument("--prepare-s", type=float, default=170.0, help="at most this long writing the model to disk")
    p.add_argument("--no-expandable", action="store_true", help="do not set expandable_segments in the allocator")
    p.add_argument("--warm-once", action="store_true",
                   help="warm up (compile) at the first job's resolution only: later resolutions' first forward "
                        "then includes any compiling (saves a forward per resolution in a short device call)")
    p.add_argument("--commit", default=None, help="git commit to record (a device copy may have no .git)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge the rows of these memory.json files (one per device call) into OUT/memory.json")
    p.add_argument("--notes", nargs="+", default=None, metavar="TEXT", help="with --merge: a note per file")
    p.add_argument("--phase", default=None, choices=("prepare", "run"), help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--process", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out or ("/tmp/memory_tiny" if args.tiny else str(REPO_ROOT / "benchmarks" / "results" / "raw"))
    args.workdir = args.workdir or ("/tmp/wanquant_memory_tiny" if args.tiny else "/tmp/wanquant_memory_bench")
    args.jobs = args.jobs or (TINY_JOBS if args.tiny else JOBS)
    if args.tiny:
        args.frames = 9 if args.frames == 81 else args.frames
    if args.merge:
        return merge(args)
    if args.phase == "prepare":
        return phase_prepare(args)
    if args.phase == "run":
        args.deadline = args.deadline or time.time() + args.budget_s
        return phase_run(args)
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: use --tiny for a CPU dry run", file=sys.stderr)
            return 2
    return orchestrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
