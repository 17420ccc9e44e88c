"""W4A4Linear, timestep bins, the k/v cache and the Wan adapter table."""

from __future__ import annotations

import random

import pytest
import torch

from wanquant.formats import MXFP4, pack_nibbles
from wanquant.formats.mxfp4 import E2M1_VALUES
from wanquant.method.config import QuantConfig
from wanquant.method.params import QuantizedLinearParams
from wanquant.model.wan import BLOCK_TABLE, quant_targets
from wanquant.runtime.linear import W4A4Linear
from wanquant.runtime.state import ExpertState, TimestepBins


def random_params(n: int, k: int, rank: int, bins: int, gen: torch.Generator) -> QuantizedLinearParams:
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    return QuantizedLinearParams(
        qweight=pack_nibbles(codes),
        wscales=torch.randint(120, 130, (n, k // 32), generator=gen, dtype=torch.uint8),
        smooth=torch.rand(k, generator=gen) * 2 + 0.1,
        l1=(torch.randn(rank, k, generator=gen) * 0.1).bfloat16(),
        l2=(torch.randn(n, rank, generator=gen) * 0.1).bfloat16(),
        bias=torch.randn(n, generator=gen).bfloat16(),
        clip_table=torch.tensor([[1.0, 0.0], [0.7, 0.0], [0.9, 1.0]][:bins], dtype=torch.float32),
    )


def brute_force_forward(p: QuantizedLinearParams, x: torch.Tensor, clip: float, offset: int) -> torch.Tensor:
    """fp64, element by element from the E2M1 table: independent of wanquant's quantizer."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    n, k = p.out_features, p.in_features
    lo, hi = p.qweight & 0xF, p.qweight >> 4
    codes = torch.stack([lo, hi], -1).reshape(n, k).long()
    w = torch.where(codes >= 8, -table[codes & 7], table[codes & 7])
    w = w * torch.pow(2.0, p.wscales.double() - 127).repeat_interleave(32, dim=1)
    xs = x.double() * (1.0 / p.smooth).double()
    xq = torch.empty_like(xs)
    for t in range(xs.shape[0]):
        for g in range(k // 32):
            grp = xs[t, g * 32:(g + 1) * 32]
            amax = float(grp.abs().max()) * clip
            e = -127 if amax == 0 else max(-127, min(127, int(torch.floor(torch.log2(torch.tensor(amax)))) - 2 + offset))
            scaled = grp / 2.0**e
            # nearest E2M1 magnitude, ties to the even code, saturating at 6
            idx = [min(range(8), key=lambda i: (abs(abs(float(v)) - float(table[i])), i % 2)) for v in scaled]
            xq[t, g * 32:(g + 1) * 32] = torch.tensor(
                [float(table[i]) * (1 if v >= 0 else -1) * 2.0**e for i, v in zip(idx, scaled)], dtype=torch.float64)
    return xq @ w.T + (xs @ p.l1.double().T) @ p.l2.double().T + p.bias.double()


def test_reference_forward_matches_brute_force_for_every_bin():
    seed = random.randrange(1 << 30)
    gen = torch.Generator().manual_seed(seed)
    p = random_params(24, 64, 4, 3, gen)
    layer = W4A4Linear.from_params(p, MXFP4, MXFP4)
    x = torch.randn(5, 64, generator=gen) * 3
    x[:, 7] *= 40  # an outlier channel
    for b in range(3):
        layer.state.bin_index = b
        c, o = p.clip_table[b].tolist()
        want = brute_force_forward(p, x, c, int(o))
        got = layer(x)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3, msg=f"seed {seed} bin {b}")


def test_state_dict_round_trip_and_backends_agree():
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    layer = W4A4Linear.from_params(random_params(32, 96, 8, 3, gen), MXFP4, MXFP4)
    fresh = W4A4Linear(96, 32, 8, 3, MXFP4, MXFP4)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(7, 96, generator=gen)
    for b in range(3):
        layer.state.bin_index = fresh.state.bin_index = b
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    unpack = layer.forward_unpack_bf16(x, 1.0, 0)
    ref = layer.forward_reference(x, 1.0, 0)
    assert (unpack - ref).norm() / ref.norm() < 2e-2  # bf16 rounding only
    with pytest.raises(ValueError, match="input has 95 features"):
        layer(torch.randn(2, 95))


def test_timestep_bins_against_table():
    high = TimestepBins(1000.0, 900.0, (0.33, 0.66))
    assert [high.bin_of(t) for t in (1000, 999, 968, 967, 935, 934, 900, 850)] == [0, 0, 0, 1, 1, 2, 2, 2]
    low = TimestepBins(900.0, 0.0, (0.2, 0.7))
    assert [low.bin_of(t) for t in (899, 721, 720, 271, 270, 1)] == [0, 0, 1, 1, 2, 2]
    state = ExpertState(low)
    assert state.set_timestep(torch.tensor([500.0, 500.0])) == 1
    assert state.set_timestep(torch.tensor([[0.0, 800.0, 800.0]])) == 0  # per-token timesteps: their max


def test_static_input_cache_hits_per_context_only():
    gen = torch.Generator().manual_seed(0)
    layer = W4A4Linear.from_params(random_params(16, 32, 2, 3, gen), MXFP4, MXFP4)
    layer.cache_static_input = True
    cond, uncond = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    layer.state.set_context(cond)
    y1 = layer(cond)
    assert layer(cond) is y1  # cached
    layer.state.set_context(uncond)
    y2 = layer(uncond)
    assert y2 is not y1 and not torch.equal(y1, y2)
    layer.state.set_context(cond)
    assert layer(cond) is y1  # both branches stay cached
    cond.add_(1.0)  # an in-place change bumps the version: recomputed
    assert layer(cond) is not y1
    with torch.inference_mode():  # inference tensors have no version counter
        ctx = torch.randn(1, 4, 32)
        layer.state.set_context(ctx)
        y3 = layer(ctx)
        assert layer(ctx) is y3


def test_adapter_targets_and_policy(tiny_pipe):
    cfg = QuantConfig()
    names = [t.name for t in quant_targets(tiny_pipe.transformer, cfg)]
    assert names[: len(BLOCK_TABLE)] == [f"blocks.0.{g.name}" for g in BLOCK_TABLE]
    assert len(names) == 2 * len(BLOCK_TABLE)
    cfg.precision.skip_blocks = [-1]
    cfg.precision.skip_layers = ["blocks.*.attn2.to_kv"]
    names = [t.name for t in quant_targets(tiny_pipe.transformer, cfg)]
    assert all(n.startswith("blocks.0.") for n in names) and "blocks.0.attn2.to_kv" not in names
    cfg.precision.skip_layers = ["blocks.*.attn3.*"]
    with pytest.raises(ValueError, match="match no quantized layer"):
        quant_targets(tiny_pipe.transformer, cfg)
    cfg.precision.skip_layers, cfg.precision.skip_blocks = [], [5]
    with pytest.raises(ValueError, match="out of range"):
        quant_targets(tiny_pipe.transformer, cfg)
