"""GPTQ against round-to-nearest and against a naive column-by-column reference."""

from __future__ import annotations


import pytest
import torch

from wanquant.formats import GroupFormat, MXFP4Format, make_format
from wanquant.formats.mxfp4 import E2M1_VALUES
from wanquant.numerics.gptq import gptq_quantize, hessian_weighted_error


# A fresh torch seed per test, printed for reproduction (conftest.py).
pytestmark = pytest.mark.usefixtures("seed")


FORMATS = [make_format("mxfp4"), make_format("mxfp4", scale_rule="safe_ceil"), make_format("int4")]


def _correlated_hessian(k: int, tokens: int = 2048) -> torch.Tensor:
    mix = torch.eye(k) + 0.7 * torch.randn(k, k) / k**0.5
    x = torch.randn(tokens, k) @ mix * torch.exp(torch.randn(k) * 0.5)
    return x.T @ x


def _nearest(col: torch.Tensor, step: torch.Tensor, fmt: GroupFormat) -> torch.Tensor:
    """Brute force: the representable value nearest to each entry, over all 16 codes."""
    if isinstance(fmt, MXFP4Format):
        levels = torch.tensor(sorted({s * m for m in E2M1_VALUES for s in (1.0, -1.0)}), dtype=col.dtype)
    else:
        levels = torch.tensor([i for i in range(-8, 8) if i >= -fmt.qmax], dtype=col.dtype)
    cand = levels[None, :] * step[:, None]
    return cand.gather(1, (col[:, None] - cand).abs().argmin(1, keepdim=True))[:, 0]


def naive_gptq(w: torch.Tensor, h: torch.Tensor, fmt: GroupFormat, act_order: bool, damp: float = 0.01):
    """Optimal-brain-quantizer form in fp64: explicit inverse, one column at a time, full updates."""
    w, h = w.double().clone(), h.double().clone()
    n, k = w.shape
    g = fmt.group_size
    dead = h.diagonal() == 0
    h[dead, dead] = h.diagonal()[~dead].mean()
    order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist() if act_order else list(range(k))
    hinv = torch.linalg.inv(h + damp * h.diagonal().abs().mean() * torch.eye(k, dtype=torch.float64))
    todo = list(order)
    scales = torch.zeros(n, k // g, dtype=fmt.scale_dtype)
    step = {}
    q = torch.zeros_like(w)
    for c in order:
        G = c // g
        if G not in step:  # first column of the group: scale from the group's current values
            scales[:, G] = fmt.quantize(w[:, G * g:(G + 1) * g].float()).scales[:, 0]
            s = scales[:, G].float()
            step[G] = torch.exp2(s - 127).double() if isinstance(fmt, MXFP4Format) else s.double()
        q[:, c] = _nearest(w[:, c], step[G], fmt)
        d = hinv[c, c]
        todo.remove(c)
        w[:, todo] -= ((w[:, c] - q[:, c]) / d)[:, None] * hinv[c, todo][None, :]
        hinv = hinv - hinv[:, c:c + 1] @ hinv[c:c + 1, :] / d  # eliminate column c
    return q.float(), scales


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [16, 128])
def test_matches_naive_reference(fmt: GroupFormat, act_order: bool, block: int) -> None:
    n, k = 12, 128
    w = torch.randn(n, k) * torch.exp(torch.randn(1, k) * 0.3)
    h = _correlated_hessian(k, 512)
    h[5, :] = h[:, 5] = 0  # a dead input channel
    res = gptq_quantize(w, h, fmt, block_size=block, act_order=act_order, dtype=torch.float64)
    q_ref, s_ref = naive_gptq(w, h, fmt, act_order)
    assert torch.equal(res.quantized.scales, s_ref)
    assert torch.equal(res.dequantized, q_ref)
    assert torch.equal(fmt.dequantize(res.quantized), res.dequantized)
    assert res.info["dead_columns"] == 1 and res.info["fallback"] is None


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_round_to_nearest(fmt: GroupFormat, act_order: bool) -> None:
    w = torch.randn(64, 256)
    h = _correlated_hessian(256)
    res = gptq_quantize(w, h, fmt, act_order=act_order)
    rtn = fmt.dequantize(fmt.quantize(w))
    e_gptq, e_rtn = hessian_weighted_error(w, res.dequantized, h), hessian_weighted_error(w, rtn, h)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert torch.equal(fmt.dequantize(res.quantized), res.dequantized)
    assert res.quantized.codes.dtype == torch.uint8 and int(res.quantized.codes.max()) <= 15


def test_indefinite_hessian_retries_damping() -> None:
    k = 64
    a = torch.randn(k, k // 4)
    h = a @ a.T
    h -= 0.05 * h.diagonal().mean() * torch.eye(k)  # min eigenvalue ~ -0.05 mean(diag): 0.01 is not enough
    res = gptq_quantize(torch.randn(8, k), h, make_format("mxfp4"), damp=0.01, max_damp_retries=3)
    assert res.info["damp_retries"] == 1 and abs(res.info["damp"] - 0.1) < 1e-12
    assert res.info["fallback"] is None and torch.isfinite(res.dequantized).all()


@pytest.mark.parametrize("fmt", FORMATS[::2], ids=lambda f: f.name)
def test_hopeless_hessian_falls_back_to_rtn(fmt: GroupFormat) -> None:
    w = torch.randn(8, 64)
    nan_h = torch.eye(64)
    nan_h[3, 4] = float("nan")
    neg_h = -torch.eye(64) * 5
    for h, retries in ((nan_h, 5), (neg_h, 0)):
        with pytest.warns(RuntimeWarning, match="layer 'blk.3.q'.*round-to-nearest"):
            res = gptq_quantize(w, h, fmt, max_damp_retries=retries, name="blk.3.q")
        assert res.info["fallback"] == "rtn" and res.info["reason"]
        ref = fmt.quantize(w)
        assert torch.equal(res.quantized.codes, ref.codes) and torch.equal(res.quantized.scales, ref.scales)


def test_all_dead_and_errors() -> None:
    fmt = make_format("mxfp4")
    w = torch.randn(4, 64)
    res = gptq_quantize(w, torch.zeros(64, 64), fmt)  # no live channel: nothing to compensate
    assert res.info["dead_columns"] == 64 and torch.equal(res.dequantized, fmt.dequantize(fmt.quantize(w)))
    with pytest.raises(ValueError, match="Hessian has shape"):
        gptq_quantize(w, torch.eye(32), fmt)
    with pytest.raises(ValueError, match="divisible"):
        gptq_quantize(torch.randn(4, 48), torch.eye(48), fmt)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(bad, torch.eye(64), fmt)
