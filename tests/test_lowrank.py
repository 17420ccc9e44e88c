"""Low-rank split: exact, randomized and activation-aware."""

from __future__ import annotations


import pytest
import torch

from wanquant.numerics.lowrank import damped_cholesky, lowrank_split


# A fresh torch seed per test, printed for reproduction (conftest.py).
pytestmark = pytest.mark.usefixtures("seed")


def _decaying(n: int, k: int, r: int = 0) -> torch.Tensor:
    """A matrix with a geometrically decaying spectrum (a realistic weight shape)."""
    u = torch.linalg.qr(torch.randn(n, min(n, k))).Q
    v = torch.linalg.qr(torch.randn(k, min(n, k))).Q
    s = 0.85 ** torch.arange(min(n, k), dtype=torch.float32) + 0.01
    return (u * s) @ v.T


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_full_rank_reconstructs(method: str, shape: tuple[int, int]) -> None:
    w = torch.randn(*shape)
    full = min(shape)
    l1, l2, r = lowrank_split(w, full, method)
    assert l1.shape == (full, shape[1]) and l2.shape == (shape[0], full)
    torch.testing.assert_close(l2 @ l1, w, atol=2e-4, rtol=1e-4)
    assert float(r.abs().max()) < 2e-4
    rank_deficient = torch.randn(shape[0], 3) @ torch.randn(3, shape[1])  # zero singular values are fine
    l1, l2, r = lowrank_split(rank_deficient, full, method)
    assert torch.isfinite(l1).all() and torch.isfinite(l2).all() and float(r.abs().max()) < 1e-3


def test_exact_is_eckart_young() -> None:
    w = torch.randn(30, 50)
    sv = torch.linalg.svdvals(w.double())
    for r in (1, 5, 17):
        l1, l2, res = lowrank_split(w, r, "exact")
        torch.testing.assert_close(res.double().square().sum(), sv[r:].square().sum(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(l2.T @ l2, torch.eye(r), atol=1e-5, rtol=0)  # N <= K: orthonormal L2
        torch.testing.assert_close(res, w - l2 @ l1)
        tall = lowrank_split(w.T.contiguous(), r, "exact")  # N > K: orthonormal rows in L1
        torch.testing.assert_close(tall[0] @ tall[0].T, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(tall[2].double().square().sum(), sv[r:].square().sum(), rtol=1e-4, atol=1e-4)


def test_randomized_close_to_exact() -> None:
    w = _decaying(200, 320)
    for r in (8, 32):
        e = lowrank_split(w, r, "exact")[2].square().sum()
        z = lowrank_split(w, r, "randomized", n_iter=4, seed=3)[2].square().sum()
        assert e <= z * (1 + 1e-4) and z <= e * 1.01
    a, b = lowrank_split(w, 8, "randomized", seed=5), lowrank_split(w, 8, "randomized", seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # deterministic with a seed


def test_activation_aware_minimises_output_error() -> None:
    n, k, r = 40, 64, 6
    w = torch.randn(n, k)
    x = torch.randn(512, k) * torch.exp(torch.randn(k) * 1.5)  # very uneven channel energies
    h = x.T @ x

    def out_err(res: torch.Tensor) -> float:
        return float(((res @ h) * res).sum())

    plain = lowrank_split(w, r, "exact")[2]
    aware = lowrank_split(w, r, "activation_aware", hessian=h, damp=1e-6)[2]
    assert out_err(aware) < out_err(plain)
    l1, l2, res = lowrank_split(w, min(n, k), "activation_aware", hessian=h, damp=1e-6)
    torch.testing.assert_close(l2 @ l1, w, atol=1e-3, rtol=1e-3)


def test_rank_zero_and_errors() -> None:
    w = torch.randn(6, 10)
    l1, l2, r = lowrank_split(w, 0)
    assert l1.shape == (0, 10) and l2.shape == (6, 0) and torch.equal(r, w)
    assert torch.equal(l2 @ l1, torch.zeros(6, 10))
    with pytest.raises(ValueError, match="rank"):
        lowrank_split(w, 7)
    with pytest.raises(ValueError, match="Hessian"):
        lowrank_split(w, 2, "activation_aware")
    with pytest.raises(ValueError, match="method"):
        lowrank_split(w, 2, "magic")  # type: ignore[arg-type]


def test_damped_cholesky_retries() -> None:
    a = torch.randn(16, 4, dtype=torch.float64)
    h = a @ a.T - 0.05 * float((a @ a.T).diagonal().mean()) * torch.eye(16, dtype=torch.float64)
    c, lam = damped_cholesky(h, 0.01)
    assert lam > 0.05 * float((a @ a.T).diagonal().mean())
    torch.testing.assert_close(c @ c.T, h + lam * torch.eye(16, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        damped_cholesky(h, 0.01, max_retries=0)
