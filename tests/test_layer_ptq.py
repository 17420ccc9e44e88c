"""The per-layer pipeline end to end on a small layer."""

from __future__ import annotations

import json

import pytest
import torch

from wanquant.formats import INT4, Quantized, unpack_nibbles
from wanquant.method.config import ClipConfig, GPTQConfig, LowRankConfig, QuantConfig, SmoothConfig
from wanquant.method.layer import output_error, quantize_layer, reference_forward
from wanquant.numerics.stats import LayerStats, LayerStatsAccumulator

N, K, BINS = 48, 128, 3


# A fresh torch seed per test, printed for reproduction (conftest.py).
pytestmark = pytest.mark.usefixtures("seed")


def _layer(bins: int = BINS) -> tuple[torch.Tensor, torch.Tensor, LayerStats]:
    w = torch.randn(N, K) / K**0.5 + 0.3 * torch.randn(N, 4) @ torch.randn(4, K) / K**0.5
    acc = LayerStatsAccumulator(K, bins, 256)
    mix = torch.eye(K) + 0.5 * torch.randn(K, K) / K**0.5
    for b in range(bins):
        x = torch.distributions.StudentT(4.0).sample((256, K)) @ mix
        x[:, :3] *= 10.0 * (b + 1)
        acc.update(x, b)
    return w, torch.randn(N), acc.finalize()


def _small_cfg(**kw) -> QuantConfig:
    cfg = QuantConfig(lowrank=LowRankConfig(rank=4), clip=ClipConfig(max_tokens=256))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_pipeline_dtypes_report_and_quality() -> None:
    w, b, stats = _layer()
    cfg = _small_cfg()
    p = quantize_layer(w.bfloat16(), b, stats, cfg, BINS, name="blocks.0.attn1.to_q")
    p.validate(cfg.weight_format)
    assert p.qweight.dtype == torch.uint8 and p.qweight.shape == (N, K // 2)
    assert p.wscales.dtype == torch.uint8 and p.wscales.shape == (N, K // 32)
    assert p.smooth.dtype == torch.float32 and p.l1.dtype == p.l2.dtype == p.bias.dtype == torch.bfloat16
    assert p.clip_table.dtype == torch.float32 and p.clip_table.shape == (BINS, 2)
    r = p.report
    json.dumps(r)  # plain JSON
    assert r["smooth"]["alpha"] in cfg.smooth.alpha_grid and len(r["smooth"]["errors"]) == len(cfg.smooth.alpha_grid)
    assert r["gptq"]["fallback"] is None and r["gptq"]["weighted_rel_err"] < r["gptq"]["rtn_weighted_rel_err"]
    assert set(r["clip"]["bins"]) == {"0", "1", "2"} and r["final"]["rel_err"] < 0.05
    rtn = quantize_layer(w.bfloat16(), b, stats, QuantConfig(
        smooth=SmoothConfig(enabled=False), lowrank=LowRankConfig(rank=0), gptq=GPTQConfig(enabled=False),
        clip=ClipConfig(enabled=False)), BINS)
    assert r["final"]["rel_err"] < rtn.report["final"]["rel_err"]
    assert torch.equal(rtn.smooth, torch.ones(K)) and rtn.l1.shape == (0, K) and rtn.clip_table.eq(
        torch.tensor([1.0, 0.0])).all()


def test_runtime_convention_and_reconstruction() -> None:
    w, b, stats = _layer()
    cfg = _small_cfg()
    p = quantize_layer(w, b, stats, cfg, BINS)
    x = torch.randn(5, K)
    bin_ = 1
    # x' = x.float() * (1.0 / smooth): multiply by the fp32 reciprocal, not divide
    xs = x.float() * (1.0 / p.smooth)
    c, o = p.clip_table[bin_].tolist()
    wq = cfg.weight_format.dequantize(Quantized(unpack_nibbles(p.qweight), p.wscales))
    want = cfg.act_format.fake_quantize(xs, c, int(o)) @ wq.T + (xs @ p.l1.float().T) @ p.l2.float().T + p.bias.float()
    assert torch.equal(reference_forward(p, x, cfg.weight_format, cfg.act_format, c, int(o)), want)
    # the stored pieces rebuild W diag(s) up to the 4-bit residual error
    w_rebuilt = (wq + p.l2.float() @ p.l1.float()) / p.smooth
    assert float((w_rebuilt - w).norm() / w.norm()) < 0.2
    assert output_error(p, w, stats.reservoirs[0], 0, cfg) == pytest.approx(p.report["final"]["rel_err_per_bin"]["0"],
                                                                            rel=1e-3)


def test_int4_and_variants() -> None:
    w, b, stats = _layer()
    cfg = _small_cfg(weight_format=INT4, act_format=INT4)
    p = quantize_layer(w, None, stats, cfg, BINS)
    assert p.wscales.dtype == torch.bfloat16 and p.wscales.shape == (N, 2) and p.bias is None
    assert (p.clip_table[:, 1] == 0).all()
    aware = quantize_layer(w, b, stats, _small_cfg(lowrank=LowRankConfig(rank=4, method="activation_aware"),
                                                   gptq=GPTQConfig(act_order=True)), BINS)
    assert aware.report["final"]["rel_err"] < 0.05


def test_missing_bin_and_hopeless_hessian() -> None:
    w, b, stats = _layer()
    del stats.reservoirs[2]
    stats.hessian = -torch.eye(K) * 3  # impossible to factorise without retries
    cfg = _small_cfg(gptq=GPTQConfig(max_damp_retries=0))
    with pytest.warns(RuntimeWarning, match="layer 'x'"):
        p = quantize_layer(w, b, stats, cfg, BINS, name="x")
    assert p.report["gptq"]["fallback"] == "rtn" and p.report["clip"]["fallback_bins"] == [2]
    assert p.clip_table[2].tolist() == pytest.approx([p.report["clip"]["pooled"]["clip_ratio"],
                                                      p.report["clip"]["pooled"]["exp_offset"]])


def test_validation_errors_name_the_layer() -> None:
    w, b, stats = _layer()
    cfg = _small_cfg()
    bad = w.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="layer 'L7'.*weight.*NaN"):
        quantize_layer(bad, b, stats, cfg, BINS, name="L7")
    with pytest.raises(ValueError, match="layer 'L7'.*group size"):
        quantize_layer(w[:, :112], b, stats, cfg, BINS, name="L7")
    with pytest.raises(ValueError, match="layer 'L7'.*bias"):
        quantize_layer(w, b[:5], stats, cfg, BINS, name="L7")
    with pytest.raises(ValueError, match="layer 'L7'.*hessian"):
        quantize_layer(w, b, LayerStats(stats.act_absmax, None, torch.eye(K + 1), 1), cfg, BINS, name="L7")
    with pytest.raises(ValueError, match="layer 'L7'.*weight"):
        quantize_layer(w.to(torch.int32), b, stats, cfg, BINS, name="L7")
    with pytest.raises(ValueError, match="layer 'L7'.*bins"):
        quantize_layer(w, b, stats, cfg, 2, name="L7")
    inf_stats = LayerStats(stats.act_absmax, None, stats.hessian.clone(), 1, dict(stats.reservoirs))
    inf_stats.hessian[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer 'L7'.*hessian.*NaN or Inf"):
        quantize_layer(w, b, inf_stats, cfg, BINS, name="L7")
