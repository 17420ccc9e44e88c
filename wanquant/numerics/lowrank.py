"""The 16-bit low-rank branch: ``W ~= L2 @ L1 + R`` with ``L1 [r, K]``, ``L2 [N, r]``.

Three ways to pick the rank-``r`` part (all computed in fp32 on ``w``'s device):

* ``exact``: the truncated SVD, minimising ``||R||_F``, computed from the fp64
  eigendecomposition of the smaller Gram matrix (``W W^T`` or ``W^T W``): the top-r
  eigenvectors span exactly the top-r singular subspace and the branch is the
  projection of ``W`` on it. On an H100 this takes 0.25 s for 13824 x 5120 against
  2.05 s for ``torch.linalg.svd`` (benchmarks/results/layer_ptq.md); fp64 keeps the
  top singular vectors accurate (squaring the condition number costs nothing at
  fp64 precision for the leading directions).
* ``randomized``: a seeded range finder with power iterations (Halko, Martinsson and
  Tropp 2011), then an SVD of the small projected matrix. Only matrix products on the
  big matrix, so it is fast on GPUs; close to exact when the spectrum decays.
* ``activation_aware``: minimises ``||R X^T||_F = ||R C||_F`` where ``H = X^T X = C C^T``
  (Cholesky of the damped Hessian), i.e. the output error of the branch on the
  calibration inputs rather than the weight error. Take the best rank-r
  approximation ``M`` of ``W C`` (an SVD) and map back with ``M C^-1``: since ``C`` is
  invertible, ``L2 L1 C = M`` is the optimum of the weighted problem (Eckart-Young on
  ``W C``). ``L1 = V_r^T C^-1`` is a triangular solve.

For ``randomized`` and ``activation_aware``, and ``exact`` with ``N > K``, ``L1`` has
orthonormal rows and ``L2`` carries the singular values; ``exact`` with ``N <= K``
returns orthonormal columns in ``L2`` and ``L1 = L2^T W`` (no division by small
singular values). Only the product ``L2 @ L1`` is meaningful.

Layering: ``formats`` -> ``numerics`` (here) -> ``method``; plain tensors in and out.
"""

from __future__ import annotations

from typing import Literal

import torch

Method = Literal["exact", "randomized", "activation_aware"]


def _empty(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = w.shape
    return w.new_zeros(0, k), w.new_zeros(n, 0), w.clone()


def randomized_svd(
    a: torch.Tensor, rank: int, oversample: int = 16, n_iter: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` ``U [N,r], S [r], Vh [r,K]`` of ``a`` by a seeded randomized range finder."""
    n, k = a.shape
    p = min(rank + oversample, n, k)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(k, p, generator=gen).to(a.device, a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(n_iter):  # power iterations, re-orthonormalised so small directions survive fp32
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def exact_topr(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1, L2)`` of the best rank-``rank`` approximation via the smaller fp64 Gram matrix."""
    wd = w.double()
    if w.shape[0] <= w.shape[1]:
        u = torch.linalg.eigh(wd @ wd.T).eigenvectors[:, -rank:].flip(1)  # eigh sorts ascending
        return (u.T @ wd).float(), u.float()
    v = torch.linalg.eigh(wd.T @ wd).eigenvectors[:, -rank:].flip(1)
    return v.T.float(), (wd @ v).float()


def damped_cholesky(h: torch.Tensor, damp: float = 0.01, max_retries: int = 5) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of ``h + lam I``, ``lam = damp * mean(diag h)``, x10 per retry.

    Returns the factor and the ``lam`` used; raises ``RuntimeError`` if every try fails.
    """
    h = (h + h.T) * 0.5
    scale = float(h.diagonal().abs().mean()) or 1.0
    lam = damp * scale
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(max_retries + 1):
        c, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0 and torch.isfinite(c).all():
            return c, lam
        lam = max(lam, 1e-6 * scale) * 10.0
    raise RuntimeError(f"Hessian is not positive definite even with damping {lam / 10:.3g}")


def lowrank_split(
    w: torch.Tensor,
    rank: int,
    method: Method = "exact",
    hessian: torch.Tensor | None = None,
    oversample: int = 16,
    n_iter: int = 4,
    seed: int = 0,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``w [N, K]`` into ``(L1 [r, K], L2 [N, r], residual [N, K])`` (fp32).

    ``rank`` 0 gives an empty branch and the whole weight as residual. ``hessian``
    (``[K, K]``, the input's ``X^T X``) is needed by ``activation_aware`` only.
    """
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    w = w.float()
    n, k = w.shape
    if not 0 <= rank <= min(n, k):
        raise ValueError(f"rank must be in [0, {min(n, k)}] for a {n}x{k} weight, got {rank}")
    if rank == 0:
        return _empty(w)
    if method == "exact":
        l1, l2 = exact_topr(w, rank)
    elif method == "randomized":
        u, s, vh = randomized_svd(w, rank, oversample, n_iter, seed)
        l1, l2 = vh, u * s
    elif method == "activation_aware":
        if hessian is None:
            raise ValueError("activation_aware low-rank needs the input Hessian")
        if hessian.shape != (k, k):
            raise ValueError(f"Hessian has shape {tuple(hessian.shape)}, expected ({k}, {k})")
        # The factorisation in fp64 (cheap, and Hessians are often badly conditioned),
        # the big SVD in fp32.
        c = damped_cholesky(hessian.to(w.device, torch.float64), damp)[0].float()
        u, s, vh = torch.linalg.svd(w @ c, full_matrices=False)
        # L1 = Vh_r C^-1  <=>  C^T L1^T = Vh_r^T  (C^T is upper triangular)
        l1 = torch.linalg.solve_triangular(c.T, vh[:rank].T, upper=True).T
        l2 = u[:, :rank] * s[:rank]
    else:
        raise ValueError(f"unknown low-rank method {method!r}; use exact, randomized or activation_aware")
    return l1.contiguous(), l2.contiguous(), w - l2 @ l1
