"""Cheaper calibration statistics against fp64 brute force: the Hessian GEMM paths,
repeated (static) inputs computed once, and the spill plan."""

from __future__ import annotations

import pytest
import torch

from wanquant.calibration.budget import spill_plan
from wanquant.numerics.stats import (
    HessianAccumulator, LayerStatsAccumulator, accumulate_gram, fp32_out_gemm_available, packed_numel, unpack_symmetric,
)

pytestmark = pytest.mark.usefixtures("seed")


def _bound(x64: torch.Tensor, weight: int, adds: int) -> torch.Tensor:
    """fp32 summation error bound of ``weight * x^T x``: adds * 2^-24 * sum |x_i x_j| (+ the weight's rounding)."""
    return (adds + 2) * 2.0 ** -24 * weight * (x64.abs().T @ x64.abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_matches_fp64_brute_force_on_cpu(dtype) -> None:
    k, t, w = 24, int(torch.randint(50, 400, ())), int(torch.randint(1, 9, ()))
    x = (torch.randn(t, k) * torch.rand(k) * 4).to(dtype)
    h = torch.zeros(k, k)
    path = accumulate_gram(h, x, weight=w)
    x64 = x.double()
    assert path == "fp32" and not fp32_out_gemm_available(torch.device("cpu"))  # no 16-bit fp32-output GEMM here
    assert ((h.double() - w * x64.T @ x64).abs() <= _bound(x64, w, t)).all()


def test_gram_rejects_bad_weights() -> None:
    h, x = torch.zeros(4, 4), torch.randn(3, 4)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="repeat weight"):
            accumulate_gram(h, x, weight=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_gemm_and_spill_paths_on_cuda_match_fp64() -> None:
    dev = torch.device("cuda")
    k, t = 512, 8192
    x = (torch.randn(t, k, device=dev) * torch.rand(k, device=dev) * 4).bfloat16()
    x64 = x.double()
    ref = x64.T @ x64
    h = torch.zeros(k, k, device=dev)
    assert accumulate_gram(h, x, weight=3).startswith("bf16_gemm")
    err = (h.double() - 3 * ref).abs()
    assert (err <= _bound(x64, 3, t)).all()
    host = torch.zeros(k, k)
    assert accumulate_gram(host, x).endswith("+spill")
    assert ((host.double() - ref.cpu()).abs() <= _bound(x64, 1, t).cpu()).all()
    h32 = torch.zeros(k, k, device=dev)
    assert accumulate_gram(h32, x, fast=False) == "fp32"
    assert ((h32.double() - ref).abs() <= _bound(x64, 1, t)).all()


def _int_batch(t: int, k: int) -> torch.Tensor:
    """Small integers: every product and sum below is exact in fp32, so any order gives the same bits."""
    return torch.randint(-8, 9, (t, k)).float()


def test_repeated_input_equals_its_repeated_feeds() -> None:
    k, bins, t = 16, 3, 40
    x = _int_batch(t, k)
    weights = {0: 5, 2: 3}
    once = LayerStatsAccumulator(k, bins, 64, quantile=0.9, seed=3, name="ctx")
    fed = LayerStatsAccumulator(k, bins, 64, quantile=0.9, seed=3, name="ctx")
    once.update_repeated(x, weights)
    for b, w in weights.items():
        for _ in range(w):
            fed.update(x, b)
    a, r = once.finalize(), fed.finalize()
    assert torch.equal(a.hessian, r.hessian)  # exact sums: bit for bit
    assert torch.equal(a.hessian.double(), 8 * x.double().T @ x.double())
    assert torch.equal(a.act_absmax, r.act_absmax) and torch.equal(a.act_quantile, r.act_quantile)
    assert torch.equal(once.hist.counts, fed.hist.counts)
    assert a.n_tokens == r.n_tokens == 8 * t
    assert a.reservoir_seen == r.reservoir_seen == {0: 5 * t, 2: 3 * t}
    for b, toks in a.reservoirs.items():  # the distinct tokens, sampled once
        assert len(toks) == t and torch.equal(toks.sort(0).values, x.sort(0).values)
    with pytest.raises(ValueError, match="bin 3"):
        once.update_repeated(x, {3: 1})


def test_repeated_input_hessian_close_to_fp64_for_real_values() -> None:
    k, t, w = 32, 100, 7
    x = torch.randn(t, k) * torch.rand(k) * 3
    acc = LayerStatsAccumulator(k, 2, 16)
    acc.update_repeated(x, {1: w})
    x64 = x.double()
    assert ((acc.hessian.hessian.double() - w * x64.T @ x64).abs() <= _bound(x64, w, t)).all()


def test_spill_plan_spills_the_fewest_largest_first() -> None:
    sizes = {f"l{i}": int(s) for i, s in enumerate(torch.randint(1, 1000, (30,)))}
    total = sum(sizes.values())
    assert spill_plan(sizes, total) == frozenset() and spill_plan(sizes, 0) == frozenset(sizes)
    for budget in torch.randint(0, total, (20,)).tolist():
        spilled = spill_plan(sizes, budget)
        rest = total - sum(sizes[k] for k in spilled)
        assert rest <= budget
        order = sorted(sizes, key=lambda k: -sizes[k])
        n = len(spilled)
        assert spilled == frozenset(order[:n])  # a prefix of the largest
        assert n == 0 or rest + sizes[order[n - 1]] > budget  # one fewer would not fit
    with pytest.raises(ValueError):
        spill_plan(sizes, -1)


@pytest.mark.parametrize("strip", [1, 5, 8, 24, 1000])
def test_packed_strips_equal_the_full_gram(strip) -> None:
    """Upper strips of any height (dividing K or not) hold exactly the entries of the full
    product they cover, and unpack to an exactly symmetric matrix within fp32 bounds of fp64."""
    k, t = 24, int(torch.randint(30, 300, ()))
    x = _int_batch(t, k)  # exact sums: any order gives the same bits
    packed = torch.zeros(packed_numel(k, strip))
    accumulate_gram(packed, x, weight=2, strip=strip)
    h = unpack_symmetric(packed, k, strip)
    assert torch.equal(h, h.T) and torch.equal(h.double(), 2 * x.double().T @ x.double())
    s = min(strip, k)
    assert packed.numel() == sum(min(s, k - r) * (k - r) for r in range(0, k, s))  # about half of k*k
    y = torch.randn(t, k) * torch.rand(k) * 3
    acc = HessianAccumulator(k, strip=strip)
    acc.update(y)
    acc.update(y[: t // 2])
    y64 = torch.cat([y, y[: t // 2]]).double()
    assert ((acc.hessian.double() - y64.T @ y64).abs() <= _bound(y64, 1, t + 2)).all()
    if strip < k:  # strips of k rows or more are the full matrix
        with pytest.raises(ValueError, match="strips of"):
            acc.merge(HessianAccumulator(k, strip=None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_statistics_stay_on_device_and_refuse_nan_when_read() -> None:
    """No per-batch check on the GPU (it would wait for the device): a NaN batch is refused
    when the statistics are read; spilled strips arrive asynchronously and equal resident ones."""
    dev = torch.device("cuda")
    k = 2048
    x = (torch.randn(4096, k, device=dev) * 2).bfloat16()
    res, spilled = LayerStatsAccumulator(k, 2, 64, device=dev, name="l"), LayerStatsAccumulator(k, 2, 64, name="l")
    for acc in (res, spilled):
        for i in range(3):
            acc.update(x[i * 1000:(i + 2) * 1000], i % 2)
    a, b = res.finalize(), spilled.finalize()
    assert res.absmax.value.device.type == "cuda" and spilled.hessian.packed.device.type == "cpu"
    x64 = torch.cat([x[i * 1000:(i + 2) * 1000] for i in range(3)]).double()
    for h in (a.hessian, b.hessian):
        assert ((h.double() - (x64.T @ x64).to(h.device)).abs() <= _bound(x64, 1, len(x64)).to(h.device)).all()
    assert torch.equal(a.act_absmax, x64.abs().amax(0).float().cpu())
    assert all(torch.equal(a.reservoirs[i], b.reservoirs[i]) for i in a.reservoirs)  # host keys: the same sample
    bad = x[:10].clone()
    bad[3, 7] = float("nan")
    res.update(bad, 0)  # not refused here
    with pytest.raises(ValueError, match="'l'.*NaN or Inf"):
        res.finalize()
