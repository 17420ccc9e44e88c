"""GPTQ's plain-order block path: the same values as the original column loop (CPU), and
its CUDA-graph replay bit-identical to eager (CUDA only; ``-s`` shows a timing print)."""

from __future__ import annotations

import time

import pytest
import torch

from wanquant.formats import FORMATS, GroupFormat, make_format
from wanquant.numerics import gptq, gptq_graph
from wanquant.numerics.gptq import gptq_quantize

pytestmark = pytest.mark.usefixtures("seed")

FMTS = [make_format("mxfp4"), make_format("mxfp4", scale_rule="safe_ceil"), make_format("int4")]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _hessian(k: int, tokens: int, device: str = "cpu") -> torch.Tensor:
    mix = torch.eye(k, device=device) + 0.7 * torch.randn(k, k, device=device) / k**0.5
    x = torch.randn(tokens, k, device=device) @ mix * torch.exp(torch.randn(k, device=device) * 0.5)
    return x.T @ x


def _weight(n: int, k: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(n, k, device=device) * torch.exp(torch.randn(1, k, device=device) * 0.3)


def _with_original_loop(monkeypatch, *args, **kwargs):
    """gptq_quantize with its plain-order path replaced by the general column loop (any order,
    groups across blocks; the code before the block path existed, which act-order still runs)."""
    original = gptq._gptq_loop
    with monkeypatch.context() as m:
        m.setattr(gptq, "_plain_loop", lambda w, u, fmt, block, cuda_graph:
                  original(w, u, list(range(w.shape[1])), fmt, block))
        return gptq_quantize(*args, **kwargs)


def _assert_same(a, b) -> None:
    assert torch.equal(a.quantized.codes, b.quantized.codes)
    assert torch.equal(a.quantized.scales, b.quantized.scales)
    assert torch.equal(a.dequantized, b.dequantized)
    assert a.info["loss"] == b.info["loss"]


# ---- CPU ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.describe())
@pytest.mark.parametrize("n,k,block", [(7, 320, 128), (16, 256, 128), (5, 192, 64)])  # 320: ragged last block
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_path_equals_original_loop(monkeypatch, fmt: GroupFormat, n: int, k: int, block: int,
                                         dtype: torch.dtype) -> None:
    w, h = _weight(n, k), _hessian(k, 4 * k)
    h[3, :] = h[:, 3] = 0  # a dead input channel
    ref = _with_original_loop(monkeypatch, w, h, fmt, block_size=block, dtype=dtype)
    got = gptq_quantize(w, h, fmt, block_size=block, dtype=dtype)
    _assert_same(got, ref)


def test_formats_are_hashable_by_value() -> None:
    """The graph cache keys on the format object: equal formats must hash equal (frozen dataclasses)."""
    for cls in FORMATS.values():
        a, b = cls(), cls()
        assert a == b and hash(a) == hash(b) and gptq._hashable(a)
    assert make_format("mxfp4") != make_format("mxfp4", scale_rule="safe_ceil")


# ---- CUDA ---------------------------------------------------------------------------------------
@pytest.fixture
def fresh_cache():
    gptq_graph.clear_cache()
    yield
    gptq_graph.clear_cache()


@cuda
@pytest.mark.usefixtures("fresh_cache")
@pytest.mark.parametrize("fmt", [make_format("mxfp4"), make_format("int4")], ids=lambda f: f.name)
@pytest.mark.parametrize("n", [256, 1000])
@pytest.mark.parametrize("k", [1024, 1152, 1088])  # 1088: a ragged last block of 64 (runs eagerly)
def test_graph_equals_eager(fmt: GroupFormat, n: int, k: int) -> None:
    h = _hessian(k, 2 * k, "cuda")
    for call in range(2):  # the second call replays the cached graph on other data
        w = _weight(n, k, "cuda")
        eager = gptq_quantize(w, h, fmt, cuda_graph=False)
        graph = gptq_quantize(w, h, fmt, cuda_graph=True)
        _assert_same(graph, eager)
        assert len(gptq_graph._CACHE) == 1, "the graph path was not taken, or its graph not reused"


@cuda
@pytest.mark.usefixtures("fresh_cache")
def test_graph_path_matches_original_loop_on_cuda(monkeypatch) -> None:
    w, h = _weight(300, 640, "cuda"), _hessian(640, 1280, "cuda")
    fmt = make_format("mxfp4", scale_rule="safe_ceil")
    _assert_same(gptq_quantize(w, h, fmt), _with_original_loop(monkeypatch, w, h, fmt))


def _timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


@cuda
@pytest.mark.usefixtures("fresh_cache")
def test_timing_print() -> None:
    """Not an assertion on speed: eager vs graph at Wan2.2 A14B's layer shapes ([N, K])."""
    fmt = make_format("mxfp4")
    per = {}
    for n, k in [(5120, 5120), (13824, 5120), (5120, 13824)]:
        w, h = _weight(n, k, "cuda"), _hessian(k, 8192, "cuda")
        t_first, _ = _timed(lambda: gptq_quantize(w, h, fmt, cuda_graph=True))  # capture, library warm-up
        t_eager, eager = _timed(lambda: gptq_quantize(w, h, fmt, cuda_graph=False))
        t_graph, graph = _timed(lambda: gptq_quantize(w, h, fmt, cuda_graph=True))
        _assert_same(graph, eager)
        per[n, k] = (t_eager, t_graph)
        print(f"\ngptq_quantize N={n} K={k}: eager {t_eager:.3f} s, graph {t_graph:.3f} s "
              f"(first call with capture {t_first:.3f} s), x{t_eager / t_graph:.1f}")
    # One Wan2.2 A14B block: 8 attention projections [5120, 5120], FFN up [13824, 5120], down [5120, 13824].
    block = [8 * per[5120, 5120][i] + per[13824, 5120][i] + per[5120, 13824][i] for i in (0, 1)]
    print(f"per transformer block: eager {block[0]:.2f} s, graph {block[1]:.2f} s")
