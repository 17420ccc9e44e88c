"""benchmarks.quality: the ablation's config ladder, the VBench-style dimensions on videos with
known answers, and a smoke run of the quality benchmark on a tiny pipeline."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from benchmarks.quality import ablation as A
from benchmarks.quality import vbench_style as VB
from benchmarks.quality.layer_errors import EXPERT_OUTPUT, plot_layer_bin_heatmap
from conftest import TINY_SETTINGS, build_tiny_pipeline
from wanquant.method.config import paper_preset, wanquant_preset


def _diff(a, b) -> set[str]:
    """Top-level QuantConfig sections that differ between two configs."""
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def test_configs_are_the_documented_ladder():
    cfgs = A.ablation_configs()
    assert tuple(cfgs) == A.ALL_CONFIGS and A.ALL_CONFIGS[:len(A.ABLATION_ORDER)] == A.ABLATION_ORDER
    assert cfgs["bf16"] is None
    rtn = cfgs["rtn"]
    assert not rtn.smooth.enabled and rtn.lowrank.rank == 0 and not rtn.gptq.enabled and not rtn.clip.enabled
    # Each component row changes exactly one switch of the row before it.
    assert _diff(cfgs["smooth"], rtn) == {"smooth"} and cfgs["smooth"].smooth.alpha_grid == [0.5]
    assert _diff(cfgs["svdquant"], cfgs["smooth"]) == {"lowrank"} and cfgs["svdquant"].lowrank.rank == 16
    assert _diff(cfgs["gptq"], cfgs["svdquant"]) == {"gptq"} and cfgs["gptq"].gptq.enabled
    assert _diff(cfgs["global_clip"], cfgs["gptq"]) == {"clip"}
    assert cfgs["global_clip"].clip.enabled and not cfgs["global_clip"].clip.per_bin
    assert _diff(cfgs["per_bin_clip"], cfgs["global_clip"]) == {"clip"}
    assert cfgs["per_bin_clip"] == paper_preset()
    shared = cfgs["shared_policy"]
    assert _diff(shared, cfgs["per_bin_clip"]) == {"clip"} and not shared.clip.per_expert and shared.clip.per_bin
    assert cfgs["ours"] == wanquant_preset()
    # Same formats and bins everywhere: only the method's switches move.
    assert _diff(cfgs["ours_rank16"], cfgs["ours"]) == {"lowrank"} and cfgs["ours_rank16"].lowrank.rank == 16
    narrow = cfgs["ours_narrow_clip"]
    assert _diff(narrow, cfgs["ours"]) == {"clip"} and narrow.clip == cfgs["per_bin_clip"].clip
    # ours' clip grid contains the paper's and extends it past its corner (0.6, +1)
    ours_clip = cfgs["ours"].clip
    assert set(narrow.clip.clip_ratios) < set(ours_clip.clip_ratios) and min(ours_clip.clip_ratios) < 0.6
    assert set(narrow.clip.exp_offsets) < set(ours_clip.exp_offsets) and max(ours_clip.exp_offsets) > 1
    for c in list(cfgs.values())[1:]:
        assert c.bins == rtn.bins
        if A.scale_rule(c) == "ocp_floor":
            assert (c.weight_format, c.act_format) == (rtn.weight_format, rtn.act_format)
    sw = A.switches(cfgs["global_clip"])
    assert sw == {"quantized": True, "format": "W:mxfp4 g32 A:mxfp4 g32", "scale_rule": "ocp_floor",
                  "smooth": "alpha 0.5", "rank": 16,
                  "gptq": True, "clip": "global", "clip_per_expert": True,
                  "clip_grid": "ratios 0.6-1.0, offsets -1..+1"}
    assert A.switches(None) == {"quantized": False}


def test_scale_rule_and_component_rows():
    cfgs = A.ablation_configs(width=256)
    ours, sc = cfgs["ours"], cfgs["ours_safe_ceil"]
    # The scale-rule rows change only the formats' rule, for weights and activations alike.
    assert not ours.clip.per_bin and cfgs["ours_per_bin_clip"].clip.per_bin
    assert _diff(cfgs["ours_per_bin_clip"], ours) == _diff(cfgs["ours_no_clip"], ours) == {"clip"}
    for new, old in (("rtn_safe_ceil", "rtn"), ("ours_safe_ceil", "ours_per_bin_clip")):
        assert _diff(cfgs[new], cfgs[old]) == {"weight_format", "act_format"}
        assert cfgs[new].weight_format.scale_rule == cfgs[new].act_format.scale_rule == "safe_ceil"
        assert cfgs[new].weight_format.group_size == cfgs[old].weight_format.group_size
        assert A.scale_rule(cfgs[new]) == "safe_ceil" and A.scale_rule(cfgs[old]) == "ocp_floor"
    # Each removal row drops exactly one component of ours_safe_ceil.
    assert _diff(cfgs["ours_safe_ceil_no_smooth"], sc) == {"smooth"}
    assert not cfgs["ours_safe_ceil_no_smooth"].smooth.enabled
    assert _diff(cfgs["ours_safe_ceil_rank0"], sc) == {"lowrank"} and cfgs["ours_safe_ceil_rank0"].lowrank.rank == 0
    assert _diff(cfgs["ours_safe_ceil_no_gptq"], sc) == {"gptq"} and not cfgs["ours_safe_ceil_no_gptq"].gptq.enabled
    for name, field_, value in (("no_clip", "enabled", False), ("global_clip", "per_bin", False),
                                ("shared_policy", "per_expert", False)):
        c = cfgs[f"ours_safe_ceil_{name}"]
        assert _diff(c, sc) == {"clip"} and getattr(c.clip, field_) is value
        assert dataclasses.replace(c.clip, **{field_: not value}) == sc.clip
    # Rank scaled to the width: Wan's 32 of 5120 is 0.625 %; on 256 that is rank 2 (at least 1).
    assert A.rank_for_width(5120) == 32 and A.rank_for_width(256) == 2 and A.rank_for_width(16) == 1
    assert A.rank_for_width(2560) == 16
    assert cfgs["ours_safe_ceil_rank_w"].lowrank.rank == 2 and _diff(cfgs["ours_safe_ceil_rank_w"], sc) == {"lowrank"}
    assert _diff(cfgs["ours_rank_w"], cfgs["ours"]) == {"lowrank"} and _diff(cfgs["svdquant_rank_w"], cfgs["svdquant"]) == {
        "lowrank"}
    assert A.ablation_configs(width=1024)["ours_rank_w"].lowrank.rank == 6
    with pytest.raises(ValueError, match="positive"):
        A.rank_for_width(0)
    from wanquant.formats import make_format

    with pytest.raises(ValueError, match="no scale rule"):
        A.with_scale_rule(dataclasses.replace(ours, act_format=make_format("int4", 32)), "safe_ceil")
    assert set(A.KEY_CONFIGS) <= set(cfgs) and all(n in cfgs for a, b in A.LADDER for n in (a, b))


def _payload(per_video: dict[str, list[float]], gt: dict[str, list[float]]) -> dict:
    rows = []
    for name, vals in per_video.items():
        rows.append({"config": name, "switches": {"quantized": name != "bf16"},
                     "per_sample": [{"psnr_vs_bf16": None if name == "bf16" else v, "ssim_vs_bf16": 0.9,
                                     "gt_psnr": g, "trajectory_err": 1.0, "vbench_style": {"average": 0.7}}
                                    for v, g in zip(vals, gt[name])]})
    return {"rows": rows, "settings": {"eval_samples": 4, "steps": 20, "calibration_samples": 4,
                                       "guidance_scale": 4.0, "frames": 17, "size": [64, 64]}, "model": "m"}


def test_combine_seeds_paired_errors_and_bars():
    from benchmarks.quality import combine as C

    rng = np.random.default_rng(3)
    vid = rng.normal(25, 3, 4)  # video difficulty, shared by every config: cancels in paired differences
    gt0 = rng.normal(19, 1, 4)
    seeds = []
    for k in range(2):
        eps = rng.normal(0, 0.1, (3, 4))
        seeds.append(_payload({"bf16": list(vid), "rtn_safe_ceil": list(vid + eps[0]),
                               "ours_safe_ceil": list(vid + 3 + eps[1]),
                               "ours_safe_ceil_shared_policy": list(vid + 2.9 + eps[2])},
                              {"bf16": list(gt0), "rtn_safe_ceil": list(gt0 - 1.0),
                               "ours_safe_ceil": list(gt0 - 0.1), "ours_safe_ceil_shared_policy": list(gt0 - 0.1)}))
    mo = {"config": "modelopt_svdquant", "scale_rule": "modelopt_ceil", "describe": "x",
          "per_sample": [{"psnr_vs_bf16": v, "ssim_vs_bf16": 0.9, "gt_psnr": g, "trajectory_err": 1.0,
                          "vbench_style": {"average": 0.7}} for v, g in zip(vid + 1.5, gt0)]}
    seeds[0]["rows"].append(mo)
    out = C.combine({"plain": seeds}, {"device": "d", "date": "t", "commit": "c", "command": "x"},
                    {"plain": {"experts": {}, "shared_top_channels": [], "layers": []}})
    assert {"device", "date", "commit", "command", "testbeds"} <= set(out)
    tb = out["testbeds"][0]
    assert tb["testbed"] == "plain" and tb["videos"] == 4 and tb["calib_seeds"] == 2
    rows = {r["config"]: r for r in tb["rows"]}
    assert set(rows) == {"16-bit", "rtn_safe_ceil", "ours_safe_ceil", "ours_safe_ceil_shared_policy",
                         "modelopt_svdquant"}
    ours_pv = np.mean([np.asarray([p["psnr_vs_bf16"] for p in s["rows"][2]["per_sample"]]) for s in seeds], axis=0)
    assert rows["ours_safe_ceil"]["psnr_vs_16bit"] == pytest.approx(ours_pv.mean())
    assert rows["ours_safe_ceil"]["psnr_se"] == pytest.approx(ours_pv.std(ddof=1) / 2.0)
    assert rows["ours_safe_ceil"]["scale_rule"] == "safe_ceil" and rows["16-bit"]["psnr_vs_16bit"] is None
    comp = {c["component"]: c for c in tb["components"]}
    sh_pv = np.mean([np.asarray([p["psnr_vs_bf16"] for p in s["rows"][3]["per_sample"]]) for s in seeds], axis=0)
    d = ours_pv - sh_pv
    c = comp["ours_safe_ceil vs ours_safe_ceil_shared_policy"]
    assert c["delta"] == pytest.approx(d.mean()) and c["delta_se"] == pytest.approx(d.std(ddof=1) / 2.0)
    # Paired SE is far below the rows' own SE: the shared video difficulty cancels.
    assert c["delta_se"] < 0.2 * rows["ours_safe_ceil"]["psnr_se"]
    b = tb["bars"]["ours_safe_ceil"]
    assert b["gt_psnr_loss"]["met"] and b["gt_psnr_loss"]["rtn_row"] == "rtn_safe_ceil"
    # ModelOpt's row exists for seed 0 only: the comparison pairs on that seed alone.
    ours0 = np.asarray([p["psnr_vs_bf16"] for p in seeds[0]["rows"][2]["per_sample"]])
    assert b["vs_modelopt_svdquant"]["delta"] == pytest.approx((ours0 - (vid + 1.5)).mean())
    assert b["vs_modelopt_svdquant"]["seeds"] == 1 and c["seeds"] == 2
    assert b["vs_modelopt_svdquant"]["met"]
    assert [x["name"] for x in b["components"]] == ["per-expert policy"]
    assert b["all_components_over_2se"] == (d.mean() > 2 * d.std(ddof=1) / 2.0)
    md = C.markdown(out)
    assert "| ours_safe_ceil | safe_ceil |" in md and "Bars for `ours_safe_ceil`" in md


def test_acceptance_arithmetic():
    vb = {k: 0.9 for k in ("subject_consistency", "background_consistency", "temporal_flickering",
                           "motion_smoothness", "dynamic_degree")}
    row = lambda avg, gt, traj: {"vbench_style": vb, "vbench_style_avg": avg, "gt_psnr": gt,  # noqa: E731
                                 "trajectory_err": traj}
    rows = {"bf16": row(0.9, 20.0, 1.0), "rtn": row(0.88, 18.0, 3.0), "ours": row(0.8977, 19.6, 1.4)}
    acc = A.acceptance(rows)
    assert acc["vbench_style_drop_pct"]["value"] == pytest.approx(0.2555, abs=1e-3)
    assert acc["vbench_style_drop_pct"]["met"]
    assert acc["gt_psnr_loss"]["met"] and acc["gt_psnr_loss"]["ratio"] == pytest.approx(0.2)
    assert acc["trajectory_err_loss"]["met"]  # 0.4 px lost vs RTN's 2.0 px
    assert acc["trajectory_err_loss"]["ratio"] == pytest.approx(0.2)
    rows["ours"]["trajectory_err"] = 1.6  # 0.6 px > a quarter of 2.0 px
    assert not A.acceptance(rows)["trajectory_err_loss"]["met"]


# ---------------------------------------------------------------------- VBench-style dims


def test_flicker_static_vs_flickering():
    static = np.full((6, 16, 16, 3), 100, dtype=np.uint8)
    assert VB.temporal_flickering(static) == 1.0
    flicker = static.copy()
    flicker[1::2] = 120  # every other frame 20 levels brighter
    assert VB.temporal_flickering(flicker) == pytest.approx((255 - 20) / 255)
    # Restricted to a mask, only its pixels count.
    part = static.copy()
    part[1::2, :, :8] = 140
    mask = np.zeros((16, 16), dtype=bool)
    mask[:, 8:] = True
    assert VB.temporal_flickering(part, mask) == 1.0
    assert VB.temporal_flickering(part, ~mask) == pytest.approx((255 - 40) / 255)


def _square_video(velocity: float, frames: int = 9, size: int = 64, jitter: np.ndarray | None = None) -> np.ndarray:
    """A textured 14 px square moving right by ``velocity`` px a frame over a smooth background."""
    rng = np.random.default_rng(1)
    tex = rng.integers(120, 256, size=(14, 14, 3)).astype(np.uint8)
    y, x = np.mgrid[0:size, 0:size]
    bg = np.stack([40 + x // 4, 40 + y // 4, 60 + 0 * x], -1).astype(np.uint8)
    out = []
    for t in range(frames):
        fr = bg.copy()
        x0 = int(round(8 + velocity * t + (jitter[t] if jitter is not None else 0)))
        fr[25:39, x0:x0 + 14] = tex
        out.append(fr)
    return np.stack(out)


def test_optical_flow_recovers_a_translating_square():
    v = _square_video(2.0)
    flow = VB.optical_flow(v[3], v[4])
    x0 = 8 + 2 * 3
    inner = flow[28:36, x0 + 3:x0 + 11]
    assert inner[..., 0].mean() == pytest.approx(2.0, abs=0.35)
    assert abs(inner[..., 1].mean()) < 0.3


def test_motion_metrics_on_known_motion():
    moving, still = _square_video(2.0), _square_video(0.0)
    thr = VB.dynamic_threshold(64, 64)
    assert thr == pytest.approx(1.5)
    assert VB.dynamic_degree(moving) == 1.0
    assert VB.dynamic_degree(still) == 0.0
    jerky = _square_video(2.0, jitter=np.array([0, 4, -3, 5, -4, 3, -5, 4, 0]))
    smooth_s, jerky_s, still_s = (VB.motion_smoothness(v) for v in (moving, jerky, still))
    assert still_s == pytest.approx(1.0, abs=1e-6)
    assert smooth_s > 0.99
    assert jerky_s < smooth_s - 0.005


def test_subject_and_background_consistency():
    v = _square_video(2.0)
    v[..., :] = np.where(v.sum(-1, keepdims=True) > 400, [230, 40, 40], v).astype(np.uint8)  # a red object
    base = VB.subject_consistency(v, [(230, 40, 40)])
    gone = v.copy()
    gone[4:6] = gone[0, :, :1]  # the object vanishes for two frames
    assert VB.subject_consistency(gone, [(230, 40, 40)]) < base - 0.1
    assert VB.background_consistency(np.repeat(v[:1], 5, 0)) == pytest.approx(1.0)


def test_vbench_style_on_a_testbed_clip():
    from wanquant.testbed.dataset import get_sample

    s = get_sample("eval", 0)
    dims = VB.vbench_style(s.frames, s, with_brisque=False)
    assert set(VB.DIMENSIONS) <= set(dims)
    assert all(0.0 <= dims[k] <= 1.0 for k in VB.DIMENSIONS)
    assert dims["temporal_flickering"] == 1.0  # the true clip's background never changes
    assert dims["average"] == pytest.approx(np.mean([dims[k] for k in VB.DIMENSIONS]))
    mask = VB.static_mask(s)
    assert 0 < mask.sum() < mask.size


def test_brisque_reports_a_number_or_why_not():
    from wanquant.testbed.dataset import get_sample

    out = VB.imaging_quality_brisque(get_sample("eval", 0).frames[:4], every=4)
    if out["score"] is None:
        assert out["reason"]
    else:
        assert np.isfinite(out["raw"]) and 0.0 <= out["score"] <= 1.0


# ----------------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_smoke_run_on_a_tiny_pipeline(tmp_path):
    torch.set_num_threads(1)
    from benchmarks.testbed_quality import markdown, run_quality

    out, res = tmp_path / "run", tmp_path / "results"
    # Plots are slow to draw on a loaded CPU; one is drawn below.
    payload = run_quality(out, num_calib=1, num_eval=1, configs=["bf16", "shared_policy"],
                          make_pipeline=build_tiny_pipeline, trained=False, generation=TINY_SETTINGS,
                          results_dir=res, reservoir_tokens=256, brisque=False, command="pytest smoke", plots=False)
    assert [r["config"] for r in payload["rows"]] == ["bf16", "shared_policy"]
    for r in payload["rows"][1:]:
        assert math.isfinite(r["psnr_vs_bf16"]) and 0.0 < r["ssim_vs_bf16"] <= 1.0
        assert r["switches"]["quantized"]
        assert set(r["vbench_style"]) >= {"temporal_flickering", "motion_smoothness", "average"}
    assert payload["rows"][0]["psnr_vs_bf16"] is None
    data = json.loads((res / "testbed_quality.json").read_text())
    assert {"device", "date", "commit", "command", "rows"} <= set(data)
    assert data["command"] == "pytest smoke"
    assert "| shared_policy |" in (res / "testbed_quality.md").read_text()
    assert (out / "report.html").exists() and (out / "videos" / "eval0_shared_policy.mp4").exists()
    # Per-layer, per-bin errors were recorded for both experts, with the experts' outputs.
    layer_rows = json.loads((out / "configs" / "shared_policy.json").read_text())["row"]["layer_errors"]
    assert {r["expert"] for r in layer_rows} == {"transformer", "transformer_2"}
    assert {r["bin"] for r in layer_rows} == {0, 1, 2}
    assert any(r["layer"] == EXPERT_OUTPUT for r in layer_rows)
    assert all(r["rel_err"] >= 0 and r["calls"] > 0 for r in layer_rows)
    assert plot_layer_bin_heatmap(layer_rows, tmp_path / "heat.png").stat().st_size > 0
    # The shared policy really shares: both experts' manifests hold the same clip tables.
    manifest = json.loads((out / "checkpoints" / "shared_policy" / "manifest.json").read_text())
    tables = [{n: lay["clip_table"] for n, lay in e["layers"].items()} for e in manifest["experts"].values()]
    assert tables[0] == tables[1]
    # A second call reuses every cached config.
    again = run_quality(out, num_calib=1, num_eval=1, configs=["bf16", "shared_policy"],
                        make_pipeline=build_tiny_pipeline, trained=False, generation=TINY_SETTINGS, results_dir=None,
                        reservoir_tokens=256, brisque=False, write_videos=False, plots=False)
    assert again["rows"][1]["psnr_vs_bf16"] == payload["rows"][1]["psnr_vs_bf16"]
    assert "shared_policy" in markdown(again)


# ------------------------------------------------------------------- ModelOpt (optional)


def _modelopt():
    from benchmarks.quality import modelopt_rows as MO

    ok, why = MO.available()
    if not ok:
        pytest.skip(why)
    return MO


def test_modelopt_fake_quant_matches_independent_references():
    MO = _modelopt()
    from wanquant.formats import make_format

    g = torch.Generator().manual_seed(5)
    x = torch.randn(48, 256, generator=g) * torch.logspace(-2, 2, 256)[torch.randperm(256, generator=g)]
    # MXFP4: ModelOpt's ceil rule is our safe_ceil (smallest e with amax <= 6 * 2^e); the two
    # round-to-nearest implementations agree except exactly on E2M1 midpoints (ties).
    ours = make_format("mxfp4", 32, scale_rule="safe_ceil").fake_quantize(x)
    theirs = MO.fake_quant(x, (8, 0))
    assert (ours != theirs).float().mean() < 1e-3
    floor = make_format("mxfp4", 32, scale_rule="ocp_floor").fake_quantize(x)
    assert (floor != theirs).float().mean() > 0.05  # the floor rule really is another rule
    # NVFP4: a brute-force reference in float64 (E4M3 block scale of amax/6 over a per-tensor scale).
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    xg = x.double().reshape(-1, 16)
    s2 = x.abs().max().double() / (6.0 * 448.0)
    s1 = (xg.abs().amax(-1, keepdim=True) / 6.0 / s2).float().to(torch.float8_e4m3fn).double()
    q = xg / (s1 * s2)
    idx = (q.abs().unsqueeze(-1) - grid).abs().argmin(-1)
    ref = (torch.sign(q) * grid[idx] * s1 * s2).reshape(x.shape).float()
    got = MO.fake_quant(x, (4, 3))
    close = torch.isclose(got, ref, rtol=1e-5, atol=1e-7)
    assert close.float().mean() > 0.999  # ties may round either way
    with pytest.raises(ValueError, match="only MXFP4"):
        MO.fake_quant(x, (5, 2))
    with pytest.raises(ValueError, match="unknown ModelOpt row"):
        MO.quant_config("modelopt_int8")


def test_modelopt_quantizes_only_block_linears_through_the_cpu_backend():
    MO = _modelopt()
    from wanquant.model.pipeline import run_pipeline
    from wanquant.testbed.dataset import list_samples

    pipe = build_tiny_pipeline(seed=1)
    s = list_samples("calib", 1, num_frames=TINY_SETTINGS.num_frames, height=TINY_SETTINGS.height,
                     width=TINY_SETTINGS.width)[0]
    ref = run_pipeline(pipe, s.first_frame(), s.prompt, TINY_SETTINGS, seed=0)
    calls = []
    real = MO._entrypoint
    MO._entrypoint = lambda x, q: (calls.append(q), real(x, q))[1]
    try:
        MO.quantize_pipeline(pipe, "modelopt_mxfp4_rtn", lambda: None)
        got = run_pipeline(pipe, s.first_frame(), s.prompt, TINY_SETTINGS, seed=0)
    finally:
        MO._entrypoint = real
    enabled = [n for e in ("transformer", "transformer_2") for n, m in getattr(pipe, e).named_modules()
               if n.endswith("_quantizer") and getattr(m, "is_enabled", False)]
    linears = [n for e in ("transformer", "transformer_2") for n, m in getattr(pipe, e).blocks.named_modules()
               if isinstance(m, torch.nn.Linear)]
    assert len(enabled) == 2 * len(linears) and all(n.startswith("blocks.") for n in enabled)
    assert calls  # the CPU backend ran
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 1e-4 < rel < 0.5  # quantized (changed), still the same video


@pytest.mark.slow
def test_calibration_seed_and_outside_rows_on_a_tiny_pipeline(tmp_path):
    torch.set_num_threads(1)
    from benchmarks.quality import combine as C
    from benchmarks.quality import modelopt_rows as MO
    from benchmarks.testbed_quality import run_quality

    with_mo = MO.available()[0]
    per = []
    for k in (0, 1):
        per.append(run_quality(tmp_path / f"seed{k}", num_calib=1, num_eval=2, configs=["bf16", "rtn_safe_ceil"],
                               make_pipeline=build_tiny_pipeline, trained=False, generation=TINY_SETTINGS,
                               results_dir=None, reservoir_tokens=256, vmaf=False, brisque=False, plots=False,
                               write_videos=False, layer_errors=False, calib_seed=k,
                               modelopt_rows=MO.ROWS if with_mo else ()))
    assert [p["calib_seed"] for p in per] == [0, 1]
    assert per[0]["settings"]["calibration_seeds"] == [1000] and per[1]["settings"]["calibration_seeds"] == [1001]
    names = [r["config"] for r in per[0]["rows"]]
    assert names[:2] == ["bf16", "rtn_safe_ceil"]
    if with_mo:
        assert names[2:] == list(MO.ROWS)
        rows = {r["config"]: r for r in per[0]["rows"]}
        # The same rule, two implementations: ModelOpt's MXFP4 RTN is within reach of ours.
        assert abs(rows["modelopt_mxfp4_rtn"]["psnr_vs_bf16"] - rows["rtn_safe_ceil"]["psnr_vs_bf16"]) < 3.0
    out = C.combine({"plain": per}, {"device": "d", "date": "t", "commit": "c", "command": "x"})
    tb = out["testbeds"][0]
    assert tb["calib_seeds"] == 2 and tb["videos"] == 2
    rc = {r["config"]: r for r in tb["rows"]}["rtn_safe_ceil"]
    assert rc["seeds"] == 2 and math.isfinite(rc["psnr_vs_16bit"])


def test_cached_unit_shares_work_between_processes_and_travels_without_videos(tmp_path):
    """The worker protocol: produce once, cache, skip or refuse a config another live process
    holds, and use a measured row without its videos (results come back from a GPU machine
    without them) unless the videos are needed."""
    import os

    settings = A.AblationSettings(TINY_SETTINGS, vmaf=False, brisque=False)
    rng = np.random.default_rng()
    videos = [rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)]
    calls = []

    def produce():
        calls.append(1)
        return {"config": "x", "seconds": {}}, videos

    key = {"config": {"rank": int(rng.integers(1, 99))}}
    row, got = A.cached_unit(tmp_path, "x", key, produce, None, [], settings, measure=False)
    assert len(calls) == 1 and np.array_equal(got[0], videos[0])
    row, got = A.cached_unit(tmp_path, "x", key, produce, None, [], settings, measure=False)
    assert len(calls) == 1 and np.array_equal(got[0], videos[0])  # from the cache
    # Another key is another config: produced again.
    A.cached_unit(tmp_path, "x", {"config": {"rank": -1}}, produce, None, [], settings, measure=False)
    assert len(calls) == 2
    # A config held by a live process (this one) is skipped, or refused when it must be measured.
    lock = tmp_path / "configs" / "y.lock"
    lock.write_text(str(os.getpid()))
    assert A.cached_unit(tmp_path, "y", key, produce, None, [], settings, measure=False) == (None, None)
    assert A.cached_unit(tmp_path, "y", key, produce, None, [], settings, skip_busy=True) == (None, None)
    with pytest.raises(RuntimeError, match="another process"):
        A.cached_unit(tmp_path, "y", key, produce, None, [], settings)
    # A lock whose process is gone is stale: taken over.
    lock.write_text("999999999")
    A.cached_unit(tmp_path, "y", key, produce, None, [], settings, measure=False)
    assert len(calls) == 3 and not lock.exists()
    # A measured row travels without its videos; without them it is used as it is, unless
    # the videos are needed (then it is produced again), or nothing may be generated.
    path = tmp_path / "configs" / "x.json"
    data = json.loads(path.read_text())
    data["row"]["metrics_key"] = settings.metrics_key()
    path.write_text(json.dumps(data))
    (tmp_path / "frames" / "x.npz").unlink()
    row, got = A.cached_unit(tmp_path, "x", data["key"], produce, None, [], settings, generate=False, measure=False)
    assert got is None and row["metrics_key"] == settings.metrics_key() and len(calls) == 3
    with pytest.raises(RuntimeError, match="no videos"):
        A.cached_unit(tmp_path, "x", data["key"], produce, None, [], settings, generate=False, need_frames=True)
    _, got = A.cached_unit(tmp_path, "x", data["key"], produce, None, [], settings, measure=False, need_frames=True)
    assert len(calls) == 4 and got is not None
