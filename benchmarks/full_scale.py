"""Full-scale memory and speed of Wan2.2-I2V-A14B: stock BF16 vs W4A4 vs unpack-to-BF16.

Builds the real A14B configuration of the whole ``WanImageToVideoPipeline`` with RANDOM
weights directly on the GPU (:mod:`benchmarks.common.a14b`: two experts, UMT5-XXL
encoder, Wan VAE, UniPC flow-matching scheduler with shift 5), then runs the real
diffusers pipeline end to end: text encoding, image (condition) encoding, denoising
with classifier-free guidance (two forwards per step), tiled VAE decoding.

Random values change neither memory nor kernel time (DESIGN.md section 7); every result
row says so. Quantized layers are created directly as ``W4A4Linear``, so no BF16 copy
of a quantized expert ever exists.

Memory policy, the same for every mode (except ``bf16_all_gpu``):
* the text encoder is built on the GPU, encodes the prompt and the negative prompt, and
  is freed before the experts are put on the GPU (a serving process would keep it on the
  CPU); the row also gives the text-encoding peak as it would be with the experts already
  resident (measured encoder peak + measured expert bytes: allocations add exactly);
* both experts stay resident on the GPU from then on; VAE tiled encoding and decoding;
* ``wanquant.model.block`` token chunking (whole block) for ``w4a4`` and
  ``unpack_bf16``; ``bf16`` is stock diffusers (no chunking) since that is the baseline
  of the targets; ``--breakdown`` measures one forward of BF16 with chunking and of W4A4
  without it, so both comparisons are available;
* W4A4's per-context cross-attention K/V cache off (``--kv-cache`` turns it on).
``bf16_all_gpu``: stock diffusers with everything on the GPU (text encoder kept, no VAE
tiling, no chunking): the pipeline as ``pipe.to("cuda")`` runs it. ``w4a4_lean`` is an
experiment, not a runtime mode: ``w4a4`` with each layer's own L1/L2 dropped after the
fast path repacked them (the memory of a fast path that does not duplicate them).

Stages (peak stats reset between them): text_encoding, image_encoding (the pipeline's
VAE encode of the 81-frame condition video), denoising, decoding (VAE decode + the
pipeline's post-processing). Per-step latency: CUDA-synchronised wall time of the
cond + uncond forward pair of each step, with the expert that ran it. Before the timed
run, the high-noise expert runs one warm-up forward at the real shape (Triton compiles,
cuBLAS heuristics) and every W4A4 layer prepares its kernel operands.

    python -m benchmarks.full_scale --tiny                         # CPU dry run
    python -m benchmarks.full_scale --resolutions 480x832 --out OUT --breakdown
    python -m benchmarks.full_scale --merge OUT1/rows.json OUT2/rows.json   # tables
    (results/full_scale.json records the exact command of every device run)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from benchmarks.common.a14b import (A14B, BOUNDARY_RATIO, FLOW_SHIFT, HIGH, LOW, NEGATIVE, PROMPT, TINY_EXPERT,
                                    TINY_UMT5, TINY_VAE, UMT5_XXL, VAE_FULL, build_expert, build_scheduler,
                                    build_text_encoder, build_tokenizer, build_vae)
from benchmarks.common.inputs import random_image
from benchmarks.common.meta import REPO_ROOT, RESULTS_DIR, run_metadata, write_results
from benchmarks.common.meters import GB, ForwardTimer, Meter, free, profile_forward, wrap_method

MODES = ("bf16", "bf16_all_gpu", "w4a4", "w4a4_lean", "unpack_bf16")
QUANT_MODES = ("w4a4", "w4a4_lean", "unpack_bf16")
LEAN_NOTE = ("experiment, not a supported runtime mode: w4a4 with each layer's canonical L1/L2 buffers dropped "
             "after the fast path repacked them (state_dict and .to() would break), i.e. the memory of a fast path "
             "that owns the low-rank operands instead of holding a second copy")


# ---------------------------------------------------------------------------------------
# one run
class Bench:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.expert_cfg = TINY_EXPERT if args.tiny else A14B
        self.te_cfg = TINY_UMT5 if args.tiny else UMT5_XXL
        self.vae_cfg = TINY_VAE if args.tiny else VAE_FULL
        from wanquant.method.config import wanquant_preset

        self.qcfg = wanquant_preset()
        self.max_seq = 32 if args.tiny else 512
        self.tokenizer = build_tokenizer(self.max_seq)
        self.vae = build_vae(self.vae_cfg, self.device)
        self.experts: dict[str, nn.Module] = {}
        self.experts_kind: str | None = None
        self.log = args.log
        self._gemm_env = os.environ.get("WANQUANT_GEMM")

    def say(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self.log:
            with open(self.log, "a") as f:
                f.write(line + "\n")

    # -- components ------------------------------------------------------------------
    def set_experts(self, kind: str) -> dict:
        """Build (or reuse) both experts of ``kind`` ('bf16' or 'quant'); returns build facts."""
        if self.experts_kind == kind:
            return {"reused": True}
        self.experts = {}
        self.experts_kind = None
        free()
        t0 = time.perf_counter()
        for role in (HIGH, LOW):
            self.experts[role] = build_expert(self.expert_cfg, kind == "quant", self.device, self.qcfg)
        self.experts_kind = kind
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {"reused": False, "build_s": time.perf_counter() - t0}

    def pipeline(self, text_encoder=None):
        from diffusers import WanImageToVideoPipeline

        return WanImageToVideoPipeline(tokenizer=self.tokenizer, text_encoder=text_encoder, vae=self.vae,
                                       scheduler=build_scheduler(), image_processor=None, image_encoder=None,
                                       transformer=self.experts.get(HIGH), transformer_2=self.experts.get(LOW),
                                       boundary_ratio=BOUNDARY_RATIO, expand_timesteps=False)

    def latent_shape(self, height: int, width: int, frames: int) -> tuple[int, ...]:
        f = (frames - 1) // 4 + 1
        return (1, self.expert_cfg["in_channels"], f, height // 8, width // 8)

    def tokens(self, height: int, width: int, frames: int) -> int:
        _, _, f, h, w = self.latent_shape(height, width, frames)
        return f * (h // 2) * (w // 2)

    # -- policies ----------------------------------------------------------------------
    def configure(self, mode: str) -> dict:
        from wanquant.model import block
        from wanquant.model.wan import bind_expert, set_static_kv_cache
        from wanquant.runtime.expert import set_backend

        a = self.args
        policy = {"text_encoder": "built on the GPU, freed after encoding, before the experts are built",
                  "experts": "both resident on the GPU", "vae": "fp32, tiled encode and decode",
                  "token_chunking": None, "kv_cache": None}
        if mode == "bf16_all_gpu":
            policy.update(text_encoder="resident on the GPU throughout (pipeline encodes the prompt)",
                          vae="fp32, no tiling")
        chunk = mode in QUANT_MODES and a.chunk_tokens > 0
        for role, model in self.experts.items():
            if chunk:
                block.enable_token_chunking(model, a.chunk_tokens, scope=a.chunk_scope)
            else:
                block.disable_token_chunking(model)
        if chunk:
            policy["token_chunking"] = f"{a.chunk_scope} scope, {a.chunk_tokens} tokens"
        if mode in QUANT_MODES:
            pipe = self.pipeline()
            from wanquant.model.wan import experts_of

            for spec in experts_of(pipe):
                model = self.experts[spec.role]
                bind_expert(model, spec.timestep_bins(self.qcfg))
                set_backend(model, "unpack_bf16" if mode == "unpack_bf16" else "auto")
                set_static_kv_cache(model, a.kv_cache)
                # Prepare every layer's kernel operands now, not inside a timed step.
                for layer in _quant_layers(model):
                    layer._resolve_backend(self.device)
                    if mode == "w4a4_lean" and layer._fast is not None:
                        for name in ("l1", "l2"):
                            old = getattr(layer, name)
                            layer._buffers[name] = old.new_empty((0,) + tuple(old.shape[1:]) if name == "l1"
                                                                 else (old.shape[0], 0))
            if mode == "w4a4_lean":
                policy["experiment"] = LEAN_NOTE
            policy["kv_cache"] = "on (per context, idle expert released)" if a.kv_cache else "off"
        if mode == "bf16_all_gpu":
            self.vae.disable_tiling()
        elif self.tiny:
            self.vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                                   tile_sample_stride_height=16, tile_sample_stride_width=16)
        else:
            self.vae.enable_tiling()
        return policy

    # -- the run -----------------------------------------------------------------------
    def run(self, mode: str, height: int, width: int) -> dict:
        a = self.args
        res = f"{height}x{width}"
        row = {"mode": mode, "resolution": res, "frames": a.frames, "steps": a.steps,
               "tokens_per_forward": self.tokens(height, width, a.frames), "guidance_scale": a.guidance}
        notes = ["random weights: values change neither memory nor kernel time"]
        meter = Meter(self.device)
        kind = "quant" if mode in QUANT_MODES else "bf16"
        try:
            # 1. text encoding (before the experts exist on the GPU, except bf16_all_gpu)
            if mode == "bf16_all_gpu":
                facts = self.set_experts(kind)
                te = build_text_encoder(self.te_cfg, self.device)
                prompt_embeds = negative_embeds = None
            else:
                self.experts, self.experts_kind = {}, None  # the encoder runs before the experts exist
                free()
                te = build_text_encoder(self.te_cfg, self.device)
                enc = self.pipeline(te)
                meter.enter("text_encoding")
                with torch.no_grad():
                    prompt_embeds, negative_embeds = enc.encode_prompt(
                        PROMPT, NEGATIVE, do_classifier_free_guidance=True, num_videos_per_prompt=1,
                        max_sequence_length=self.max_seq, device=self.device, dtype=torch.bfloat16)
                meter.stop()
                te_bytes = _module_bytes(te)
                del enc, te
                te = None
                free()
                facts = self.set_experts(kind)
            policy = self.configure(mode)
            row["policy"] = policy
            row["build"] = facts
            expert_bytes = {r: _module_bytes(m) for r, m in self.experts.items()}
            # 2. warm-up: one forward of the high-noise expert at the real shape
            if mode != "bf16_all_gpu" and mode not in self.args.no_warmup.split(","):
                self.warmup(height, width, prompt_embeds)
            elif mode != "bf16_all_gpu":
                notes.append("no warm-up forward (no JIT kernels in this mode; shapes already ran in this process)")
            # 3. the pipeline
            pipe = self.pipeline(te)
            timer = ForwardTimer(meter)
            for role, model in self.experts.items():
                timer.attach(model, role)
            undo = [wrap_method(self.vae, "encode", lambda: meter.enter("image_encoding")),
                    wrap_method(self.vae, "decode", lambda: meter.enter("decoding"))]
            pipe.scheduler.set_timesteps(a.steps)
            row["timesteps"] = [float(t) for t in pipe.scheduler.timesteps]
            kwargs = dict(image=random_image(height, width), height=height, width=width, num_frames=a.frames,
                          num_inference_steps=a.steps, guidance_scale=a.guidance, output_type="np",
                          generator=torch.Generator(self.device).manual_seed(0), max_sequence_length=self.max_seq)
            if mode == "bf16_all_gpu":
                kwargs.update(prompt=PROMPT, negative_prompt=NEGATIVE)
                meter.enter("text_encoding")
            else:
                kwargs.update(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds)
                meter.enter("image_encoding")
            try:
                with torch.no_grad():
                    video = pipe(**kwargs)[0]
                meter.stop()
            finally:
                for u in undo:
                    u()
                timer.detach()
            row["video_shape"] = list(video.shape)
            del video
            if mode == "bf16_all_gpu":
                te_bytes = _module_bytes(te)
            steps = timer.steps()
            row["per_step"] = steps
            row["expert_per_step"] = [s["expert"] for s in steps]
            row["step_s"] = {r: _last([s["seconds"] for s in steps if s["expert"] == r]) for r in (HIGH, LOW)}
            row["forward_s"] = timer.records
            st = meter.stages
            row["stage_peak_gb"] = {k: v["peak_allocated"] / GB for k, v in st.items()}
            row["stage_reserved_gb"] = {k: v["peak_reserved"] / GB for k, v in st.items()}
            row["stage_resident_gb"] = {k: v["resident_at_start"] / GB for k, v in st.items()}
            row["stage_s"] = {k: v["seconds"] for k, v in st.items()}
            row["peak_allocated_gb"] = max(v["peak_allocated"] for v in st.values()) / GB
            row["peak_reserved_gb"] = max(v["peak_reserved"] for v in st.values()) / GB
            row["total_s"] = sum(v["seconds"] for v in st.values())
            both = sum(expert_bytes.values())
            row["weights_gb"] = {"expert_high": expert_bytes[HIGH] / GB, "expert_low": expert_bytes[LOW] / GB,
                                 "text_encoder": te_bytes / GB, "vae": _module_bytes(self.vae) / GB}
            row["expert_breakdown_gb"] = _expert_breakdown(self.experts)
            if "text_encoding" in st and mode != "bf16_all_gpu":
                row["text_encoding_with_experts_resident_gb"] = (st["text_encoding"]["peak_allocated"] + both) / GB
            row["backend"] = self.backend_of(mode)
            if kind == "quant":
                notes.append("W4A4 layers built directly with random packed codes (no BF16 copy)")
            if self.args.breakdown and mode in ("bf16", "w4a4") and \
                    (not self.args.breakdown_res or f"{height}x{width}" in self.args.breakdown_res.split(",")):
                row["breakdown_forwards"] = self.breakdown(mode, height, width, prompt_embeds)
            notes.append(self.expert_routing_note(row))
        except torch.cuda.OutOfMemoryError as e:
            meter.sync()
            row["error"] = f"out of memory in stage {meter.current}: {str(e).splitlines()[0]}"
            row["oom_at_allocated_gb"] = meter.allocated() / GB
            row["stage_peak_gb"] = {k: v["peak_allocated"] / GB for k, v in meter.stages.items()}
            notes.append("did not fit on this GPU")
        except Exception as e:  # keep the other rows
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()
        row["notes"] = notes
        if mode == "bf16_all_gpu":
            self.vae.enable_tiling()
        free()
        return row

    def warmup(self, height: int, width: int, context: torch.Tensor) -> None:
        model = self.experts[HIGH]
        x = torch.randn(self.latent_shape(height, width, self.args.frames), device=self.device, dtype=torch.bfloat16)
        t = torch.tensor([999.0], device=self.device)
        with torch.no_grad():
            model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)
        del x
        from wanquant.runtime.memory import release_static_caches

        for m in self.experts.values():
            release_static_caches(m)
        free()

    def breakdown(self, mode: str, height: int, width: int, context: torch.Tensor) -> list[dict]:
        """Extra forwards of the high-noise expert (cond, t=999) outside the pipeline:

        * at the run's resolution, the settings the pipeline did not use (BF16 chunked; W4A4
          unchunked; W4A4 with the cuBLAS FP8 GEMM where ``--alt-gemm`` names it): time and
          activation peak;
        * with ``--profile``, at ``--profile-resolution``: GPU kernel time by category for
          every setting (after one untimed forward of that setting).
        """
        from wanquant.model import block
        from wanquant.runtime import memory

        model = self.experts[HIGH]
        was = block.token_chunking_of(model)
        ck = self.args.chunk_tokens
        alt = self.args.alt_gemm if mode == "w4a4" else ""
        extra = [(f"chunked {n}", int(n), "") for n in self.args.alt_chunk.split(",") if n]
        if mode == "bf16":
            timed, profiled = [("chunked", ck, "")], [("stock", 0, ""), ("chunked", ck, "")]
        else:
            timed = ([] if self.args.no_unchunked else [("unchunked", 0, "")]) + extra + \
                ([(f"chunked, {alt} GEMM", ck, alt)] if alt else [])
            profiled = [("chunked", ck, ""), ("unchunked", 0, "")] + ([(f"chunked, {alt} GEMM", ck, alt)] if alt else [])
        t = torch.tensor([999.0], device=self.device)
        out = []

        def apply(chunk: int, gemm: str) -> None:
            if chunk:
                block.enable_token_chunking(model, chunk, scope=self.args.chunk_scope)
            else:
                block.disable_token_chunking(model)
            if mode == "w4a4":
                self.set_gemm(model, gemm)
            free()

        x = torch.randn(self.latent_shape(height, width, self.args.frames), device=self.device, dtype=torch.bfloat16)
        for label, chunk, gemm in timed:
            apply(chunk, gemm)
            entry = {"setting": label, "mode": mode}
            meter = Meter(self.device)
            try:
                if gemm:  # a new GEMM kernel may compile: one untimed forward first
                    with torch.no_grad():
                        model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)
                    free()
                meter.enter("forward")
                with torch.no_grad():
                    model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)
                meter.stop()
                s = meter.stages["forward"]
                entry.update(seconds=s["seconds"], peak_gb=s["peak_allocated"] / GB,
                             resident_gb=s["resident_at_start"] / GB,
                             activation_peak_gb=(s["peak_allocated"] - s["resident_at_start"]) / GB)
            except torch.cuda.OutOfMemoryError as e:
                entry["error"] = f"out of memory: {str(e).splitlines()[0]}"
            except Exception as e:  # noqa: BLE001 - optional measurement
                entry["error"] = f"{type(e).__name__}: {e}"
            out.append(entry)
            memory.release_static_caches(model)
        del x
        if self.args.profile and self.device.type == "cuda":
            ph, pw = (int(v) for v in (self.args.profile_resolution or f"{height}x{width}").split("x"))
            x = torch.randn(self.latent_shape(ph, pw, self.args.frames), device=self.device, dtype=torch.bfloat16)
            for label, chunk, gemm in profiled:
                apply(chunk, gemm)
                entry = {"setting": label, "mode": mode, "profile_resolution": f"{ph}x{pw}"}
                try:
                    entry["profile"] = profile_forward(model, x, t, context)
                except Exception as e:  # noqa: BLE001 - a profile is optional
                    entry["error"] = f"profile failed: {type(e).__name__}: {e}"
                out.append(entry)
                memory.release_static_caches(model)
            del x
        if was:
            block.enable_token_chunking(model, was[0], scope=was[1])
        else:
            block.disable_token_chunking(model)
        if mode == "w4a4":
            self.set_gemm(model, "")
        free()
        return out

    def set_gemm(self, model: nn.Module, gemm: str) -> None:
        """Re-prepare the fast path of every layer with ``WANQUANT_GEMM=gemm`` ('' = default)."""
        if gemm:
            os.environ["WANQUANT_GEMM"] = gemm
        else:
            os.environ.pop("WANQUANT_GEMM", None)
            if self._gemm_env is not None:
                os.environ["WANQUANT_GEMM"] = self._gemm_env
        for layer in _quant_layers(model):
            layer.set_backend("auto")
            layer._resolve_backend(self.device)

    def backend_of(self, mode: str) -> str:
        if mode not in QUANT_MODES:
            return "bf16 (diffusers, torch SDPA)"
        seen = {}
        for model in self.experts.values():
            for layer in _quant_layers(model):
                seen[layer._resolved] = layer.backend_reason
        return "; ".join(f"{k}: {v}" for k, v in seen.items())

    @staticmethod
    def expert_routing_note(row: dict) -> str:
        pairs = ", ".join(f"t={s['timestep']:.0f}->{s['expert']} ({s['forwards']} forwards)" for s in row["per_step"])
        return f"steps (UniPC flow shift {FLOW_SHIFT}, boundary {BOUNDARY_RATIO}): {pairs}"


def _quant_layers(model: nn.Module):
    from wanquant.runtime.expert import quantized_layers

    return list(quantized_layers(model).values())


def _module_bytes(m: nn.Module) -> int:
    from wanquant.runtime.memory import module_bytes

    return module_bytes(m)


def _expert_breakdown(experts: dict) -> dict:
    from wanquant.model.wan import blocks_of
    from wanquant.runtime.memory import expert_memory_breakdown

    return {role: {k: v / GB for k, v in expert_memory_breakdown(m, blocks_of(m)).items()}
            for role, m in experts.items()}


def _last(xs: list[float]) -> float | None:
    return xs[-1] if xs else None


# ---------------------------------------------------------------------------------------
# reporting
def _fmt(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    lines = [
        "GB = 1e9 bytes. Random weights (values change neither memory nor kernel time). "
        f"{rows[0]['frames'] if rows else 81} frames, UniPC flow shift {FLOW_SHIFT}, boundary {BOUNDARY_RATIO}, "
        "guidance > 1 (cond + uncond forward per step). Stage peaks are `max_memory_allocated` with the peak "
        "reset between stages; step times are CUDA-synchronised cond+uncond pairs after a warm-up forward.",
        "",
        "| mode | resolution | backend | peak alloc | peak reserved | text enc | image enc | denoising | decoding "
        "| step high (s) | step low (s) | total (s) | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = r.get("stage_peak_gb", {})
        step = r.get("step_s", {})
        backend = r.get("backend", "-").split(":")[0]
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['resolution']} | {backend} | **{r['error'][:80]}** | | "
                         f"{_fmt(sp.get('text_encoding'))} | {_fmt(sp.get('image_encoding'))} | "
                         f"{_fmt(sp.get('denoising'))} | {_fmt(sp.get('decoding'))} | | | | "
                         f"{r.get('run', {}).get('commit', '-')} |")
            continue
        lines.append(
            f"| {r['mode']} | {r['resolution']} | {backend} | {_fmt(r['peak_allocated_gb'])} | "
            f"{_fmt(r['peak_reserved_gb'])} | {_fmt(sp.get('text_encoding'))} | {_fmt(sp.get('image_encoding'))} | "
            f"{_fmt(sp.get('denoising'))} | {_fmt(sp.get('decoding'))} | {_fmt(step.get('high'))} | "
            f"{_fmt(step.get('low'))} | {_fmt(r['total_s'], 1)} | {r.get('run', {}).get('commit', '-')} |")
    lines += ["", "## Targets", ""]
    lines += [f"- {t}" for t in targets(rows)]
    lines += ["", "## What holds the memory", "",
              "| mode | resolution | expert high | expert low | of which fast-path extra | VAE | text encoder "
              "| resident at denoising | denoising activations | text enc. with experts resident |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            continue
        w, eb = r["weights_gb"], r.get("expert_breakdown_gb", {})
        extra = sum(eb.get(k, {}).get("fast_path_extra", 0.0) for k in eb)
        res = r["stage_resident_gb"].get("denoising")
        act = r["stage_peak_gb"].get("denoising", 0) - (res or 0)
        lines.append(f"| {r['mode']} | {r['resolution']} | {_fmt(w['expert_high'])} | {_fmt(w['expert_low'])} | "
                     f"{_fmt(extra)} | {_fmt(w['vae'])} | {_fmt(w['text_encoder'])} | {_fmt(res)} | {_fmt(act)} | "
                     f"{_fmt(r.get('text_encoding_with_experts_resident_gb'))} |")
    bd = [(r, b) for r in rows for b in r.get("breakdown_forwards", []) if "profile" not in b]
    if bd:
        lines += ["", "## One forward of the high-noise expert (cond), other settings", "",
                  "Pipeline setting: BF16 stock (unchunked), W4A4 chunked at 8192 tokens with the Triton GEMM. "
                  "`pipeline forward` is the last high-noise forward of the pipeline run the entry came from.", "",
                  "| mode | resolution | setting | activation peak (GB) | forward (s) | pipeline forward (s) | run |",
                  "|---|---|---|---|---|---|---|"]
        for r, b in bd:
            pipe_fwd = [f["seconds"] for f in r.get("forward_s", []) if f["expert"] == HIGH]
            pf = b.get("pipeline_forward_s", pipe_fwd[-1] if pipe_fwd else None)
            lines.append(f"| {r['mode']} | {r['resolution']} | {b['setting']} | {_fmt(b.get('activation_peak_gb'))} "
                         f"| {_fmt(b.get('seconds'))} | {_fmt(pf)} "
                         f"| {b.get('run', '-')} |")
    prof = [(r, b) for r in rows for b in r.get("breakdown_forwards", []) if "profile" in b]
    if prof:
        cats = []
        for _, b in prof:
            cats += [c for c in b["profile"]["by_category_s"] if c not in cats]
        lines += ["", "## Where the time goes: GPU kernel time of one forward (torch.profiler), seconds", "",
                  "| mode | setting | shape | " + " | ".join(cats) + " | all kernels | wall (profiled) | run |",
                  "|---|---|---|" + "---|" * (len(cats) + 3)]
        for r, b in prof:
            pc = b["profile"]["by_category_s"]
            lines.append(f"| {r['mode']} | {b['setting']} | {b['profile_resolution']} | "
                         + " | ".join(_fmt(pc.get(c)) for c in cats)
                         + f" | {_fmt(b['profile']['kernel_s'])} | {_fmt(b['profile']['wall_s_profiled'])} "
                         f"| {b.get('run', '-')} |")
    if payload.get("analysis"):
        lines += ["", payload["analysis"].rstrip()]
    lines += ["", "## Per row", ""]
    for r in rows:
        lines.append(f"- **{r['mode']} {r['resolution']}**: " + "; ".join(r.get("notes", []))
                     + (f"; policy: {r['policy']}" if "policy" in r else "")
                     + (f"; backend: {r.get('backend')}" if "backend" in r else ""))
    return "\n".join(lines) + "\n"


def _row(rows, mode, res):
    for r in rows:
        if r["mode"] == mode and r["resolution"] == res and "error" not in r:
            return r
    return None


def targets(rows) -> list[str]:
    out = []
    for res, limit in (("720x1280", 24.0), ("480x832", 20.0)):
        w = _row(rows, "w4a4", res)
        if w:
            p = w["peak_allocated_gb"]
            out.append(f"W4A4 peak at {res} x 81 <= {limit:.0f} GB: {p:.2f} GB ({p * GB / 2**30:.2f} GiB) -> "
                       f"{'met' if p <= limit else 'MISSED'}")
    for res in ("480x832", "720x1280"):
        lean = _row(rows, "w4a4_lean", res)
        if lean:
            p = lean["peak_allocated_gb"]
            out.append(f"experiment w4a4_lean (fast path owning its low-rank operands) at {res}: {p:.2f} GB "
                       f"({p * GB / 2**30:.2f} GiB)")
    for res in ("480x832", "720x1280"):
        w, b = _row(rows, "w4a4", res), _row(rows, "bf16", res)
        if w and b:
            red = 1 - w["peak_allocated_gb"] / b["peak_allocated_gb"]
            out.append(f"peak reduction vs stock BF16 at {res}: {red * 100:.1f} % (target >= 70 %) -> "
                       f"{'met' if red >= 0.70 else 'MISSED'}")
    for res in ("480x832", "720x1280"):
        w, b = _row(rows, "w4a4", res), _row(rows, "bf16", res)
        if w and b:
            ws = [w["step_s"][k] for k in (HIGH, LOW) if w["step_s"].get(k)]
            bs = [b["step_s"][k] for k in (HIGH, LOW) if b["step_s"].get(k)]
            if ws and bs:
                sp = (sum(bs) / len(bs)) / (sum(ws) / len(ws))
                tgt = " (target >= 1.15x)" if res == "480x832" else ""
                verdict = (" -> met" if sp >= 1.15 else " -> MISSED") if res == "480x832" else ""
                runs = {w.get("run", {}).get("date"), b.get("run", {}).get("date")}
                where = " (same device run)" if len(runs) == 1 else " (two device runs of the same kind)"
                out.append(f"denoising step speed-up W4A4 vs BF16 at {res}: {sp:.3f}x "
                           f"({(sum(bs) / len(bs)):.2f} s vs {(sum(ws) / len(ws)):.2f} s per step){tgt}{verdict}{where}")
    for res in ("480x832", "720x1280"):
        a = [r for r in rows if r["mode"] == "bf16_all_gpu" and r["resolution"] == res]
        if a:
            r = a[0]
            if "error" in r:
                out.append(f"BF16 everything on the GPU at {res}: {r['error'][:120]}")
            else:
                p = r["peak_allocated_gb"]
                out.append(f"BF16 everything on the GPU at {res}: peak {p:.2f} GB ({p * GB / 2**30:.2f} GiB; "
                           f"{'fits' if p * GB / 2**30 < 79.0 else 'does not fit'} an 80 GB H100)")
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if "error" not in r]
    resolutions = sorted({r["resolution"] for r in rows}, key=lambda s: int(s.split("x")[0]))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(modes))
    for i, m in enumerate(modes):
        pts = [(j + (i - (len(modes) - 1) / 2) * width, _row(rows, m, res)["peak_allocated_gb"])
               for j, res in enumerate(resolutions) if _row(rows, m, res)]
        bars = ax.bar([x for x, _ in pts], [v for _, v in pts], width, label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    for y, lab in ((24, "24 GB target (720p)"), (20, "20 GB target (480p)")):
        ax.axhline(y, ls="--", lw=0.8, color="gray")
        ax.text(-0.45, y + (0.6 if y == 24 else -0.6), lab, fontsize=7, va="bottom" if y == 24 else "top",
                ha="left", color="gray", bbox=dict(facecolor="white", edgecolor="none", pad=0.5))
    ax.set_xticks(range(len(resolutions)), [f"{r} x 81" for r in resolutions])
    ax.set_ylabel("peak max_memory_allocated (GB = 1e9 B)")
    ax.set_title(f"Wan2.2-I2V-A14B pipeline peak GPU memory ({payload.get('device', '')})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(files: list[str], out_dir: Path, analysis: str | None = None) -> None:
    """Combine device runs (oldest first): the latest row of each (mode, resolution) is kept,
    older ones move to ``superseded_rows``; their extra forwards and profiles are kept on the
    newer row, tagged with the run they came from."""
    latest: dict[tuple, dict] = {}
    superseded, metas = [], []
    for f in files:
        d = json.loads(Path(f).read_text())
        meta = {k: d.get(k) for k in ("device", "date", "commit", "command", "environment")}
        metas.append(meta)
        run = {"commit": meta["commit"], "date": meta["date"],
               "wanquant_source": (meta.get("environment") or {}).get("wanquant_source")}
        for r in d["rows"]:
            if "error" in r and r["error"].startswith("not run"):
                continue
            r = dict(r, run=run)
            pipe_fwd = [f["seconds"] for f in r.get("forward_s", []) if f["expert"] == HIGH]
            for b in r.get("breakdown_forwards", []):
                b.setdefault("run", run["commit"])
                b.setdefault("pipeline_forward_s", pipe_fwd[-1] if pipe_fwd else None)
            key = (r["mode"], r["resolution"])
            if key in latest:
                old = latest[key]
                superseded.append(old)
                r["breakdown_forwards"] = old.get("breakdown_forwards", []) + r.get("breakdown_forwards", [])
            latest[key] = r
    order = {m: i for i, m in enumerate(MODES)}
    rows = sorted(latest.values(), key=lambda r: (int(r["resolution"].split("x")[0]), order.get(r["mode"], 9)))
    devices = sorted({m["device"] for m in metas if m["device"]})
    payload = {"device": " / ".join(devices), "date": max(m["date"] for m in metas),
               "commit": " / ".join(dict.fromkeys(m["commit"] for m in metas)),
               "command": " ; ".join(m["command"] for m in metas), "runs": metas, "rows": rows,
               "superseded_rows": superseded}
    if analysis:
        payload["analysis"] = analysis
    write_results("full_scale", payload, markdown(payload), results_dir=out_dir)
    plot(payload, out_dir / "full_scale.png")
    print(markdown(payload))


# ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="same code at a tiny config on the CPU (dry run)")
    p.add_argument("--resolutions", default="480x832,720x1280")
    p.add_argument("--modes", default="bf16,bf16_all_gpu,w4a4,unpack_bf16")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=2, help="2 with shift 5: t=999 (high expert), 833 (low expert)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--chunk-tokens", type=int, default=8192)
    p.add_argument("--chunk-scope", default="block", choices=("block", "ffn"))
    p.add_argument("--kv-cache", action="store_true", help="keep W4A4's per-context cross-attn K/V cache")
    p.add_argument("--breakdown", action="store_true", help="extra forwards: BF16 chunked, W4A4 unchunked")
    p.add_argument("--out", default=None, help="folder for rows.json and the log (default: results/ for --tiny: /tmp)")
    p.add_argument("--commit", default=None, help="git commit to record (the device copy has no .git)")
    p.add_argument("--merge", nargs="+", default=None, help="rows.json files -> benchmarks/results/full_scale.*")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--analysis", default=None, help="with --merge: a Markdown file of findings to include")
    p.add_argument("--skip-after-s", type=float, default=0.0, help="start no new mode after this many seconds")
    p.add_argument("--no-warmup", default="", help="comma list of modes run without the warm-up forward")
    p.add_argument("--jobs", default="", help="RES:MODE list, run in this order (overrides --resolutions/--modes)")
    p.add_argument("--profile", action="store_true", help="with --breakdown: kernel-time profile of one forward "
                   "per chunking setting (bf16, w4a4)")
    p.add_argument("--profile-resolution", default="", help="resolution of the profiled forwards (default: the run's)")
    p.add_argument("--alt-chunk", default="", help="with --breakdown: W4A4 forwards with these chunk sizes too")
    p.add_argument("--no-unchunked", action="store_true", help="with --breakdown: no unchunked W4A4 forward")
    p.add_argument("--breakdown-res", default="", help="resolutions that get the breakdown (default: all)")
    p.add_argument("--alt-gemm", default="", help="with --breakdown: also time W4A4 with WANQUANT_GEMM=this (cublas)")
    args = p.parse_args(argv)

    if args.merge:
        analysis = Path(args.analysis).read_text() if args.analysis else None
        merge(args.merge, Path(args.results_dir) if args.results_dir else RESULTS_DIR, analysis)
        return 0
    if args.tiny:
        args.resolutions = "64x64" if args.resolutions == p.get_default("resolutions") else args.resolutions
        args.frames = 9 if args.frames == 81 else args.frames
        args.chunk_tokens = 20 if args.chunk_tokens == 8192 else args.chunk_tokens
        torch.set_num_threads(2)
    elif not torch.cuda.is_available():
        print("no CUDA device: use --tiny for a CPU dry run", file=sys.stderr)
        return 2
    out = Path(args.out or ("/tmp/full_scale_tiny" if args.tiny else RESULTS_DIR / "raw"))
    out.mkdir(parents=True, exist_ok=True)
    args.log = str(out / "log.txt")
    meta = run_metadata()
    if args.commit:
        meta["commit"] = args.commit
    meta["environment"] = environment()
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown modes {bad}; choose from {MODES}")
    torch.manual_seed(0)
    bench = Bench(args)
    bench.say(f"device {meta['device']}; torch {torch.__version__}; modes {modes}; resolutions {args.resolutions}")
    rows = []
    payload = dict(meta, rows=rows)
    start = time.perf_counter()
    if args.jobs:
        jobs = [tuple(j.split(":")) for j in args.jobs.split(",") if j]
    else:
        jobs = [(res, mode) for res in args.resolutions.split(",") for mode in modes]
    bad = [m for _, m in jobs if m not in MODES]
    if bad:
        raise SystemExit(f"unknown modes {bad}; choose from {MODES}")
    # In the order given (bf16_all_gpu right after bf16 reuses its experts).
    for res, mode in jobs:
        h, w = (int(v) for v in res.split("x"))
        if args.skip_after_s and time.perf_counter() - start > args.skip_after_s:
            bench.say(f"--- {mode} {res}: skipped (past --skip-after-s {args.skip_after_s})")
            rows.append({"mode": mode, "resolution": res, "frames": args.frames, "steps": args.steps,
                         "error": "not run: the device call's time budget ran out", "notes": []})
            continue
        bench.say(f"--- {mode} {res}")
        t0 = time.perf_counter()
        row = bench.run(mode, h, w)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        bench.say(summary(row))
        (out / "rows.json").write_text(json.dumps(payload, indent=1, default=str))
    bench.say("done")
    print(markdown(payload))
    return 0


def environment() -> dict:
    import wanquant

    env = {"torch": torch.__version__, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
           "wanquant_path": str(Path(wanquant.__file__).resolve().parent.relative_to(REPO_ROOT))
           if Path(wanquant.__file__).resolve().is_relative_to(REPO_ROOT) else wanquant.__file__,
           "wanquant_source": os.environ.get("WANQUANT_SOURCE", "working tree")}
    for name in ("diffusers", "transformers", "accelerate", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - report what is there
            env[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu_total_memory_gb"] = props.total_memory / GB
        env["cuda"] = torch.version.cuda
    return env


def summary(r: dict) -> str:
    if "error" in r:
        return f"{r['mode']} {r['resolution']}: ERROR {r['error']}\n{r.get('traceback', '')}"
    sp = {k: round(v, 2) for k, v in r["stage_peak_gb"].items()}
    return (f"{r['mode']} {r['resolution']}: peak {r['peak_allocated_gb']:.2f} GB (reserved "
            f"{r['peak_reserved_gb']:.2f}), stages {sp}, steps {r['step_s']}, total {r['total_s']:.1f} s, "
            f"wall {r['wall_s']:.0f} s, backend {r['backend']}")


if __name__ == "__main__":
    raise SystemExit(main())
