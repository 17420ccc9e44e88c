"""Activation clip search: constructed optima, brute-forced objective, per-bin tables."""

from __future__ import annotations


import pytest
import torch

from wanquant.formats import make_format
from wanquant.numerics.clip import clip_table, search_clip

RATIOS, OFFSETS = [0.6, 0.7, 0.8, 0.9, 1.0], [-1, 0, 1]


# A fresh torch seed per test, printed for reproduction (conftest.py).
pytestmark = pytest.mark.usefixtures("seed")


def _groups(pattern: list[float], tokens: int, groups: int) -> torch.Tensor:
    """Tokens made of copies of ``pattern`` with random signs, positions and power-of-two scales."""
    g = len(pattern)
    base = torch.tensor(pattern).repeat(tokens, groups, 1)
    base = base.gather(-1, torch.argsort(torch.rand(tokens, groups, g), -1))
    base = base * torch.where(torch.rand_like(base) < 0.5, -1.0, 1.0)
    return (base * torch.exp2(torch.randint(-3, 4, (tokens, 1, 1)).float())).reshape(tokens, groups * g)


def test_int4_known_optimum() -> None:
    # Group of 64: one 7 and 63 values of 0.6. Squared error per group, by hand:
    # c=0.6: 0 + 2.8^2 = 7.84, 0.7: 63*0.01 + 2.1^2 = 5.04, 0.8: 63*0.04 + 1.4^2 = 4.48,
    # 0.9: 63*0.09 + 0.7^2 = 6.16, 1.0: 63*0.16 = 10.08  ->  0.8 is best.
    x = _groups([7.0] + [0.6] * 63, 32, 4)
    r = search_clip(x, torch.eye(256), make_format("int4"), RATIOS, OFFSETS)
    assert (r.clip_ratio, r.exp_offset) == (0.8, 0)
    assert torch.isnan(r.grid[:, [0, 2]]).all() and not torch.isnan(r.grid[:, 1]).any()  # int4: offset 0 only
    per_group = r.grid[:, 1] * (49 + 63 * 0.36)  # the error is relative to each group's energy
    torch.testing.assert_close(per_group, torch.tensor([7.84, 5.04, 4.48, 6.16, 10.08], dtype=torch.float64),
                               rtol=0.03, atol=0)  # bf16 scales move these slightly


def test_mx_known_optimum() -> None:
    # One 7.5 and 31 ones. Offset 0 (e=0): 7.5 saturates to 6 (err 2.25), ones exact.
    # Offset +1 (e=1): 7.5/2 = 3.75 -> 4 -> 8 (err 0.25), 1/2 = 0.5 exact. Offset -1: 7.5 -> 3.
    # Every clip ratio >= 0.6 keeps 7.5 c >= 4: same exponent, so the mildest (1.0, +1) wins.
    x = _groups([7.5] + [1.0] * 31, 16, 8)
    r = search_clip(x, torch.eye(256), make_format("mxfp4"), RATIOS, OFFSETS)
    assert (r.clip_ratio, r.exp_offset) == (1.0, 1)
    assert torch.allclose(r.grid[:, 2], r.grid[-1, 2])


@pytest.mark.parametrize("name", ["mxfp4", "int4"])
def test_objective_vs_brute_force(name: str) -> None:
    fmt = make_format(name)
    x = torch.distributions.StudentT(3.0).sample((300, 128))
    w = torch.randn(48, 128)
    r = search_clip(x, w, fmt, RATIOS, OFFSETS, max_tokens=1000)
    y = x @ w.T
    for i, c in enumerate(RATIOS):
        for j, o in enumerate(OFFSETS):
            if name == "int4" and o:
                continue
            want = float(((fmt.fake_quantize(x, c, o) @ w.T - y).double().square().sum() / y.double().square().sum()))
            assert abs(float(r.grid[i, j]) - want) <= 1e-5 * want
    assert r.error == float(torch.nan_to_num(r.grid, nan=float("inf")).min())
    assert r.baseline_error == float(r.grid[-1, 1])


def test_max_tokens_subsamples_deterministically() -> None:
    x, w = torch.randn(500, 64), torch.randn(16, 64)
    a = search_clip(x, w, make_format("mxfp4"), RATIOS, OFFSETS, max_tokens=100, seed=3)
    b = search_clip(x, w, make_format("mxfp4"), RATIOS, OFFSETS, max_tokens=100, seed=3)
    sub = search_clip(x[:100], w, make_format("mxfp4"), RATIOS, OFFSETS, max_tokens=100)
    assert torch.equal(a.grid, b.grid) and not torch.equal(a.grid, sub.grid)
    with pytest.raises(ValueError):
        search_clip(torch.randn(5, 32), w, make_format("mxfp4"), RATIOS, OFFSETS)


def test_clip_table_modes() -> None:
    fmt = make_format("int4")
    w = torch.eye(256)
    clipped = _groups([7.0] + [0.6] * 63, 32, 4)  # best 0.8
    flat = _groups([1.0] * 64, 32, 4)  # exact at 1.0: anything else loses
    res = {0: clipped, 1: flat}
    table, rep = clip_table(res, w, fmt, 3, RATIOS, OFFSETS)
    assert table.dtype == torch.float32 and table.shape == (3, 2)
    assert table[0].tolist() == [pytest.approx(0.8), 0.0] and table[1].tolist() == [1.0, 0.0]
    assert rep["fallback_bins"] == [2] and table[2].tolist() == pytest.approx([rep["pooled"]["clip_ratio"], rep["pooled"]["exp_offset"]])
    glob, grep_ = clip_table(res, w, fmt, 3, RATIOS, OFFSETS, per_bin=False)
    assert (glob == glob[0]).all() and grep_["fallback_bins"] == []
    off, _ = clip_table(res, w, fmt, 3, RATIOS, OFFSETS, enabled=False)
    assert off.tolist() == [[1.0, 0.0]] * 3
    none, nrep = clip_table({}, w, fmt, 2, RATIOS, OFFSETS)
    assert none.tolist() == [[1.0, 0.0]] * 2 and nrep["fallback_bins"] == [0, 1]
    # smoothing is applied as x * (1 / s) before the search
    s = torch.exp2(torch.randint(-2, 3, (256,)).float())
    t_s, _ = clip_table({0: clipped * s}, w, fmt, 1, RATIOS, OFFSETS, smooth=s)
    assert t_s[0].tolist() == [pytest.approx(0.8), 0.0]
    with pytest.raises(ValueError, match="outside"):
        clip_table({5: flat}, w, fmt, 3, RATIOS, OFFSETS)
