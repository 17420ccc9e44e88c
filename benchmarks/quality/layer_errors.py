"""Per-layer, per-timestep-bin output error of each expert: quantized vs 16-bit, in a real run.

:class:`LayerErrorRecorder` hooks every :class:`~wanquant.runtime.linear.W4A4Linear` of
a quantized pipeline and, for each call during a generation, feeds the *same input* to
the 16-bit source layer (the reference pipeline's linears, fused the way the quantized
layer fuses them). It accumulates, per ``(expert, bin, layer)``,

    rel_err = sum |y_q - y_ref|^2 / sum |y_ref|^2        (biases left out on both sides)

so each layer's own error is isolated from the error it inherits from earlier layers (the
convention of the calibration report, here on the inputs the quantized model really
sees at inference). The same is done for each expert as a whole (``layer`` =
:data:`EXPERT_OUTPUT`): the 16-bit expert runs on the quantized expert's exact inputs at
every step, and the relative error of the noise prediction is recorded per bin.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from wanquant.model.wan import BLOCKS_ATTR, _group_of, experts_of  # noqa: E402
from wanquant.runtime.expert import quantized_layers  # noqa: E402

EXPERT_OUTPUT = "expert_output"


class LayerErrorRecorder:
    """Context manager: ``with LayerErrorRecorder(quant_pipe, ref_pipe) as rec: generate(...)``."""

    def __init__(self, quant_pipe, ref_pipe, expert_level: bool = True):
        self.quant_pipe, self.ref_pipe, self.expert_level = quant_pipe, ref_pipe, expert_level
        # (attr, bin, layer) -> [sum sq err, sum sq ref, calls]
        self.acc: dict[tuple[str, int, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        self.roles: dict[str, str] = {}
        self._handles: list = []

    # ---- hooks ------------------------------------------------------------------
    def __enter__(self) -> "LayerErrorRecorder":
        ref_experts = {e.attr: e.module for e in experts_of(self.ref_pipe)}
        for spec in experts_of(self.quant_pipe):
            qmodel, ref = spec.module, ref_experts.get(spec.attr)
            if ref is None:
                raise ValueError(f"the reference pipeline has no expert {spec.attr!r}")
            self.roles[spec.attr] = spec.role
            state = getattr(qmodel, "_wanquant_state", None)
            if state is None:
                raise ValueError(f"{spec.attr} is not a quantized expert (no runtime state)")
            for name, layer in quantized_layers(qmodel).items():
                w, b = _reference_weight(ref, name)
                self._handles.append(layer.register_forward_hook(self._layer_hook(spec.attr, name, state, w)))
            if self.expert_level:
                self._handles.append(qmodel.register_forward_hook(self._expert_hook(spec.attr, state, ref),
                                                                  with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _layer_hook(self, attr: str, name: str, state, w: torch.Tensor):
        def hook(module, args, output):
            x = args[0]
            with torch.no_grad():
                y_ref = x.to(w.dtype) @ w.T
                y_q = output.to(w.dtype)
                if module.bias is not None:
                    y_q = y_q - module.bias.to(w.dtype)
                self._add(attr, state.bin_index, name, y_q, y_ref)
        return hook

    def _expert_hook(self, attr: str, state, ref):
        def hook(module, args, kwargs, output):
            with torch.no_grad():
                ref_out = ref(*args, **kwargs)
            self._add(attr, state.bin_index, EXPERT_OUTPUT, _first(output).float(), _first(ref_out).float())
        return hook

    def _add(self, attr: str, b: int, name: str, y_q: torch.Tensor, y_ref: torch.Tensor) -> None:
        a = self.acc[(attr, int(b), name)]
        a[0] += float((y_q.double() - y_ref.double()).square().sum())
        a[1] += float(y_ref.double().square().sum())
        a[2] += 1

    # ---- results ------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """One row per (expert, bin, layer): ``rel_err`` and the number of calls."""
        out = []
        for (attr, b, name), (num, den, calls) in sorted(self.acc.items(), key=lambda kv: _sort_key(kv[0])):
            out.append({"expert": attr, "role": self.roles.get(attr, "?"), "bin": b, "layer": name,
                        "rel_err": num / den if den > 0 else 0.0, "calls": calls})
        return out


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def _reference_weight(ref_model, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused fp32 weight (and bias) of the 16-bit linears a quantized layer replaces."""
    group = _group_of(name)
    block = name[: -len(group.name) - 1]
    members = [ref_model.get_submodule(f"{block}.{m}") for m in group.members]
    w = torch.cat([m.weight.detach().float() for m in members], dim=0)
    b = torch.cat([m.bias.detach().float() for m in members], dim=0) if members[0].bias is not None else None
    return w, b


def _sort_key(key: tuple[str, int, str]):
    attr, b, name = key
    if name == EXPERT_OUTPUT:
        return (attr, b, 10**6, "")
    parts = name.split(".")
    block = int(parts[1]) if parts[0] == BLOCKS_ATTR and parts[1].isdigit() else 10**5
    return (attr, b, block, name)


def summarize(rows: list[dict]) -> dict:
    """Mean layer error per expert and bin (layers only) and the expert-output error per bin."""
    out: dict = {}
    for attr in dict.fromkeys(r["expert"] for r in rows):
        mine = [r for r in rows if r["expert"] == attr]
        bins = sorted({r["bin"] for r in mine})
        out[attr] = {
            "role": mine[0]["role"],
            "mean_layer_rel_err_per_bin": {b: float(np.mean([r["rel_err"] for r in mine
                                                            if r["bin"] == b and r["layer"] != EXPERT_OUTPUT]))
                                           for b in bins},
            "expert_output_rel_err_per_bin": {b: r["rel_err"] for r in mine if r["layer"] == EXPERT_OUTPUT
                                              for b in [r["bin"]]},
        }
    return out


# --------------------------------------------------------------------------- plots


def plot_layer_bin_heatmap(rows: list[dict], path: Path, title: str = "") -> Path:
    """log10 relative error, layers x bins, one panel per expert."""
    experts = list(dict.fromkeys(r["expert"] for r in rows))
    fig, axes = plt.subplots(1, len(experts), figsize=(4.2 * len(experts), 6), squeeze=False)
    for ax, attr in zip(axes[0], experts):
        mine = [r for r in rows if r["expert"] == attr]
        layers = list(dict.fromkeys(r["layer"] for r in mine))
        bins = sorted({r["bin"] for r in mine})
        grid = np.full((len(layers), len(bins)), np.nan)
        for r in mine:
            grid[layers.index(r["layer"]), bins.index(r["bin"])] = np.log10(max(r["rel_err"], 1e-12))
        im = ax.imshow(grid, aspect="auto", cmap="magma")
        ax.set_title(f"{attr} ({mine[0]['role']})", fontsize=9)
        ax.set_xticks(range(len(bins)))
        ax.set_xticklabels([str(b) for b in bins])
        ax.set_xlabel("timestep bin")
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([n.replace("blocks.", "b") for n in layers], fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046, label="log10 rel. error")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_config_comparison(per_config: dict[str, list[dict]], path: Path) -> Path:
    """Per layer (bins averaged by calls), relative error of each config; one panel per expert."""
    experts = list(dict.fromkeys(r["expert"] for rows in per_config.values() for r in rows))
    fig, axes = plt.subplots(len(experts), 1, figsize=(11, 3.2 * len(experts)), squeeze=False)
    for ax, attr in zip(axes[:, 0], experts):
        layers: list[str] = []
        for rows in per_config.values():
            for r in rows:
                if r["expert"] == attr and r["layer"] not in layers:
                    layers.append(r["layer"])
        for cname, rows in per_config.items():
            vals = []
            for layer in layers:
                sel = [r for r in rows if r["expert"] == attr and r["layer"] == layer]
                n = sum(r["calls"] for r in sel)
                vals.append(sum(r["rel_err"] * r["calls"] for r in sel) / n if n else np.nan)
            ax.plot(range(len(layers)), vals, marker="o", ms=3, lw=1, label=cname)
        ax.set_yscale("log")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([n.replace("blocks.", "b") for n in layers], rotation=90, fontsize=6)
        ax.set_ylabel("rel. output error")
        ax.set_title(f"{attr}: per-layer relative output error during generation (same inputs)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
