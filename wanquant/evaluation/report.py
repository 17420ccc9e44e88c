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
    diff = np.abs(to_uint8(a).astype(np.float32) - to_uint8(b).astype(np.float32)).mean(axis=(0, 3))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.2, 3))
    im = ax.imshow(diff, cmap="magma", vmin=0)
    ax.set_axis_off()
    ax.set_title("|W4A4 - baseline|, mean over frames", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
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
        ax.set_ylabel("rel. error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def clip_table_plot(manifest: dict, path: Path) -> Path:
    """Chosen clip ratio per layer and timestep bin, one panel per expert."""
    experts = manifest["experts"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(experts), figsize=(4.5 * len(experts), 4), squeeze=False)
    for ax, (attr, info) in zip(axes[0], experts.items()):
        names = list(info["layers"])
        table = np.array([[c for c, _ in info["layers"][n].get("clip_table", [[1.0, 0]])] for n in names],
                         dtype=float)
        im = ax.imshow(table, aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0)
        ax.set_title(f"{attr} ({info['role']}): clip ratio", fontsize=9)
        ax.set_xlabel("timestep bin")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([n.replace("blocks.", "b") for n in names], fontsize=5)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, title: str, summary: dict, samples: list[dict], figures: list[str]) -> Path:
    """``report.json`` and ``report.html``; ``samples`` rows name their video/image files."""
    write_json(out / "report.json", {"title": title, "summary": summary, "samples": samples, "figures": figures})
    rows = []
    for s in samples:
        metrics = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in s["metrics"].items())
        vids = "".join(
            f"<figure><video src='{html.escape(v)}' autoplay loop muted playsinline width='256'></video>"
            f"<figcaption>{html.escape(label)}</figcaption></figure>" for label, v in s["videos"].items())
        imgs = "".join(f"<figure><img src='{html.escape(v)}' height='256'><figcaption>{html.escape(label)}"
                       f"</figcaption></figure>" for label, v in s.get("images", {}).items())
        rows.append(f"<section><h3>{html.escape(s['name'])}: {html.escape(s['prompt'])}</h3>"
                    f"<p>{html.escape(metrics)}</p><div class='row'>{vids}{imgs}</div></section>")
    summary_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                           for k, v in summary.items())
    figs = "".join(f"<img src='{html.escape(f)}' style='max-width:100%'>" for f in figures)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} .row{{display:flex;gap:1em;flex-wrap:wrap}}
figure{{margin:0}} video,img{{image-rendering:pixelated;border:1px solid #ccc}} td,th{{padding:2px 8px;text-align:left}}</style>
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
