"""Quality of W4A4 on the trained testbeds: the paper's ablation, ours, outside rows, the bars.

    python -m benchmarks.testbed_quality --out runs/quality [--num-calib 8 --num-eval 8 --steps 40]

Calibrates every config of :mod:`benchmarks.quality.ablation` on the testbed's
calibration split, generates the evaluation split with fixed seeds (the same for every
config), and measures fidelity to the 16-bit output (PSNR, SSIM, VMAF), accuracy against
the ground truth (PSNR, object-trajectory error) and the offline VBench-style dimensions.
``--testbed plain outlier`` runs the trained testbed and its copy with massive AdaLN
channels transplanted (:mod:`wanquant.model.outliers`, written to ``OUT/testbed_outlier``);
``--calib-seeds K`` calibrates each config K times on disjoint calibration samples;
``--modelopt [ROW ...]`` adds NVIDIA ModelOpt's rows, all or those named (``pip install
.[compare]``). Results (``benchmarks/results/testbed_quality.{json,md}``, the layout of
:mod:`benchmarks.quality.combine`) carry both testbeds' activation statistics, per-row
standard errors and paired per-video differences per component. Issue 17's full run, on
one GPU (``--workers``: processes sharing it; start the CUDA MPS daemon first,
``nvidia-cuda-mps-control -d``, or they take turns and run several times slower)::

    python -m benchmarks.testbed_quality --out runs/q17full --testbed outlier plain --calib-seeds 3 \
        --num-calib 8 --num-eval 32 --steps 40 --device cuda --workers 15 --modelopt --no-vmaf --no-brisque \
        --layer-error-videos 0 --no-shuffled-prompts --stats-samples 0 --no-results --configs bf16 rtn \
        rtn_safe_ceil smooth svdquant gptq global_clip per_bin_clip shared_policy ours ours_no_smooth ours_rank0 \
        ours_no_gptq ours_no_clip ours_shared_policy ours_per_bin_clip ours_safe_ceil ours_rank_w svdquant_rank_w

then the same arguments with ``--measure-only --stats-samples 3`` (and without
``--no-results``) write the tables; the measured rows (``OUT/<testbed>/seed<k>/configs``)
are all that command needs, so they can be copied off the GPU machine without the videos.
Per-config results are cached under ``OUT/<testbed>/seed<k>``: a rerun resumes, and
several processes may share the work (``--workers``, or ``--generate-only`` with disjoint
``--configs`` then ``--measure-only``). ``--missing-ok`` writes the tables of a run that
ended early (comparisons pair rows on the calibration seeds both have).
:func:`run_quality` alone (one testbed, one seed) also writes the single-run tables and
plots of earlier versions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common.meta import RESULTS_DIR, run_metadata, write_results  # noqa: E402
from benchmarks.quality import ablation as A  # noqa: E402
from benchmarks.quality import layer_errors as LE  # noqa: E402
from benchmarks.quality.modelopt_rows import ROWS as MO_ROWS  # noqa: E402
from benchmarks.quality import vbench_style as VB  # noqa: E402
from wanquant.calibration.samples import CalibSample  # noqa: E402
from wanquant.evaluation import metrics as M  # noqa: E402
from wanquant.evaluation.report import clip_table_plot, write_report  # noqa: E402
from wanquant.media import write_video  # noqa: E402
from wanquant.model.pipeline import GenerationSettings  # noqa: E402

log = logging.getLogger("testbed_quality")
NAME = "testbed_quality"


def testbed_factory(device: str = "cpu", weights: Path | None = None):
    """(make_pipeline, trained?): the trained testbed (``weights``, default the committed
    one), else an untrained one."""
    from wanquant.model.testbed import build_testbed_pipeline, load_testbed_pipeline
    from wanquant.testbed import WEIGHTS_DIR

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    path = Path(weights or WEIGHTS_DIR)
    trained = (path / "model_index.json").is_file()
    if not trained:
        warnings.warn(f"no trained testbed in {path}: measuring an UNTRAINED testbed.", stacklevel=2)

    def make():
        if trained:
            return load_testbed_pipeline(device=device, dtype=dtype, path=path)
        return build_testbed_pipeline(seed=0).to(device, dtype)

    return make, trained


def weights_id(path: Path | None = None) -> str:
    """sha256 over the testbed's weight files (names and bytes); 'untrained' without them."""
    import hashlib

    from wanquant.testbed import WEIGHTS_DIR

    root = Path(path or WEIGHTS_DIR)
    if not (root / "model_index.json").is_file():
        return "untrained-seed0"
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".md"):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return "trained-" + h.hexdigest()[:16]


def run_quality(out: str | Path, num_calib: int = 8, num_eval: int = 8, steps: int = 40, guidance: float = 4.0,
                configs: list[str] | None = None, device: str = "cpu", vmaf: bool = True, brisque: bool = True,
                overwrite: bool = False, results_dir: str | Path | None = RESULTS_DIR, command: str | None = None,
                make_pipeline=None, trained: bool | None = None, generation: GenerationSettings | None = None,
                reservoir_tokens: int = 4096, layer_errors: bool = True, write_videos: bool = True,
                plots: bool = True, generate: bool = True, measure: bool = True, backend: str = "reference",
                weights: str | Path | None = None, layer_error_videos: int = 2, calib_seed: int = 0,
                testbed: str = "plain", modelopt_rows: tuple[str, ...] = (), worker: bool = False,
                shuffled_prompts: bool = True, missing_ok: bool = False) -> dict:
    """Run (or resume) the ablation and write results; returns the JSON payload.

    ``make_pipeline`` and ``generation`` (whose size the samples are rendered at) override
    the testbed's (tests pass a tiny pipeline); ``results_dir=None`` writes no result files.
    ``measure=False`` only generates and caches videos (returns ``{}``); ``generate=False``
    only measures videos already cached in ``out`` (see :func:`ablation.run_ablation`).
    ``worker``: one of several processes sharing ``out``: generates and measures the configs
    no other process holds, writes nothing else and returns ``{}``. ``missing_ok``: configs
    never generated are left out of the tables (a run that ended early).
    """
    from wanquant.model.testbed import TestbedConfig
    from wanquant.testbed.dataset import list_samples

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_id = "custom"
    if make_pipeline is None:
        make_pipeline, trained = testbed_factory(device, weights)
        model_id = weights_id(weights)
    tb = TestbedConfig()
    gen = generation or GenerationSettings(height=tb.height, width=tb.width, num_frames=tb.num_frames,
                                           num_inference_steps=steps, guidance_scale=guidance,
                                           max_sequence_length=tb.max_sequence_length)
    frames, height, width, steps, guidance = (gen.num_frames, gen.height, gen.width, gen.num_inference_steps,
                                              gen.guidance_scale)
    render = dict(num_frames=frames, height=height, width=width)
    # Calibration seed k: the next num_calib samples of the calib split (k = 0: samples 0..n-1).
    start = calib_seed * num_calib
    calib = [CalibSample(s.first_frame(), s.prompt, 1000 + start + i, f"testbed-calib:{start + i}")
             for i, s in enumerate(list_samples("calib", num_calib, start=start, **render))]
    evals = list_samples("eval", num_eval, **render)
    hidden = tb.dim if model_id != "custom" else _width_of(make_pipeline)
    settings = A.AblationSettings(gen, configs=list(configs or A.ABLATION_ORDER), reservoir_tokens=reservoir_tokens,
                                  vmaf=vmaf, brisque=brisque, layer_errors=layer_errors, device=device,
                                  backend=backend, model_id=model_id, layer_error_videos=layer_error_videos,
                                  shuffled_prompts=shuffled_prompts)
    t0 = time.perf_counter()
    res = A.run_ablation(make_pipeline, calib, evals, settings, out, overwrite=overwrite, generate=generate,
                         measure=measure, configs=A.ablation_configs(hidden), skip_busy=worker,
                         missing_ok=missing_ok)
    rows = res["rows"]
    if modelopt_rows:
        # The outside reference: after every config, on the same calibration samples and videos.
        from benchmarks.quality import modelopt_rows as MO

        ok, why = MO.available()
        if not ok:
            log.warning("ModelOpt rows skipped: %s", why)
        else:
            for r in MO.run_rows(make_pipeline, calib, evals, settings, out, res["reference"], tuple(modelopt_rows),
                                 generate=generate, measure=measure, skip_busy=worker, missing_ok=missing_ok):
                rows[r["config"]] = r
    if not measure or worker:
        return {}
    ordered = [rows[c] for c in A.ALL_CONFIGS if c in rows] + [r for c, r in rows.items() if c not in A.ALL_CONFIGS]
    meta = run_metadata(command)
    gen_devices = sorted({json.dumps(r.get("generated_on", {}), sort_keys=True) for r in ordered})
    gen_on = [json.loads(g) for g in gen_devices]
    if any(not g.get("device", "").startswith("CPU") for g in gen_on):
        meta["device"] = (f"videos generated on {', '.join(sorted({g.get('device', '?') for g in gen_on}))}; "
                          f"metrics computed on {meta['device']}")
    base_dtype = (rows[A.BASELINE].get("generated_on") or {}).get("dtype", "")
    payload = {
        **meta,
        "generated_on": gen_on,
        "reproduce": (f"python -m benchmarks.testbed_quality --out {out} --num-calib {num_calib} --num-eval {num_eval} "
                      f"--steps {steps} --guidance {guidance} --reservoir-tokens {reservoir_tokens}"
                      + (f" --weights {weights}" if weights else "") + f" --configs {' '.join(settings.configs)}"
                      + " (one process; the same with --generate-only in several processes, then --measure-only)"),
        "model": ("trained testbed" if trained else "UNTRAINED testbed (trained weights not found)")
        + f" [{model_id}]",
        "baseline": "bf16 row = the unquantized model; on CPU it runs in fp32 (bf16 matmuls are slow there)"
        if "float32" in base_dtype else f"bf16 row = the unquantized model in {base_dtype or 'bf16'}",
        "testbed": testbed,
        "calib_seed": calib_seed,
        "settings": {"calibration_samples": num_calib, "eval_samples": num_eval, "steps": steps,
                     "guidance_scale": guidance, "frames": frames, "size": [height, width],
                     "eval_seeds": list(range(settings.eval_seed, settings.eval_seed + num_eval)),
                     "calibration_seeds": [s.seed for s in calib], "reservoir_tokens": reservoir_tokens,
                     "w4a4_backend": backend},
        "metric_notes": {
            "fidelity": "PSNR (all frames, RGB, peak 255), SSIM (luma, 11x11 Gaussian sigma 1.5, valid windows), "
                        "VMAF v0.6.1 (libvmaf of the imageio-ffmpeg ffmpeg, both videos bicubic-scaled to 256x256); "
                        "means over eval videos",
            "vmaf": M.vmaf_status().reason if M.vmaf_status().available else None,
            "vmaf_unavailable_reason": None if M.vmaf_status().available else M.vmaf_status().reason,
            "ground_truth": "gt_psnr and trajectory_err (px, object centroid by colour vs true centre; "
                            "frame 0 skipped) from wanquant.testbed.dataset",
            "vbench_style": "see benchmarks/quality/vbench_style.py; average = mean of "
                            + ", ".join(VB.DIMENSIONS) + "; imaging_quality_brisque reported, not averaged",
            "layer_errors": "sum|y_q - y_ref|^2 / sum|y_ref|^2 per (expert, bin, layer) with the 16-bit layer "
                            "fed the quantized model's own inputs, recorded while generating the first "
                            f"{settings.layer_error_videos} eval videos",
        },
        "rows": [_public_row(r) for r in ordered],
        "extra_rows": [_public_row(r) for r in res["extra_rows"].values()],
        "acceptance": A.acceptance(rows),
        "components": A.component_verdicts(rows),
        "components_gt_psnr": A.component_verdicts(rows, "gt_psnr"),
        "layer_error_summary": {r["config"]: r.get("layer_error_summary") for r in ordered if r.get("layer_error_summary")},
        "seconds": {r["config"]: r.get("seconds") for r in ordered},
        "wall_seconds_this_call": time.perf_counter() - t0,
    }
    figures = _plots(rows, out) if plots else []
    if write_videos:
        _report(out, payload, rows, evals, figures)
    if results_dir is not None:
        results_dir = Path(results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        for f in figures:
            shutil.copyfile(out / f, results_dir / f"{NAME}_{f}")
        write_results(NAME, payload, markdown(payload), results_dir)
    return payload


def _width_of(make_pipeline) -> int:
    """Hidden size of a pipeline's first expert (for the rank-scaled-to-width rows)."""
    cfg = make_pipeline().transformer.config
    return int(cfg.num_attention_heads * cfg.attention_head_dim)


def _public_row(r: dict) -> dict:
    """The result row without bulky fields (per-layer rows stay in OUT/configs)."""
    keep = {k: v for k, v in r.items() if k not in ("layer_errors", "quant_config", "per_sample")}
    if "per_sample" in r:
        keep["per_sample"] = [{**p, "vbench_style": {k: v for k, v in p["vbench_style"].items()
                                                      if k != "imaging_quality_brisque"}} for p in r["per_sample"]]
    return keep


# ----------------------------------------------------------------------------- output


def _f(v, fmt: str = ".2f") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, fmt)


NOTES = (
    "Rank at testbed scale: the testbed's layers are 256 wide (FFN 1024); a rank-16 branch adds ~47 % to a "
    "256x256 layer's 4.25-bit weight bits and rank 32 ~94 %, against ~2.4 % / 4.7 % at Wan2.2's width 5120, "
    "so the low-rank rows overstate what the branch buys at full scale, and `ours` (rank 32) carries twice the "
    "branch of `per_bin_clip` (`ours_rank16`, where run, separates the two).",
    "Dynamic degree rises with any added temporal noise (VBench's own weakness), so a quantized model can "
    "score *higher* than bf16 on it; read it together with flicker and smoothness.",
    "BRISQUE (wheel `brisque` 0.2.0, its SVM ships inside) is reported but not averaged: on these 64x64 "
    "synthetic clips it ranks wrongly (Gaussian noise improves its score; some clean clips saturate at 155.8).",
    "VMAF's model was fitted on HD viewing: the 64x64 clips are scaled to 256x256 first; read VMAF as a "
    "ranking, not as an absolute quality level.",
    "Fidelity numbers are means over the eval videos of per-video values; 'wins' counts paired per-video "
    "improvements, which is the more robust signal with few videos.",
)


def markdown(p: dict) -> str:
    s = p["settings"]
    lines = [
        f"Model: {p['model']}. {p['baseline']}.",
        f"Calibration: {s['calibration_samples']} samples of the calib split; evaluation: {s['eval_samples']} samples "
        f"of the eval split, seeds {s['eval_seeds'][0]}..{s['eval_seeds'][-1]} (the same for every config), "
        f"{s['steps']} steps, guidance {s['guidance_scale']}, {s['frames']} frames at {s['size'][0]}x{s['size'][1]}.",
        f"Reproduce: `{p.get('reproduce', '')}`.",
        "",
        "| config | switches | PSNR vs bf16 (dB) | SSIM vs bf16 | VMAF vs bf16 | GT PSNR (dB) | trajectory err (px) "
        "| subject | background | flicker | smoothness | dynamic | VBench-style avg | BRISQUE (raw, not averaged) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cfgs = A.ablation_configs()
    for r in p["rows"] + p["extra_rows"]:
        vb = r.get("vbench_style") or {}
        bq = (vb.get("imaging_quality_brisque") or {}).get("raw")
        sw = A.short_switches(cfgs.get(r["config"])) if r["config"] in cfgs else ", ".join(
            f"{k} {v}" for k, v in r["switches"].items() if k != "quantized")
        lines.append(
            f"| {r['config']} | {sw} | {_f(r.get('psnr_vs_bf16'))} | {_f(r.get('ssim_vs_bf16'), '.4f')} | "
            f"{_f(r.get('vmaf_vs_bf16'), '.1f')} | {_f(r.get('gt_psnr'))} | {_f(r.get('trajectory_err'))} | "
            f"{_f(vb.get('subject_consistency'), '.4f')} | {_f(vb.get('background_consistency'), '.4f')} | "
            f"{_f(vb.get('temporal_flickering'), '.4f')} | {_f(vb.get('motion_smoothness'), '.4f')} | "
            f"{_f(vb.get('dynamic_degree'), '.3f')} | {_f(r.get('vbench_style_avg'), '.4f')} | {_f(bq, '.1f')} |")
    acc = p.get("acceptance") or {}
    if acc:
        lines += ["", "Acceptance bars (ours vs bf16):", ""]
        d = acc["vbench_style_drop_pct"]
        se = f" +- {d['paired_se']:.2f} % (paired standard error over the eval videos)" if d.get("paired_se") else ""
        lines.append(f"- VBench-style average drop: {d['value']:.3f} %{se} (bar <= 0.5 %): "
                     f"{'met' if d['met'] else 'NOT met'}; drop per dimension (%, positive = worse than bf16): "
                     + ", ".join(f"{k} {v:+.2f}" for k, v in acc.get("vbench_style_drop_pct_per_dim", {}).items()))
        for m in ("gt_psnr_loss", "trajectory_err_loss"):
            if m in acc:
                a = acc[m]
                unit = "dB" if m.startswith("gt_psnr") else "px"
                lines.append(f"- {m.replace('_loss', '')} loss: ours {a['ours']:+.3f} {unit}, rtn {a['rtn']:+.3f} {unit} "
                             f"(bar: ours <= 0.25 x rtn): {'met' if a['met'] else 'NOT met'}")
    if p.get("components"):
        lines += ["", "Components (PSNR vs bf16, higher is better; wins = eval videos where the row beats the one "
                      "before it; +- is the paired standard error over the eval videos):", "",
                      "| component | before | after | delta (dB) | wins | delta SSIM | "
                      "delta GT PSNR (dB) | delta traj err (px) |", "|---|---|---|---|---|---|---|---|"]
        for c in p["components"]:
            se = f" +- {c['delta_paired_se']:.2f}" if c.get("delta_paired_se") is not None else ""
            lines.append(f"| {c['component']} | {c['before']:.2f} | {c['after']:.2f} | {c['delta']:+.2f}{se} | "
                         f"{c['wins']} | {c['delta_ssim']:+.4f} | {c['delta_gt_psnr']:+.2f} | {c['delta_traj_err']:+.2f} |")
    les = p.get("layer_error_summary") or {}
    if les:
        lines += ["", "Per-layer relative output error (mean over layers; recorded during generation with the "
                      "16-bit layer fed the same inputs) and the relative error of each expert's output per timestep "
                      "bin (0 = the expert's noisiest steps):", "",
                  "| config | calibration layer err | generation layer err (high / low expert) | "
                  "expert output err, high: bins 0/1/2 | low: bins 0/1/2 |", "|---|---|---|---|---|"]
        for r in p["rows"]:
            e = les.get(r["config"])
            if not e:
                continue
            parts = []
            for attr in e.values():
                parts.append("/".join(f"{v:.4f}" for _, v in sorted(attr["expert_output_rel_err_per_bin"].items())))
            gen = " / ".join(f"{np.mean(list(a['mean_layer_rel_err_per_bin'].values())):.4f}" for a in e.values())
            lines.append(f"| {r['config']} | {_f(r.get('calibration_mean_layer_rel_err'), '.4f')} | {gen} | "
                         + " | ".join(parts) + " |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in NOTES]
    lines += ["", "Metric definitions: " + "; ".join(f"{k}: {v}" for k, v in p["metric_notes"].items() if v)]
    return "\n".join(lines)


def _plots(rows: dict[str, dict], out: Path) -> list[str]:
    names = [c for c in A.ALL_CONFIGS if c in rows]
    figs = []
    q = [c for c in names if c != A.BASELINE]
    if q:
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
        for ax, (key, label) in zip(axes, (("psnr_vs_bf16", "PSNR vs bf16 (dB)"), ("ssim_vs_bf16", "SSIM vs bf16"),
                                           ("vmaf_vs_bf16", "VMAF vs bf16"), ("gt_psnr", "GT PSNR (dB)"))):
            cs = names if key == "gt_psnr" else q
            vals = [rows[c].get(key) if rows[c].get(key) is not None else np.nan for c in cs]
            ax.bar(range(len(cs)), vals, color=["tab:gray" if c == "bf16" else "tab:blue" if c != "ours"
                                                 else "tab:red" for c in cs])
            finite = [v for v in vals if np.isfinite(v)]
            if finite:
                lo, hi = min(finite), max(finite)
                ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
            ax.ticklabel_format(axis="y", useOffset=False)
            for i, v in enumerate(vals):
                if np.isfinite(v):
                    ax.annotate(f"{v:.4g}", (i, v), ha="center", va="bottom", fontsize=6)
            ax.set_xticks(range(len(cs)))
            ax.set_xticklabels(cs, rotation=45, ha="right", fontsize=7)
            ax.set_title(label, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "fidelity.png", dpi=110)
        plt.close(fig)
        figs.append("fidelity.png")
    fig, ax = plt.subplots(figsize=(11, 3.6))
    dims = [*VB.DIMENSIONS, "average"]
    width = 0.8 / max(len(names), 1)
    for i, c in enumerate(names):
        ax.bar(np.arange(len(dims)) + i * width, [rows[c]["vbench_style"][d] for d in dims], width, label=c)
    ax.set_xticks(np.arange(len(dims)) + 0.4 - width / 2)
    ax.set_xticklabels(dims, fontsize=8)
    all_vals = [rows[c]["vbench_style"][d] for c in names for d in dims]
    ax.set_ylim(max(0.0, min(all_vals) - 0.05), min(1.0, max(all_vals) + 0.02))
    ax.legend(fontsize=7, ncol=5)
    ax.set_title("VBench-style dimensions (higher is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "vbench_style.png", dpi=110)
    plt.close(fig)
    figs.append("vbench_style.png")
    per_config = {c: rows[c]["layer_errors"] for c in q if rows[c].get("layer_errors")}
    if per_config:
        LE.plot_config_comparison({c: [r for r in rs if r["layer"] != LE.EXPERT_OUTPUT] for c, rs in per_config.items()},
                                  out / "layer_errors.png")
        figs.append("layer_errors.png")
        _expert_bins_plot(per_config, out / "expert_output_bins.png")
        figs.append("expert_output_bins.png")
        last = "ours" if "ours" in per_config else list(per_config)[-1]
        LE.plot_layer_bin_heatmap(per_config[last], out / f"layer_bin_heatmap_{last}.png",
                                  f"{last}: relative output error per layer and timestep bin")
        figs.append(f"layer_bin_heatmap_{last}.png")
    for c in ("per_bin_clip", "shared_policy", "ours"):
        manifest = out / "checkpoints" / c / "manifest.json"
        if manifest.exists():
            clip_table_plot(json.loads(manifest.read_text()), out / f"clip_tables_{c}.png")
            figs.append(f"clip_tables_{c}.png")
    return figs


def _expert_bins_plot(per_config: dict[str, list[dict]], path: Path) -> None:
    experts = list(dict.fromkeys(r["expert"] for rs in per_config.values() for r in rs))
    fig, axes = plt.subplots(1, len(experts), figsize=(5 * len(experts), 3.4), squeeze=False)
    for ax, attr in zip(axes[0], experts):
        for c, rs in per_config.items():
            sel = sorted((r["bin"], r["rel_err"]) for r in rs if r["expert"] == attr and r["layer"] == LE.EXPERT_OUTPUT)
            if sel:
                ax.plot([b for b, _ in sel], [e for _, e in sel], marker="o", label=c)
        ax.set_yscale("log")
        bins = sorted({r["bin"] for rs in per_config.values() for r in rs if r["expert"] == attr})
        ax.set_xticks(bins)
        ax.set_xlabel("timestep bin (0 = the expert's noisiest steps)")
        ax.set_ylabel("rel. error of the expert output")
        ax.set_title(attr, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(out: Path, payload: dict, rows: dict[str, dict], evals, figures: list[str]) -> None:
    vids = out / "videos"
    names = [c for c in A.ALL_CONFIGS if c in rows]
    frames = {c: A.load_frames(out, c) for c in names}
    samples = []
    for i, s in enumerate(evals):
        videos = {"ground truth": f"videos/eval{i}_gt.mp4"}
        write_video(s.frames, out / videos["ground truth"])
        for c in names:
            rel = f"videos/eval{i}_{c}.mp4"
            write_video(frames[c][i], out / rel)
            videos[c] = rel
        metrics = {}
        for c in names:
            ps = rows[c]["per_sample"][i]
            if c != A.BASELINE:
                metrics[f"{c} PSNR vs bf16"] = ps["psnr_vs_bf16"]
        metrics["bf16 GT PSNR"] = rows[A.BASELINE]["per_sample"][i]["gt_psnr"]
        samples.append({"name": f"eval{i}", "prompt": s.prompt, "metrics": metrics, "videos": videos})
    summary = {"model": payload["model"], "baseline": payload["baseline"], **payload["settings"]}
    for r in payload["rows"]:
        summary[f"{r['config']}: PSNR/SSIM/VMAF vs bf16, GT PSNR, traj, VBench avg"] = (
            f"{_f(r.get('psnr_vs_bf16'))} / {_f(r.get('ssim_vs_bf16'), '.4f')} / {_f(r.get('vmaf_vs_bf16'), '.1f')}, "
            f"{_f(r['gt_psnr'])}, {_f(r['trajectory_err'])}, {_f(r['vbench_style_avg'], '.4f')}")
    write_report(out, "wanquant: testbed quality ablation", summary, samples, figures)
    del vids


TESTBEDS = ("plain", "outlier")


def testbed_weights(testbed: str, out: Path, weights: Path | None = None) -> Path | None:
    """The weights directory of a testbed: ``plain`` the committed (or ``weights``) one;
    ``outlier`` its AdaLN-transplanted copy (:mod:`wanquant.model.outliers`), written to
    ``OUT/testbed_outlier`` on first use."""
    if testbed == "plain":
        return weights
    if testbed != "outlier":
        raise ValueError(f"unknown testbed {testbed!r}; choose from {TESTBEDS}")
    from wanquant.model.outliers import write_outlier_testbed
    from wanquant.testbed import WEIGHTS_DIR

    dst = out / "testbed_outlier"
    if not (dst / "model_index.json").is_file():
        write_outlier_testbed(weights or WEIGHTS_DIR, dst, overwrite=dst.exists())
    return dst


# Workers first generate every 16-bit baseline (all others are measured against them),
# then share every other config.
WORKER_PHASES = ("baseline", "configs")


def run_workers(argv: list[str], n: int, out: Path) -> None:
    """Run ``n`` copies of this command as workers, phase by phase; their logs go to ``OUT/logs``."""
    import subprocess

    argv = [a for i, a in enumerate(argv) if a != "--workers" and (i == 0 or argv[i - 1] != "--workers")
            and not a.startswith("--workers=")]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for phase in WORKER_PHASES:
        t0 = time.perf_counter()
        procs = []
        for i in range(n):
            with open(logs / f"{phase}{i}-{os.getpid()}.log", "a") as f:
                procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.testbed_quality", *argv,
                                               "--worker-phase", phase], stdout=f, stderr=subprocess.STDOUT))
        while any(pr.poll() is None for pr in procs):
            time.sleep(30.0)
            done = len(list(out.glob("*/seed*/frames/*.npz")))
            log.info("workers (%s): %d running, %d video sets on disk, %.0f s", phase,
                     sum(pr.poll() is None for pr in procs), done, time.perf_counter() - t0)
        failed = [i for i, pr in enumerate(procs) if pr.returncode]
        if failed:
            raise RuntimeError(f"workers {failed} of phase {phase} failed; see {logs}/{phase}<i>-{os.getpid()}.log")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--testbed", nargs="+", default=["plain"], choices=TESTBEDS,
                   help="plain: the trained testbed; outlier: the same with massive AdaLN channels transplanted")
    p.add_argument("--calib-seeds", type=int, default=1, help="calibration seeds (disjoint calib samples each)")
    p.add_argument("--modelopt", nargs="*", default=None, choices=MO_ROWS, metavar="ROW",
                   help=f"add NVIDIA ModelOpt rows (all, or those named: {', '.join(MO_ROWS)}; needs "
                        "`pip install .[compare]`; skipped with a message otherwise)")
    p.add_argument("--stats-samples", type=int, default=2, help="calib samples for the activation statistics (0: none)")
    p.add_argument("--num-calib", type=int, default=8)
    p.add_argument("--num-eval", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--configs", nargs="*", default=None,
                   help=f"subset of {list(A.ALL_CONFIGS)} (default: {' '.join(A.ABLATION_ORDER)})")
    p.add_argument("--device", default="cpu", help="where videos are generated (cuda: the 16-bit model in bf16)")
    p.add_argument("--backend", default="reference", help="W4A4 backend of the quantized runs")
    p.add_argument("--generate-only", action="store_true", help="generate and cache videos, measure nothing")
    p.add_argument("--measure-only", action="store_true", help="measure videos already cached in --out")
    p.add_argument("--weights", type=Path, default=None, help="trained testbed directory (default: the committed one)")
    p.add_argument("--reservoir-tokens", type=int, default=4096, help="calibration tokens kept per bin and layer")
    p.add_argument("--layer-error-videos", type=int, default=2, help="eval videos with per-layer error recording")
    p.add_argument("--no-vmaf", action="store_true")
    p.add_argument("--no-brisque", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="recompute cached configs")
    p.add_argument("--no-results", action="store_true", help="do not write benchmarks/results files")
    p.add_argument("--results-name", default=NAME, help="benchmarks/results/NAME.{json,md} (a partial or side run)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny tensors: 1 is fastest)")
    p.add_argument("--note", default=None, help="a sentence for the results (e.g. how the videos were made)")
    p.add_argument("--missing-ok", action="store_true",
                   help="with --measure-only: leave out configs that were never generated (a run that ended early)")
    p.add_argument("--no-shuffled-prompts", action="store_true", help="skip the 16-bit row with deranged prompts")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes that share the configs (a GPU runs many small models at once); "
                        "this process then measures and combines")
    p.add_argument("--worker-phase", choices=WORKER_PHASES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.workers > 1 and args.worker_phase is None:
        for tb in args.testbed:  # written once, before the workers read it
            testbed_weights(tb, args.out, args.weights)
        run_workers(list(sys.argv[1:] if argv is None else argv), args.workers, args.out)
        if args.generate_only:
            return 0
        args.measure_only = True
    baseline_phase = args.worker_phase == "baseline"
    per: dict[str, list[dict]] = {}
    for tb in args.testbed:
        weights = testbed_weights(tb, args.out, args.weights)
        for k in range(args.calib_seeds):
            payload = run_quality(args.out / tb / f"seed{k}", args.num_calib, args.num_eval, args.steps,
                                  args.guidance, [A.BASELINE] if baseline_phase else args.configs, args.device,
                                  not args.no_vmaf, not args.no_brisque,
                                  args.overwrite, None, generate=not args.measure_only,
                                  measure=not (args.generate_only or baseline_phase), backend=args.backend,
                                  weights=weights, reservoir_tokens=args.reservoir_tokens,
                                  layer_error_videos=args.layer_error_videos,
                                  calib_seed=k, testbed=tb, write_videos=False, plots=False,
                                  modelopt_rows=() if args.modelopt is None or baseline_phase
                                  else tuple(args.modelopt or MO_ROWS),
                                  worker=args.worker_phase is not None,
                                  shuffled_prompts=not args.no_shuffled_prompts, missing_ok=args.missing_ok)
            if payload:
                per.setdefault(tb, []).append(payload)
    if per:
        from benchmarks.quality import combine as C

        from benchmarks.outlier_stats import testbed_stats

        stats = {tb: testbed_stats(testbed_weights(tb, args.out, args.weights), args.stats_samples, args.steps,
                                   args.guidance) for tb in per} if args.stats_samples else {}
        meta = run_metadata(" ".join(["python -m benchmarks.testbed_quality", *(argv or [])])
                            if argv is not None else None)
        meta["device"] = per[next(iter(per))][0]["device"]  # says where the videos were generated
        combined = C.combine(per, meta, stats)
        md = C.markdown(combined)
        if args.note:
            combined["note"] = args.note
            md = f"> {args.note}\n\n{md}"
        if not args.no_results:
            write_results(args.results_name, combined, md, RESULTS_DIR)
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
