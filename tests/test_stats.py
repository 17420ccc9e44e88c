"""Streaming calibration statistics: single pass == merged shards, bounded reservoirs."""

from __future__ import annotations


import pytest
import torch

from wanquant.numerics.stats import (
    AbsMax, HessianAccumulator, LayerStats, LayerStatsAccumulator, LogHistogram, TokenReservoir,
    admission_threshold,
)


# A fresh torch seed per test, printed for reproduction (conftest.py).
pytestmark = pytest.mark.usefixtures("seed")


def _batches(k: int, n: int = 4) -> list[torch.Tensor]:
    return [torch.randn(int(torch.randint(1, 300, ())), k) * torch.rand(k) * 5 for _ in range(n)]


def test_absmax_and_hessian_merge_equal_single_pass() -> None:
    k = 24
    xs = _batches(k)
    one_a, one_h = AbsMax(k), HessianAccumulator(k, torch.float64)
    for x in xs:
        one_a.update(x)
        one_h.update(x.reshape(1, -1, k))  # any leading shape
    shards = [(AbsMax(k), HessianAccumulator(k, torch.float64)) for _ in xs]
    for (a, h), x in zip(shards, xs):
        a.update(x)
        h.update(x)
    a0, h0 = shards[0]
    for a, h in shards[1:]:
        a0.merge(a)
        h0.merge(h)
    allx = torch.cat(xs).double()
    assert torch.equal(a0.value, one_a.value) and torch.equal(one_a.value, allx.abs().amax(0).float())
    assert h0.n_tokens == one_h.n_tokens == allx.shape[0]
    torch.testing.assert_close(h0.hessian, allx.T @ allx)
    torch.testing.assert_close(one_h.hessian, allx.T @ allx)
    torch.testing.assert_close(one_h.mean(), allx.T @ allx / allx.shape[0])


def test_histogram_quantile_bounds_and_exact_merge() -> None:
    k, q = 16, 0.99
    xs = [torch.distributions.StudentT(3.0).sample((2000, k)) * torch.exp(torch.randn(k)) for _ in range(3)]
    one = LogHistogram(k)
    parts = [LogHistogram(k) for _ in xs]
    for x, p in zip(xs, parts):
        one.update(x)
        p.update(x)
    for p in parts[1:]:
        parts[0].merge(p)
    assert torch.equal(parts[0].counts, one.counts)
    allx = torch.cat(xs).abs()
    n = allx.shape[0]
    true = allx.sort(0).values[int(torch.ceil(torch.tensor(q * n))) - 1]
    est = one.quantile(q)
    assert (est >= true).all() and (est <= true * 2 ** (1 / 8) * (1 + 1e-6)).all()
    assert torch.equal(one.quantile(1.0), allx.amax(0))


def test_nan_rejected_with_layer_name() -> None:
    x = torch.randn(5, 8)
    x[2, 3] = float("inf")
    for acc in (AbsMax(8, "blk.0.ffn"), HessianAccumulator(8, name="blk.0.ffn"), TokenReservoir(8, 4, name="blk.0.ffn"),
                LayerStatsAccumulator(8, 2, 4, name="blk.0.ffn")):
        with pytest.raises(ValueError, match="blk.0.ffn.*NaN or Inf"):
            acc.update(x) if not isinstance(acc, LayerStatsAccumulator) else acc.update(x, 0)
    with pytest.raises(ValueError, match="last dimension"):
        AbsMax(8).update(torch.randn(3, 9))
    with pytest.raises(TypeError):
        HessianAccumulator(8).update(torch.ones(3, 8, dtype=torch.int64))


def _index_stream(n: int, k: int = 2) -> list[torch.Tensor]:
    """Tokens whose value is their stream position, in batches of random sizes."""
    idx, out = 0, []
    while idx < n:
        b = min(int(torch.randint(1, 700, ())), n - idx)
        out.append(torch.arange(idx, idx + b, dtype=torch.float32)[:, None].expand(b, k).contiguous())
        idx += b
    return out


def test_reservoir_bounded_uniform_deterministic() -> None:
    n, cap, seed = 20000, 1000, int(torch.randint(0, 2**30, ()))
    stream = _index_stream(n)
    r = TokenReservoir(2, cap, seed)
    for x in stream:
        r.update(x)
        assert len(r.tokens) <= cap
    got = r.tokens[:, 0]
    assert len(got) == cap and r.n_seen == n and len(got.unique()) == cap
    # mean of a uniform sample without replacement from 0..n-1: sd ~ n / sqrt(12 cap)
    assert abs(float(got.mean()) - (n - 1) / 2) < 6 * n / (12 * cap) ** 0.5
    deciles = torch.histc(got, bins=10, min=0, max=n)
    assert (deciles > cap / 10 * 0.5).all()
    again = TokenReservoir(2, cap, seed)
    for x in stream:
        again.update(x)
    assert torch.equal(again.tokens, r.tokens)


def _keys_of(seed: int, sizes: list[int]) -> torch.Tensor:
    """The keys a reservoir draws for batches of ``sizes`` (the same seeded host stream)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(n, generator=g, dtype=torch.float64) for n in sizes])


def test_reservoir_is_exactly_the_smallest_keys_and_copies_few() -> None:
    """Against brute force: the kept tokens are exactly those with the ``cap`` smallest keys of
    the stream (and of the union after a merge), and far fewer than ``cap`` per batch are copied."""
    cap, seed = 300, int(torch.randint(0, 2**30, ()))
    stream = _index_stream(30000)
    r = TokenReservoir(2, cap, seed)
    for x in stream:
        r.update(x)
    keys = _keys_of(seed, [len(x) for x in stream])
    best = torch.topk(keys, cap, largest=False).indices
    assert set(r.tokens[:, 0].long().tolist()) == set(best.tolist())
    assert torch.equal(r.keys.sort().values, keys[best].sort().values)
    assert torch.equal(keys[r.tokens[:, 0].long()], r.keys)  # each slot's key is its token's
    harmonic = sum(1 / j for j in range(1, len(stream) + 1))
    assert r.n_copied < 3 * cap * (1 + harmonic) < cap * len(stream) / 2
    other = _index_stream(5000)
    o = TokenReservoir(2, cap, seed + 1)
    for x in other:
        o.update(x + 30000)
    both = torch.cat([keys, _keys_of(seed + 1, [len(x) for x in other])])
    r.merge(o)
    assert set(r.tokens[:, 0].long().tolist()) == set(torch.topk(both, cap, largest=False).indices.tolist())
    assert r.n_seen == 35000


def _equal_batches(n: int, size: int, k: int = 2, start: int = 0) -> list[torch.Tensor]:
    return [torch.arange(start + i * size, start + (i + 1) * size, dtype=torch.float32)[:, None].expand(size, k)
            .contiguous() for i in range(n)]


@pytest.mark.parametrize("planned", ["exact", "more_than_planned"])
def test_planned_reservoir_keeps_the_same_sample_and_copies_about_capacity(planned) -> None:
    """A stream planned in advance keeps exactly the tokens of the unplanned reservoir (brute
    force: the smallest keys), copies about ``capacity`` tokens in all instead of
    ``capacity (1 + ln batches)``, and merges as before."""
    cap, seed = int(torch.randint(200, 600, ())), int(torch.randint(0, 2**30, ()))
    n, size = int(torch.randint(60, 120, ())), int(torch.randint(300, 700, ()))
    stream = _equal_batches(n, size)
    plain, plan = TokenReservoir(2, cap, seed), TokenReservoir(2, cap, seed)
    plan.expect_batches(n if planned == "exact" else n // 2)  # a longer stream than planned: still exact
    for x in stream:
        plain.update(x)
        plan.update(x)
    keys = _keys_of(seed, [size] * n)
    best = set(torch.topk(keys, cap, largest=False).indices.tolist())
    assert set(plan.tokens[:, 0].long().tolist()) == best == set(plain.tokens[:, 0].long().tolist())
    assert torch.equal(keys[plan.tokens[:, 0].long()], plan.keys)
    assert plan.n_seen == plain.n_seen == n * size
    bound = cap + 6 * cap ** 0.5 + 32
    if planned == "exact":  # Binomial(n size, threshold): mean `bound`, sd < sqrt(bound)
        assert plan.n_copied < bound + 6 * bound ** 0.5
    assert plan.n_copied * 2 < plain.n_copied
    other = TokenReservoir(2, cap, seed + 1)
    other.expect_batches(n)
    for x in _equal_batches(n, size, start=n * size):
        other.update(x)
    both = torch.cat([keys, _keys_of(seed + 1, [size] * n)])
    plan.merge(other)
    assert set(plan.tokens[:, 0].long().tolist()) == set(torch.topk(both, cap, largest=False).indices.tolist())


def test_admission_threshold_is_a_six_sigma_bound() -> None:
    """Brute force: over many streams, the ``cap``-th smallest key stays below the threshold,
    and the expected admissions are ``cap + 6 sqrt(cap) + 32``."""
    cap, stream = int(torch.randint(50, 400, ())), int(torch.randint(5000, 20000, ()))
    thr = admission_threshold(cap, stream)
    kth = torch.rand(200, stream, dtype=torch.float64).kthvalue(cap, dim=1).values
    assert (kth < thr).all()
    assert thr * stream == pytest.approx(cap + 6 * cap ** 0.5 + 32)
    assert admission_threshold(cap, cap) == 1.0 and admission_threshold(cap, cap + 1) == 1.0


def test_plan_must_precede_the_stream() -> None:
    r = TokenReservoir(2, 10, 0)
    r.update(torch.randn(5, 2))
    with pytest.raises(RuntimeError, match="before its first batch"):
        r.expect_batches(3)
    with pytest.raises(ValueError, match=">= 1"):
        TokenReservoir(2, 10, 0).expect_batches(0)


def test_reservoir_merge_weighting() -> None:
    k, cap = 3, 500
    a, b = TokenReservoir(k, cap, seed=1), TokenReservoir(k, cap, seed=2)
    for _ in range(9):
        a.update(torch.zeros(1000, k))
    b.update(torch.ones(1000, k))
    a.merge(b)
    frac_b = float(a.tokens[:, 0].mean())  # B is 1000 of 10000 tokens
    assert len(a.tokens) == cap and a.n_seen == 10000
    assert abs(frac_b - 0.1) < 6 * (0.1 * 0.9 / cap) ** 0.5
    with pytest.raises(ValueError, match="same seed"):
        _fed(TokenReservoir(k, cap, 5)).merge(_fed(TokenReservoir(k, cap, 5)))


def _fed(r: TokenReservoir) -> TokenReservoir:
    r.update(torch.randn(10, r.k))
    return r


def test_layer_stats_accumulator_shards_merge() -> None:
    k, bins = 16, 3
    feed = [(torch.randn(int(torch.randint(10, 200, ())), k) * 3, int(torch.randint(0, bins, ()))) for _ in range(8)]
    one = LayerStatsAccumulator(k, bins, 64, quantile=0.9, seed=0, name="x")
    s1, s2 = LayerStatsAccumulator(k, bins, 64, quantile=0.9, seed=10), LayerStatsAccumulator(k, bins, 64, quantile=0.9, seed=20)
    for i, (x, b) in enumerate(feed):
        one.update(x, b)
        (s1 if i % 2 else s2).update(x, b)
    merged = s1.merge(s2).finalize()
    ref = one.finalize()
    assert torch.equal(merged.act_absmax, ref.act_absmax) and torch.equal(merged.act_quantile, ref.act_quantile)
    torch.testing.assert_close(merged.hessian, ref.hessian, rtol=1e-4, atol=1e-3)  # fp32 sums, other order
    assert merged.n_tokens == ref.n_tokens == sum(len(x) for x, _ in feed)
    for b, toks in merged.reservoirs.items():
        seen = sum(len(x) for x, bb in feed if bb == b)
        assert len(toks) == min(64, seen) and merged.reservoir_seen[b] == seen
    with pytest.raises(ValueError, match="bin"):
        one.update(torch.randn(2, k), bins)


def test_layer_stats_merge() -> None:
    k = 8

    def mk(n: int, t: int) -> LayerStats:
        x = torch.randn(n, k)
        return LayerStats(x.abs().amax(0), x.abs().amax(0) * 0.9, x.T @ x, n, {0: x[:t]}, {0: n})

    a, b = mk(900, 90), mk(100, 100)
    m = a.merge(b)
    assert m.n_tokens == 1000 and torch.equal(m.act_absmax, torch.maximum(a.act_absmax, b.act_absmax))
    torch.testing.assert_close(m.hessian, a.hessian + b.hessian)
    assert len(m.reservoirs[0]) == 190 and m.reservoir_seen[0] == 1000
    capped = a.merge(b, reservoir_capacity=50)
    assert len(capped.reservoirs[0]) == 50
    from_b = sum(bool((row == b.reservoirs[0]).all(1).any()) for row in capped.reservoirs[0])
    assert from_b == 5  # b stands for 10 % of the tokens
