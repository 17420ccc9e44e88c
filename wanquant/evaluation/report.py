"""Report pages: videos side by side, error maps, per-layer error plots, as HTML + JSON.

Plots need matplotlib (the ``eval`` extra); it is imported when a plot is drawn.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from wanquant.media import to_uint8


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def error_map(a, b, path: Path) -> Path:
    """Mean absolute difference over frames and channels, as a heat map PNG."""
    return _save(error_map_figure(a, b), path, dpi=120, bbox_inches="tight")


def error_map_figure(a, b):
    """The heat map of :func:`error_map`; its colour bar is in 8-bit levels (0-255)."""
    diff = np.abs(to_uint8(a).astype(np.float32) - to_uint8(b).astype(np.float32)).mean(axis=(0, 3))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.2, 3))
    im = ax.imshow(diff, cmap="magma", vmin=0)
    ax.set_axis_off()
    ax.set_title("|W4A4 - baseline|, mean over frames", fontsize=8)
    bar = fig.colorbar(im, ax=ax, fraction=0.046)
    bar.set_label("mean |difference| (8-bit levels, of 255)", fontsize=7)
    return fig


def _save(fig, path: Path, **kwargs) -> Path:
    fig.savefig(path, **kwargs)
    _pyplot().close(fig)
    return path


def layer_error_plot(manifest: dict, path: Path) -> Path:
    """Per-layer relative output error of each expert (from the quantization reports)."""
    experts = manifest["experts"]
    plt = _pyplot()
    fig, axes = plt.subplots(len(experts), 1, figsize=(10, 2.6 * len(experts)), squeeze=False)
    for ax, (attr, info) in zip(axes[:, 0], experts.items()):
        names = list(info["layers"])
        errs = [info["layers"][n].get("report", {}).get("final", {}).get("rel_err") or np.nan for n in names]
        ax.bar(range(len(names)), errs, color="tab:blue" if info["role"] != "low" else "tab:orange")
        ax.set_title(f"{attr} ({info['role']}-noise expert): relative output error per layer", fontsize=9)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("blocks.", "b") for n in names], rotation=90, fontsize=6)
        ax.set_ylabel("rel. error\n(sum dy^2 / sum y^2)", fontsize=7)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def clip_table_plot(manifest: dict, path: Path) -> Path:
    """Chosen clip ratio and MX exponent offset per layer and timestep bin, per expert."""
    fig = clip_table_figure(manifest)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def clip_table_figure(manifest: dict):
    """Two panels per expert: the clip ratio (x group absmax) and the exponent offset (scale x 2^offset)."""
    experts = manifest["experts"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 * len(experts), figsize=(4.5 * 2 * len(experts), 4), squeeze=False)
    panels = (("clip ratio", "x group absmax", 0, "viridis", 0.5, 1.0),
              ("exponent offset", "scale x 2^offset", 1, "coolwarm", -1.0, 1.0))
    for i, (attr, info) in enumerate(experts.items()):
        names = list(info["layers"])
        table = np.array([info["layers"][n].get("clip_table") or [[1.0, 0.0]] for n in names], dtype=float)
        for j, (what, unit, col, cmap, lo, hi) in enumerate(panels):
            ax = axes[0, 2 * i + j]
            values = table[:, :, col]
            lo, hi = min(lo, values.min()), max(hi, values.max())
            im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(f"{attr} ({info['role']}): {what}", fontsize=9)
            ax.set_xlabel("timestep bin")
            ax.set_xticks(range(table.shape[1]))
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels([n.replace("blocks.", "b") for n in names], fontsize=5)
            bar = fig.colorbar(im, ax=ax, fraction=0.046)
            bar.set_label(f"{what} ({unit})", fontsize=7)
            if col == 1:  # offsets are whole binades
                bar.set_ticks(np.arange(np.floor(lo), np.ceil(hi) + 1))
    return fig


# Readable labels of the metric keys the demo and benchmarks write.
METRIC_LABELS = {
    "psnr_w4a4_vs_baseline_db": "PSNR W4A4 vs baseline (dB)",
    "gt_psnr_baseline_db": "PSNR vs ground truth, baseline (dB)",
    "gt_psnr_w4a4_db": "PSNR vs ground truth, W4A4 (dB)",
    "traj_err_baseline_px": "trajectory error, baseline (px)",
    "traj_err_w4a4_px": "trajectory error, W4A4 (px)",
    "ssim": "SSIM",
    "vmaf": "VMAF",
}


def metric_label(key: str) -> str:
    """A metric key as a reader wants it: a known label, else the key in words with its unit."""
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    words = key.split("_")
    unit = {"db": "dB", "px": "px", "s": "s", "pct": "%"}.get(words[-1]) if len(words) > 1 else None
    text = " ".join(w.upper() if w in ("psnr", "ssim", "vmaf", "gt") else w for w in (words[:-1] if unit else words))
    return f"{text} ({unit})" if unit else text


def write_report(out: Path, title: str, summary: dict, samples: list[dict], figures: list[str]) -> Path:
    """``report.json`` and ``report.html``; ``samples`` rows name their video/image files."""
    write_json(out / "report.json", {"title": title, "summary": summary, "samples": samples, "figures": figures})
    rows = []
    for s in samples:
        metrics = "".join(f"<li>{html.escape(metric_label(k))}: {html.escape(_fmt(v))}</li>"
                          for k, v in s["metrics"].items())
        vids = "".join(
            f"<figure><video src='{html.escape(v)}' controls autoplay loop muted playsinline></video>"
            f"<figcaption>{html.escape(label)}</figcaption></figure>" for label, v in s["videos"].items())
        imgs = "".join(f"<figure><img src='{html.escape(v)}' alt='{html.escape(label)}'><figcaption>"
                       f"{html.escape(label)}</figcaption></figure>" for label, v in s.get("images", {}).items())
        strips = "".join(f"<figure class='strip'><img src='{html.escape(v)}' alt='{html.escape(label)}'>"
                         f"<figcaption>{html.escape(label)}</figcaption></figure>"
                         for label, v in s.get("strips", {}).items())
        rows.append(f"<section><h3>{html.escape(s['name'])}: {html.escape(s['prompt'])}</h3>"
                    f"<ul class='metrics'>{metrics}</ul><div class='row'>{vids}{imgs}</div>{strips}</section>")
    summary_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                           for k, v in summary.items())
    figs = "".join(f"<img class='figure' src='{html.escape(f)}' alt='{html.escape(f)}'>" for f in figures)
    # Everything scales down to the page width: videos and images never exceed their
    # column, frame strips take the full width at their own aspect ratio.
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;margin:2em auto;padding:0 1em;max-width:1200px}}
.row{{display:flex;gap:1em;flex-wrap:wrap}} .row figure{{flex:1 1 200px;max-width:320px}}
figure{{margin:0 0 1em 0}} video,img{{display:block;max-width:100%;height:auto;image-rendering:pixelated;
border:1px solid #ccc}} .row video,.row img{{width:100%}} figure.strip img{{width:100%}}
.metrics{{columns:2;font-size:0.9em}} td,th{{padding:2px 8px;text-align:left}}</style>
</head><body><h1>{html.escape(title)}</h1><table>{summary_rows}</table>{''.join(rows)}<h2>Per-layer view</h2>{figs}
</body></html>"""
    tmp = out / "report.html.tmp"
    tmp.write_text(page)
    os.replace(tmp, out / "report.html")
    return out / "report.html"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
