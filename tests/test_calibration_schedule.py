"""Expert-major calibration (one trajectory pass) against the interleaved run, bit for bit;
its resume without the recorded outputs; shared and static inputs and cond-only
collection against fp64 brute force on the testbed pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SETTINGS, build_tiny_pipeline, fast_config, interrupt_on_call
from safetensors.torch import load_file

from wanquant.calibration import passes
from wanquant.calibration.config import CalibrationRun
from wanquant.calibration.run import quantize_pipeline
from wanquant.artifacts.checkpoint import read_manifest
from wanquant.model.pipeline import encode_prompts
from wanquant.model.wan import experts_of, quant_targets

pytestmark = pytest.mark.slow


def _tensors(qdir):
    return {d.name: load_file(str(d / "diffusion_pytorch_model.safetensors"))
            for d in sorted(qdir.iterdir()) if (d / "diffusion_pytorch_model.safetensors").exists()}


def _run(**kw) -> CalibrationRun:
    return CalibrationRun(TINY_SETTINGS, reservoir_tokens=128, progress=False, **kw)


def _assert_same_checkpoint(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == ["transformer", "transformer_2"] and ta.keys() == tb.keys()
    for attr in ta:
        assert ta[attr].keys() == tb[attr].keys()
        for k in ta[attr]:
            assert torch.equal(ta[attr][k], tb[attr][k]), f"{attr}: {k}"
    ma, mb = read_manifest(a), read_manifest(b)
    for attr in ma["experts"]:
        assert ma["experts"][attr]["calibration"] == mb["experts"][attr]["calibration"]  # timesteps, forwards


def test_expert_major_equals_interleaved_bit_for_bit(tmp_path, tiny_samples):
    major, inter = tmp_path / "major", tmp_path / "inter"
    quantize_pipeline(build_tiny_pipeline(), tiny_samples, fast_config(), _run(), major)
    quantize_pipeline(build_tiny_pipeline(), tiny_samples, fast_config(), _run(schedule="interleaved"), inter)
    _assert_same_checkpoint(major, inter)
    assert read_manifest(major)["calibration"]["schedule"] == "expert_major"
    assert read_manifest(inter)["calibration"]["schedule"] == "interleaved"


def test_resume_at_the_second_expert_records_the_first_again(tmp_path, tiny_samples, monkeypatch):
    """Interrupted before the low-noise expert's pass: the new process has no recorded
    high-noise outputs, runs that expert once more, and ends with the same checkpoint."""
    full, out = tmp_path / "full", tmp_path / "resumed"
    quantize_pipeline(build_tiny_pipeline(), tiny_samples, fast_config(), _run(), full)
    real = interrupt_on_call(monkeypatch, passes, "calibrate_pass")
    with pytest.raises(KeyboardInterrupt):
        quantize_pipeline(build_tiny_pipeline(), tiny_samples, fast_config(), _run(), out)
    monkeypatch.setattr(passes, "calibrate_pass", real)
    refills = []
    real_run_samples = passes._run_samples
    monkeypatch.setattr(passes, "_run_samples", lambda pipe, s, run, p, collector, er, emb=None:
                        refills.append(er.live if collector is None else None) or
                        real_run_samples(pipe, s, run, p, collector, er, emb))
    quantize_pipeline(build_tiny_pipeline(), tiny_samples, fast_config(), _run(), out)
    assert refills == ["transformer", None]  # the high-noise expert recorded again, then the collecting run
    _assert_same_checkpoint(full, out)


def _brute_force(pipe, samples, settings, layers: list[str]):
    """Every forward's input of ``layers`` of each expert, with the branch, in fp64."""
    seen = {e.attr: [] for e in experts_of(pipe)}
    conds = []
    handles = []
    for e in experts_of(pipe):
        cur = {}

        def pre(module, args, kwargs, attr=e.attr, cur=cur):
            ctx = kwargs["encoder_hidden_states"]
            cur["branch"] = "cond" if any(torch.equal(ctx, c) for c in conds) else "uncond"
            seen[attr].append({"branch": cur["branch"]})

        handles.append(e.module.register_forward_pre_hook(pre, with_kwargs=True))
        for i, block in enumerate(e.module.blocks):
            for lname in layers:
                def hook(module, args, attr=e.attr, key=f"{i}.{lname}"):
                    seen[attr][-1][key] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                handles.append(block.get_submodule(lname).register_forward_pre_hook(hook))
    for s in samples:
        pos, _ = encode_prompts(pipe, s.prompt, settings.negative_prompt, settings, pipe._execution_device)
        conds.append(pos)
    return seen, handles


@pytest.mark.parametrize("cond_only", [False, True])
def test_shared_static_and_cond_only_statistics_match_brute_force(tiny_samples, cond_only):
    pipe = build_tiny_pipeline()
    cfg = fast_config()
    experts = experts_of(pipe)
    targets = {e.attr: quant_targets(e.module, cfg) for e in experts}
    run = _run(cond_only=cond_only, schedule="interleaved")
    seen, handles = _brute_force(pipe, tiny_samples, run.settings, ["attn2.to_k", "ffn.net.2"])
    try:
        col = passes.collect(pipe, experts, targets, tiny_samples, cfg, run, run.seed, False)
    finally:
        for h in handles:
            h.remove()
    n_blocks = len(experts[0].module.blocks)
    for e in experts:
        fwd = [f for f in seen[e.attr] if not cond_only or f["branch"] == "cond"]
        assert fwd and (cond_only or any(f["branch"] == "uncond" for f in fwd))
        # the cross-attention k/v of every block read one tensor: one accumulator per expert
        assert len(col.acc[e.attr]) == len(targets[e.attr]) - n_blocks + 1
        for f in fwd:
            for i in range(1, n_blocks):
                assert torch.equal(f[f"{i}.attn2.to_k"], f["0.attn2.to_k"])
        for lname, name in (("attn2.to_k", "blocks.1.attn2.to_kv"), ("ffn.net.2", "blocks.1.ffn.net.2")):
            xs = [f[f"1.{lname}"] for f in fwd]
            h = sum(x.T @ x for x in xs)
            st = col.finalize(e.attr, name)
            assert st.n_tokens == sum(len(x) for x in xs)
            assert torch.equal(st.act_absmax, torch.stack([x.abs().amax(0) for x in xs]).amax(0).float())
            bound = (len(xs) + max(len(x) for x in xs)) * 2.0 ** -24 * sum(x.abs().T @ x.abs() for x in xs)
            assert ((st.hessian.double() - h).abs() <= bound).all(), name
            rows = torch.cat(xs).float()
            for toks in st.reservoirs.values():  # every sampled token is a real input row
                assert all(bool((rows == r).all(1).any()) for r in toks[:16])


def test_branch_is_recognised_when_the_pipeline_casts_the_embedding(tiny_samples):
    """Pipelines pass prompt embeddings cast to the expert's dtype: a new tensor per forward."""
    from wanquant.calibration.collect import StatsCollector

    pipe = build_tiny_pipeline()
    cfg = fast_config()
    e = experts_of(pipe)[0]
    col = StatsCollector([e], {e.attr: []}, cfg)
    pos, neg = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    col.set_cond_context(pos)
    hook = col._expert_hook(e.attr)
    t = torch.tensor([999.0])
    for ctx, want in ((pos, "cond"), (pos.clone(), "cond"), (pos.bfloat16(), "cond"), (neg, "uncond"),
                      (neg.bfloat16(), "uncond"), (pos[:, :4], "uncond")):
        hook(e.module, (), {"timestep": t, "encoder_hidden_states": ctx})
        assert col._branch[e.attr] == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_expert_major_with_offload_equals_interleaved(tmp_path, tiny_samples):
    """On CUDA the idle expert and the text encoder wait in host memory; same checkpoint,
    everything back on the device afterwards."""
    outs = {}
    for schedule in ("expert_major", "interleaved"):
        pipe = build_tiny_pipeline().to("cuda")
        outs[schedule] = tmp_path / schedule
        quantize_pipeline(pipe, tiny_samples, fast_config(), _run(schedule=schedule), outs[schedule])
        for m in (pipe.transformer, pipe.transformer_2, pipe.text_encoder):
            assert all(p.device.type == "cuda" for p in m.parameters())
    _assert_same_checkpoint(outs["expert_major"], outs["interleaved"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_spilled_statistics_equal_resident_ones(tiny_samples):
    """A zero device budget puts every Hessian in host memory; the statistics stay the same
    up to fp32 summation order."""
    pipe = build_tiny_pipeline().to("cuda")
    cfg = fast_config()
    experts = experts_of(pipe)
    targets = {e.attr: quant_targets(e.module, cfg) for e in experts}
    cols = {}
    for budget in (None, 0.0):
        run = _run(schedule="interleaved", stats_memory_gb=budget)
        cols[budget] = passes.collect(pipe, experts, targets, tiny_samples[:1], cfg, run, run.seed, False)
    for e in experts:
        for key, acc in cols[0.0].acc[e.attr].items():
            res = cols[None].acc[e.attr][key]
            assert acc.hessian.hessian.device.type == "cpu" and res.hessian.hessian.device.type == "cuda"
            torch.testing.assert_close(acc.hessian.hessian, res.hessian.hessian.cpu(), rtol=1e-5, atol=1e-4)
            assert acc.hessian.n_tokens == res.hessian.n_tokens


def _collect(tiny_samples, cond_only: bool, reservoir_tokens: int = 8):
    pipe = build_tiny_pipeline()
    cfg = fast_config()
    experts = experts_of(pipe)
    targets = {e.attr: quant_targets(e.module, cfg) for e in experts}
    run = _run(cond_only=cond_only)
    run.reservoir_tokens = reservoir_tokens
    return passes.collect(pipe, experts, targets, tiny_samples, cfg, run, 0, False)


@pytest.mark.parametrize("cond_only", [False, True])
def test_forward_plan_matches_the_run_and_keeps_the_same_samples(tiny_samples, monkeypatch, cond_only):
    """The reservoirs' plan (forwards per expert and bin) is what the pipeline runs, and the
    planned reservoirs keep the same tokens as unplanned ones, copying fewer."""
    col = _collect(tiny_samples, cond_only)
    for attr, per_bin in col._plan.items():
        calls = col.records[attr].calls
        for b in range(col.bins[attr].num_bins):
            ran = calls[(b, "cond")] + (0 if cond_only else calls[(b, "uncond")])
            assert ran == per_bin.get(b, 0) * len(tiny_samples), (attr, b)
    monkeypatch.setattr(passes.StatsCollector, "expect", lambda self, *a: None)
    plain = _collect(tiny_samples, cond_only)
    planned_any = False
    for attr, accs in col.acc.items():
        for key, acc in accs.items():
            for r, p in zip(acc.reservoirs, plain.acc[attr][key].reservoirs):
                assert torch.equal(r.keys.sort().values, p.keys.sort().values), (attr, key)
                order_r, order_p = r.keys.argsort(), p.keys.argsort()
                assert torch.equal(r.tokens[order_r], p.tokens[order_p]), (attr, key)
                assert r.n_copied <= p.n_copied
                planned_any |= r.threshold < 1.0
    assert planned_any  # the plan's threshold was in force somewhere


def test_a_plan_that_overcounts_the_forwards_is_caught_after_the_first_sample(tiny_samples, monkeypatch):
    real = passes.denoising_timesteps
    monkeypatch.setattr(passes, "denoising_timesteps", lambda pipe, settings: real(pipe, settings) * 2)
    with pytest.raises(RuntimeError, match="the plan said"):
        _collect(tiny_samples, False)
