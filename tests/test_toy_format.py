"""A format defined and registered here, outside the library, runs through everything.

``Pow2Int4`` (integers in [-7, 7] times a power-of-two group scale, group 16) exists only
in this file. Registering it is all it takes for quantize/dequantize, GPTQ, the clip
search (with exponent offsets), config round-trips, the per-layer pipeline and the
runtime's reference path to use it, while the fast-path dispatch declines it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from wanquant.formats import FORMATS, GroupFormat, format_from_dict, make_format, register_format
from wanquant.kernels.dispatch import fast_path_status
from wanquant.method.config import ClipConfig, LowRankConfig, QuantConfig, SmoothConfig
from wanquant.method.layer import quantize_layer
from wanquant.numerics.clip import search_clip
from wanquant.numerics.gptq import gptq_quantize, hessian_weighted_error
from wanquant.numerics.stats import LayerStatsAccumulator
from wanquant.runtime.linear import W4A4Linear

pytestmark = pytest.mark.usefixtures("seed")


@dataclass(frozen=True)
class Pow2Int4(GroupFormat):
    """Integers in [-7, 7] times ``2^e``; ``e`` the smallest with ``amax * clip <= 7 * 2^e``, plus the offset."""

    name: ClassVar[str] = "toy_pow2_int4"
    scale_dtype: ClassVar[torch.dtype] = torch.uint8
    scale_bits: ClassVar[int] = 8

    group_size: int = 16

    def accepts_exp_offset(self, exp_offset: int) -> bool:
        return True

    def _exponent(self, amax: torch.Tensor, clip_ratio: float = 1.0, exp_offset: int = 0) -> torch.Tensor:
        a = amax.float() * clip_ratio
        e = torch.ceil(torch.log2(a / 7.0)).clamp(-100, 100)
        e = e + (a > 7.0 * torch.exp2(e)).float()  # log2 may round just below an exact power
        return (e + exp_offset).clamp(-100, 100).to(torch.int32)

    def group_scale(self, amax):
        e = self._exponent(amax)
        return (e + 127).to(torch.uint8), torch.exp2(e.float())

    def round_to_step(self, values, step):
        return torch.round(values / step).clamp(-7, 7) * step

    def codes_at_step(self, values, step):
        return (torch.round(values / step).to(torch.int16) & 0xF).to(torch.uint8)

    def encode_groups(self, xg, clip_ratio, exp_offset):
        e = self._exponent(xg.abs().amax(-1), clip_ratio, exp_offset)
        step = torch.exp2(e.float()).unsqueeze(-1)
        return self.codes_at_step(self.round_to_step(xg, step), step), (e + 127).to(torch.uint8)

    def decode_groups(self, cg, scales):
        s = cg.to(torch.int16)
        return torch.where(s >= 8, s - 16, s).float() * torch.exp2(scales.float() - 127).unsqueeze(-1)


@pytest.fixture
def toy():
    register_format(Pow2Int4)
    yield make_format(Pow2Int4.name)
    FORMATS.pop(Pow2Int4.name)


def _brute(x: torch.Tensor, g: int, clip: float, off: int) -> torch.Tensor:
    """Nearest of all 15 levels at the group's step, from first principles (fp64)."""
    a = x.float().reshape(x.shape[0], -1, g).abs().amax(-1) * clip
    e = torch.tensor([[min(k for k in range(-100, 101) if float(v) <= 7 * 2.0**k) for v in row] for row in a])
    xg = x.double().reshape(x.shape[0], -1, g)
    step = torch.exp2((e + off).double())[..., None]
    cand = (torch.arange(-7, 8, dtype=torch.float64) * step[..., None]).expand(*xg.shape, 15)
    best = cand.gather(-1, (xg[..., None] - cand).abs().argmin(-1, keepdim=True))[..., 0]
    return best.reshape(x.shape).float()


def test_registry_and_quantize(toy) -> None:
    assert format_from_dict(toy.to_dict()) == toy and toy.group_size == 16 and toy.bits_per_element == 4.5
    x = torch.randn(8, 64) * torch.exp(torch.randn(8, 1) * 3)
    for clip, off in ((1.0, 0), (0.7, 0), (1.0, 1), (0.8, -1)):
        q = toy.quantize(x, clip, off)
        assert q.codes.dtype == torch.uint8 and q.scales.shape == (8, 4) and int(q.codes.max()) <= 15
        assert torch.equal(toy.dequantize(q), _brute(x, 16, clip, off))
        assert torch.equal(toy.fake_quantize(x, clip, off), toy.dequantize(q))


def test_gptq_with_toy_format(toy) -> None:
    k = 128
    w = torch.randn(32, k)
    mix = torch.eye(k) + 0.7 * torch.randn(k, k) / k**0.5
    xs = torch.randn(2048, k) @ mix * torch.exp(torch.randn(k) * 0.5)
    h = xs.T @ xs
    res = gptq_quantize(w, h, toy, block_size=32, act_order=True)
    assert res.info["fallback"] is None and res.quantized.scales.dtype == torch.uint8
    assert torch.equal(toy.dequantize(res.quantized), res.dequantized)
    rtn = toy.fake_quantize(w)
    assert hessian_weighted_error(w, res.dequantized, h) < 0.8 * hessian_weighted_error(w, rtn, h)


def test_clip_search_with_toy_format(toy) -> None:
    x = torch.distributions.StudentT(3.0).sample((200, 64))
    w = torch.randn(24, 64)
    ratios, offsets = [0.6, 0.8, 1.0], [-1, 0, 1]
    r = search_clip(x, w, toy, ratios, offsets)
    assert not torch.isnan(r.grid).any()  # the toy has an exponent: every offset is searched
    y = x @ w.T
    for i, c in enumerate(ratios):
        for j, o in enumerate(offsets):
            want = float(((_brute(x, 16, c, o) @ w.T - y).double().square().sum() / y.double().square().sum()))
            assert abs(float(r.grid[i, j]) - want) <= 1e-5 * want


def test_layer_pipeline_config_and_runtime(toy) -> None:
    n, k, bins = 32, 64, 2
    cfg = QuantConfig(weight_format=toy, act_format=toy, smooth=SmoothConfig(alpha_grid=[0.5]),
                      lowrank=LowRankConfig(rank=4), clip=ClipConfig(max_tokens=128))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    acc = LayerStatsAccumulator(k, bins, 128)
    for b in range(bins):
        acc.update(torch.randn(128, k) * (b + 1), b)
    w = torch.randn(n, k) / k**0.5
    p = quantize_layer(w, torch.randn(n), acc.finalize(), cfg, bins, name="toy")
    assert p.wscales.shape == (n, k // 16) and p.report["weight_format"]["name"] == Pow2Int4.name
    assert p.report["final"]["rel_err"] < 0.1
    layer = W4A4Linear.from_params(p, toy, toy)
    x = torch.randn(3, k)
    assert torch.isfinite(layer(x)).all() and layer.backend_reason.startswith("reference")
    ok, why = fast_path_status(torch.device("cuda"), toy, toy)
    assert not ok and Pow2Int4.name in why
