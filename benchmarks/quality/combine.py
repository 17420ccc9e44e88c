"""Issue 17's result layout: testbeds x calibration seeds combined, paired errors, bars.

:func:`combine` takes the per-seed payloads of :func:`benchmarks.testbed_quality.run_quality`
for each testbed and returns::

    {"device", "date", "commit", "command",
     "testbeds": [{"testbed", "videos", "steps", "calib_seeds", "activation_stats",
                   "rows": [{"config", "scale_rule", "psnr_vs_16bit", "psnr_se", "ssim", "gt_psnr",
                             "vbench_style_avg", ...}],
                   "components": [...], "bars": {...}}]}

Per video, a config's metric is the mean over calibration seeds; ``psnr_se`` is the
standard error of the row's mean over the videos, a component's ``delta_se`` the standard
error of the paired per-video differences (so video-to-video spread cancels). A run that
ended early may hold a row for fewer seeds than another: comparisons then pair the two
rows on the seeds both have (``seeds`` in each comparison).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from benchmarks.quality import ablation as A

# The rows the issue's bars speak of: the presets (current and with the safe_ceil rule).
PRESET_ROWS = ("ours", "ours_safe_ceil")
# For each preset row: (component name, row with it, row without it).
KEPT_COMPONENTS = {
    "ours_safe_ceil": (("smoothing", "ours_safe_ceil", "ours_safe_ceil_no_smooth"),
                       ("low-rank", "ours_safe_ceil", "ours_safe_ceil_rank0"),
                       ("GPTQ", "ours_safe_ceil", "ours_safe_ceil_no_gptq"),
                       ("global clip", "ours_safe_ceil_global_clip", "ours_safe_ceil_no_clip"),
                       ("per-bin clip", "ours_safe_ceil", "ours_safe_ceil_global_clip"),
                       ("per-expert policy", "ours_safe_ceil", "ours_safe_ceil_shared_policy")),
    # The preset as it is (one clip setting per layer and expert): each kept component removed alone.
    "ours": (("smoothing", "ours", "ours_no_smooth"), ("low-rank", "ours", "ours_rank0"),
             ("GPTQ", "ours", "ours_no_gptq"), ("global clip", "ours", "ours_no_clip"),
             ("per-expert policy", "ours", "ours_shared_policy")),
}
OUTSIDE_PAIRS = (("ours", "modelopt_svdquant"), ("ours_safe_ceil", "modelopt_svdquant"),
                 ("rtn_safe_ceil", "modelopt_mxfp4_rtn"), ("rtn", "modelopt_mxfp4_rtn"))
METRICS = ("psnr_vs_bf16", "ssim_vs_bf16", "gt_psnr", "trajectory_err")


def se(values) -> float | None:
    """Standard error of the mean (None for fewer than 2 finite values)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None


def per_video(rows_by_seed: list[dict], metric: str) -> np.ndarray:
    """``[videos]``: a row's per-video ``metric`` averaged over calibration seeds."""
    vals = []
    for r in rows_by_seed:
        if metric == "vbench_style_avg":
            vals.append([p["vbench_style"]["average"] for p in r["per_sample"]])
        else:
            vals.append([np.nan if p.get(metric) is None else p[metric] for p in r["per_sample"]])
    if not vals:
        return np.zeros(0)
    with warnings.catch_warnings():  # all-NaN columns (the 16-bit row's PSNR vs itself) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(vals, dtype=np.float64), axis=0)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def combine_rows(seed_payloads: list[dict], extra_rows: list[dict] = ()) -> dict[str, dict]:
    """Config -> the combined row (per-video seed means kept in ``per_video``, per seed in
    ``per_video_by_seed``)."""
    by_config: dict[str, list[dict]] = {}
    seeds_of: dict[str, list[int]] = {}
    for i, p in enumerate(seed_payloads):
        for r in p["rows"]:
            by_config.setdefault(r["config"], []).append(r)
            seeds_of.setdefault(r["config"], []).append(int(p.get("calib_seed", i)))
    for r in extra_rows:
        by_config.setdefault(r["config"], []).append(r)
        seeds_of.setdefault(r["config"], []).append(-1)
    cfgs = A.ablation_configs()
    out = {}
    for name, rs in by_config.items():
        pv = {m: per_video(rs, m) for m in (*METRICS, "vbench_style_avg")}
        if name == A.BASELINE:
            pv["psnr_vs_bf16"] = pv["ssim_vs_bf16"] = np.full(len(pv["gt_psnr"]), np.nan)
        psnr = pv["psnr_vs_bf16"]
        seeds_mean = [float(np.nanmean([p.get("psnr_vs_bf16", np.nan) or np.nan for p in r["per_sample"]]))
                      for r in rs] if name != A.BASELINE else []
        out[name] = {
            "config": "16-bit" if name == A.BASELINE else name,
            "scale_rule": rs[0].get("scale_rule") or (rs[0].get("switches") or {}).get("scale_rule")
            or (A.scale_rule(cfgs[name]) if name in cfgs else None),
            "switches": A.short_switches(cfgs[name]) if name in cfgs else rs[0].get("describe", ""),
            "psnr_vs_16bit": _finite(np.nanmean(psnr)) if name != A.BASELINE else None,
            "psnr_se": se(psnr) if name != A.BASELINE else None,
            "psnr_seed_sd": float(np.std(seeds_mean, ddof=1)) if len(seeds_mean) > 1 else None,
            "ssim": _finite(np.nanmean(pv["ssim_vs_bf16"])) if name != A.BASELINE else None,
            "gt_psnr": _finite(np.nanmean(pv["gt_psnr"])),
            "trajectory_err": _finite(np.nanmean(pv["trajectory_err"])),
            "vbench_style_avg": _finite(np.nanmean(pv["vbench_style_avg"])),
            "seeds": len(rs),
            "calibration_seconds": _finite(np.mean([r.get("seconds", {}).get("calibrate_quantize", np.nan)
                                                    for r in rs])),
            "per_video": {m: [_finite(x) for x in v] for m, v in pv.items()},
            "per_video_by_seed": {m: {str(k): [_finite(x) for x in per_video([r], m)]
                                      for k, r in zip(seeds_of[name], rs)} for m in METRICS},
            "outside": rs[0].get("outside"),
        }
    return out


def paired(rows: dict[str, dict], new: str, old: str, metric: str = "psnr_vs_bf16") -> dict | None:
    """``new`` minus ``old`` on ``metric``: mean of paired per-video differences, its SE, wins."""
    if new not in rows or old not in rows:
        return None
    by_a, by_b = (rows[n].get("per_video_by_seed", {}).get(metric) for n in (new, old))
    if by_a and by_b:  # per seed: pair on the seeds both rows have
        common = sorted(set(by_a) & set(by_b), key=int)
        if not common:
            return None
        a, b = (np.nanmean(np.asarray([by[k] for k in common], dtype=np.float64), axis=0) for by in (by_a, by_b))
    else:
        common = []
        a = np.asarray(rows[new]["per_video"][metric], dtype=np.float64)
        b = np.asarray(rows[old]["per_video"][metric], dtype=np.float64)
    d = a - b
    ok = np.isfinite(d)
    s = se(d[ok])
    mean = float(d[ok].mean()) if ok.any() else float("nan")
    return {"component": f"{new} vs {old}", "metric": metric, "delta": mean, "delta_se": s,
            "seeds": len(common) if common else min(rows[new].get("seeds", 1), rows[old].get("seeds", 1)),
            "wins": f"{int((d[ok] > 0).sum())}/{int(ok.sum())}",
            "over_2se": bool(s is not None and mean > 2 * s)}


def bars(rows: dict[str, dict], preset: str) -> dict:
    """The issue's bars for ``preset``: GT-PSNR loss <= 1/4 of RTN's, >= 1 dB over ModelOpt's
    SVDQuant-lite, every kept component helps by more than twice its SE."""
    if preset not in rows:
        return {}
    out: dict = {}
    base, rtn = rows.get(A.BASELINE), rows.get("rtn_safe_ceil" if "safe_ceil" in preset else "rtn")
    if base and rtn:
        lo, lr = base["gt_psnr"] - rows[preset]["gt_psnr"], base["gt_psnr"] - rtn["gt_psnr"]
        out["gt_psnr_loss"] = {"preset": lo, "rtn": lr, "rtn_row": rtn["config"],
                               "met": bool(lo <= 0.25 * lr if lr > 0 else lo <= 0)}
    d = paired(rows, preset, "modelopt_svdquant")
    if d:
        out["vs_modelopt_svdquant"] = {**d, "bar_db": 1.0, "met": d["delta"] >= 1.0}
    comps = []
    for name, with_, without in KEPT_COMPONENTS.get(preset, ()):
        d = paired(rows, with_, without)
        if d:
            comps.append({"name": name, **d})
    if comps:
        out["components"] = comps
        out["all_components_over_2se"] = all(c["over_2se"] for c in comps)
    return out


def combine(per: dict[str, list[dict]], meta: dict, stats: dict[str, dict] | None = None,
            extra: dict[str, list[dict]] | None = None) -> dict:
    """The issue's JSON from per-testbed lists of per-seed payloads (and extra rows per testbed)."""
    testbeds = []
    for tb, payloads in per.items():
        rows = combine_rows(payloads, (extra or {}).get(tb, []))
        s = payloads[0]["settings"]
        ordered = [rows[c] for c in (*A.ALL_CONFIGS, *sorted(set(rows) - set(A.ALL_CONFIGS))) if c in rows]
        comps = [c for c in (paired(rows, n, o) for n, o in (*A.LADDER, *OUTSIDE_PAIRS)) if c]
        testbeds.append({
            "testbed": tb, "model": payloads[0].get("model"), "videos": s["eval_samples"], "steps": s["steps"],
            "calib_seeds": len(payloads), "calibration_samples": s["calibration_samples"],
            "guidance_scale": s["guidance_scale"], "frames": s["frames"], "size": s["size"],
            "activation_stats": (stats or {}).get(tb),
            "rows": ordered, "components": comps,
            "bars": {p: bars(rows, p) for p in PRESET_ROWS if p in rows},
            "generated_on": payloads[0].get("generated_on"),
        })
    return {**meta, "testbeds": testbeds}


def _f(v, fmt: str = ".2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def markdown(p: dict) -> str:
    """Activation statistics side by side, then per testbed: rows, components, bars."""
    from benchmarks.outlier_stats import markdown_summary

    lines: list[str] = []
    stats = {t["testbed"]: t["activation_stats"] for t in p["testbeds"] if t.get("activation_stats")}
    if stats:
        lines += ["## Activation statistics (inputs of every block linear, 16-bit model)", "",
                  *markdown_summary(stats), ""]
    for t in p["testbeds"]:
        lines += [f"## Testbed `{t['testbed']}`", "",
                  f"{t['model']}; {t['videos']} eval videos (seeds 0..{t['videos'] - 1}), {t['steps']} steps, guidance "
                  f"{t['guidance_scale']}, {t['frames']} frames at {t['size'][0]}x{t['size'][1]}; "
                  f"{t['calib_seeds']} calibration seed(s) x {t['calibration_samples']} calib samples.", "",
                  "| config | scale rule | switches | PSNR vs 16-bit (dB) +- SE | SSIM | GT PSNR (dB) | traj err (px) "
                  "| VBench-style avg | calib s | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            ps = "n/a" if r["psnr_vs_16bit"] is None else f"{r['psnr_vs_16bit']:.2f} +- {_f(r['psnr_se'])}"
            lines.append(f"| {r['config']} | {r['scale_rule'] or '16-bit'} | {r['switches']} | {ps} | "
                         f"{_f(r['ssim'], '.4f')} | {_f(r['gt_psnr'])} | {_f(r['trajectory_err'])} | "
                         f"{_f(r['vbench_style_avg'], '.4f')} | {_f(r['calibration_seconds'], '.0f')} | "
                         f"{r.get('seeds', '')} |")
        if t["components"]:
            lines += ["", "Paired per-video differences (PSNR vs 16-bit; +- = SE of the paired differences; "
                          "wins = videos where the first row is better; seeds = calibration seeds both rows have):",
                      "", "| comparison | delta (dB) | wins | > 2 SE | seeds |", "|---|---|---|---|---|"]
            for c in t["components"]:
                lines.append(f"| {c['component']} | {c['delta']:+.2f} +- {_f(c['delta_se'])} | {c['wins']} | "
                             f"{'yes' if c['over_2se'] else 'no'} | {c.get('seeds', '')} |")
        for preset, b in t["bars"].items():
            if not b:
                continue
            lines += ["", f"Bars for `{preset}`:", ""]
            if "gt_psnr_loss" in b:
                g = b["gt_psnr_loss"]
                lines.append(f"- GT-PSNR loss {g['preset']:+.3f} dB vs {g['rtn_row']} {g['rtn']:+.3f} dB "
                             f"(bar <= a quarter): {'met' if g['met'] else 'NOT met'}")
            if "vs_modelopt_svdquant" in b:
                m = b["vs_modelopt_svdquant"]
                lines.append(f"- vs ModelOpt SVDQuant-lite: {m['delta']:+.2f} +- {_f(m['delta_se'])} dB (bar >= 1 dB): "
                             f"{'met' if m['met'] else 'NOT met'}")
            for c in b.get("components", []):
                lines.append(f"- {c['name']} ({c['component']}): {c['delta']:+.2f} +- {_f(c['delta_se'])} dB, "
                             f"{'> 2 SE' if c['over_2se'] else 'NOT > 2 SE'}")
        lines.append("")
    return "\n".join(lines)


__all__ = ["combine", "combine_rows", "paired", "bars", "markdown", "se", "per_video"]
