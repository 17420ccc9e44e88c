"""benchmarks.common: result files and their metadata, tensor comparison, seeded inputs, the
random-weight A14B builder (at toy size) and the stage meter (CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks.common import meta
from benchmarks.common.a14b import TINY_EXPERT, build_expert, materialize_
from benchmarks.common.compare import saved_difference, tensor_difference
from benchmarks.common.inputs import random_calib_samples, random_image
from benchmarks.common.meters import ForwardTimer, Meter
from wanquant.method.config import wanquant_preset
from wanquant.runtime.linear import W4A4Linear


def test_results_carry_their_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("WANQUANT_COMMIT", "abc123")  # a copied tree's commit wins over git's
    jpath, mpath = meta.write_results("probe", {"rows": [1, 2]}, "| a |\n|---|", results_dir=tmp_path)
    data = json.loads(jpath.read_text())
    assert data["commit"] == "abc123" and data["rows"] == [1, 2]
    assert {"device", "date", "command"} <= set(data)
    text = mpath.read_text()
    assert text.startswith("# probe\n") and "- commit: `abc123`" in text and text.rstrip().endswith("|---|")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.json", "probe.md"]  # no temporary left behind
    assert meta.RESULTS_DIR == meta.BENCHMARKS_DIR / "results" and (meta.REPO_ROOT / "benchmarks").is_dir()


def test_tensor_difference_known_values(tmp_path):
    x = torch.tensor([1.0, -2.0, 2.0, 0.0])
    y = x + torch.tensor([0.0, 0.0, 0.0, 1.0])
    d = tensor_difference(x, y)
    assert d["max_abs"] == 1.0 and d["finite"]
    assert d["rel_l2"] == pytest.approx(math.sqrt(0.25 / 2.25))
    assert d["psnr_db"] == pytest.approx(10 * math.log10(4.0 / 0.25))
    assert tensor_difference(x, x)["psnr_db"] == math.inf
    assert "error" in tensor_difference(x, x[:2])
    torch.save(x, tmp_path / "a.pt")
    torch.save(y, tmp_path / "b.pt")
    assert saved_difference(tmp_path / "a.pt", tmp_path / "b.pt") == d
    assert saved_difference(tmp_path / "a.pt", tmp_path / "missing.pt") is None


def test_random_inputs_are_seeded():
    a, b = random_calib_samples(2, 16, 24), random_calib_samples(2, 16, 24)
    assert [s.prompt for s in a] == [s.prompt for s in b] and [s.seed for s in a] == [1000, 1001]
    assert a[0].image.size == (24, 16) and np.array_equal(np.asarray(a[0].image), np.asarray(b[0].image))
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(a[1].image))
    # The first calibration image is the image the generation rows use.
    assert np.array_equal(np.asarray(random_image(16, 24)), np.asarray(a[0].image))


def test_random_quantized_expert_has_no_16bit_block_linears():
    torch.manual_seed(0)
    model = build_expert(TINY_EXPERT, True, torch.device("cpu"), wanquant_preset())
    layers = [m for m in model.modules() if isinstance(m, W4A4Linear)]
    assert layers and all(m.qweight.dtype == torch.uint8 and m.num_bins == 3 for m in layers)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    # Block linears are all quantized; what stays 16-bit is outside the blocks.
    assert not any(isinstance(m, torch.nn.Linear) for m in model.blocks.modules())
    assert {p.dtype for p in model.parameters()} <= {torch.bfloat16, torch.float32}


def test_materialize_keeps_ties_and_initialises_norms():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    model[0].bias = None
    model.register_parameter("tied", model[0].weight)
    materialize_(model, torch.device("cpu"), lambda name: torch.float32)
    assert model.tied is model[0].weight and not model[0].weight.is_meta
    assert torch.all(model[1].weight == 1) and torch.all(model[1].bias == 0)
    assert 0 < model[0].weight.std() < 1


class _Expert(torch.nn.Module):
    def forward(self, x, timestep):
        return x * 2


def test_forward_timer_switches_the_stage_and_pairs_forwards():
    meter = Meter(torch.device("cpu"))
    timer = ForwardTimer(meter)
    expert = _Expert()
    timer.attach(expert, "high")
    meter.enter("image_encoding")
    for t in (999.0, 999.0, 800.0):  # a cond + uncond pair, then one forward of the next step
        expert(torch.zeros(1, 4), timestep=torch.tensor([t]))
    meter.stop()
    timer.detach()
    expert(torch.zeros(1, 4), timestep=torch.tensor([1.0]))  # detached: not recorded
    assert list(meter.stages) == ["image_encoding", "denoising"]
    assert all(s["peak_allocated"] == 0 and s["seconds"] >= 0 for s in meter.stages.values())
    steps = timer.steps()
    assert [(s["expert"], s["timestep"], s["forwards"]) for s in steps] == [("high", 999.0, 2), ("high", 800.0, 1)]
    assert steps[0]["seconds"] == pytest.approx(sum(r["seconds"] for r in timer.records[:2]))
