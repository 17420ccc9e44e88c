"""GPTQ (Frantar et al. 2023) for weights in any group-scaled 4-bit format.

The format is injected as an object (as in IST-DASLab's ``gptq.py``): the loop asks it
for a group's static scale (:meth:`~wanquant.formats.GroupFormat.group_scale`), for a
column quantized at fixed steps (:meth:`~wanquant.formats.GroupFormat.round_to_step`)
and for the final codes (:meth:`~wanquant.formats.GroupFormat.codes_at_step`).

Columns (input channels) are quantized one at a time; each one's rounding error is
spread over the not-yet-quantized columns through the upper Cholesky factor ``U`` of
``H^-1``, so that ``tr(dW H dW^T)`` (the output error on the calibration inputs) stays
small. Updates are applied lazily per block of columns, as in IST-DASLab's code. In
plain order with every group inside one block (the default), a block's column loop is a
function of fixed shapes (:func:`_block`); on CUDA it is replayed as one CUDA graph
(:mod:`wanquant.numerics.gptq_graph`), the same kernels without ~10 launches per column.

Group scales are "static" once set: a group's scale (e.g. E8M0 exponent, or bf16 step) is
chosen from the *current*, error-updated values of all its columns at the moment the
first of them is quantized, and every column of the group then uses it.

Act-order (columns processed by decreasing ``diag H``): groups stay contiguous along
the original K (our storage and kernels have no ``g_idx``); a group's scale is set when
its first column comes up in the permuted order, from the current values of its
columns wherever they are (pending lazy updates included). Codes are written back in
the original column order, so the output is indistinguishable from the plain order's.

Dead columns (``diag H == 0``: the input channel was always zero) get a unit Hessian
entry; their weights are kept (not zeroed: the channel may be live at inference) and
are in effect rounded to nearest, their error propagating nowhere.

Layering: ``formats`` -> ``numerics`` (here) -> ``method``; imports only the formats.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import torch

from wanquant.formats import GroupFormat, Quantized
from wanquant.numerics.gptq_graph import graph_for


class GPTQResult(NamedTuple):
    quantized: Quantized  # codes [N, K] uint8, scales [N, K/g]
    dequantized: torch.Tensor  # fp32 [N, K], exactly dequantize(quantized)
    info: dict[str, Any]  # damping, retries, fallback, dead columns, errors


def _factor(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor | None, float, int, str]:
    """Upper Cholesky factor of (H + lam I)^-1, with up to ``retries`` x10 damping increases."""
    if not torch.isfinite(h).all():
        return None, 0.0, 0, "Hessian contains NaN or Inf"
    scale = float(h.diagonal().abs().mean()) or 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    rel = damp
    for attempt in range(retries + 1):
        lc, info = torch.linalg.cholesky_ex(h + rel * scale * eye)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lc), upper=True)
            if int(info) == 0 and torch.isfinite(u).all():
                return u, rel, attempt, ""
        rel = max(rel, 1e-6) * 10.0
    return None, rel / 10.0, retries, f"Cholesky failed with damping up to {rel / 10.0:g} x mean(diag H)"


def _gptq_loop(w: torch.Tensor, u: torch.Tensor, perm: list[int], fmt: GroupFormat, block: int):
    """The core: ``w`` and ``u`` in processing order; returns values, scales, steps, loss.

    Any order and block size: a group's columns may lie in several blocks (or, with
    act-order, anywhere); :func:`_plain_loop` is the common case, faster."""
    n, k = w.shape
    g = fmt.group_size
    group = [c // g for c in perm]  # original group of each processing position
    inv = [0] * k
    for p, c in enumerate(perm):
        inv[c] = p
    pos = {G: sorted(inv[G * g:(G + 1) * g]) for G in range(k // g)}  # positions of each group
    first = {ps[0]: G for G, ps in pos.items()}
    q = torch.zeros_like(w)
    scales = torch.zeros(n, k // g, dtype=fmt.scale_dtype, device=w.device)
    steps = torch.zeros(n, k // g, dtype=torch.float32, device=w.device)
    loss = torch.zeros(n, dtype=w.dtype, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1, err1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2], torch.zeros(n, i2 - i1, dtype=w.dtype, device=w.device)
        for i in range(i2 - i1):
            if i1 + i in first:  # a group starts: scale from its columns' current values
                G = first[i1 + i]
                cur = _current_columns(w, w1, err1, u, pos[G], i1, i2, i)
                scales[:, G], steps[:, G] = fmt.group_scale(cur.abs().amax(1))
            col = w1[:, i]
            qc = fmt.round_to_step(col, steps[:, group[i1 + i]])
            err1[:, i] = (col - qc) / u1[i, i]
            w1[:, i:].addr_(err1[:, i], u1[i, i:], alpha=-1.0)
            q[:, i1 + i] = qc
        w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)
        loss += err1.square().sum(1)
    return q, scales, steps, loss


def _plain_loop(w: torch.Tensor, u: torch.Tensor, fmt: GroupFormat, block: int, cuda_graph: bool):
    """:func:`_gptq_loop` for plain order with ``block % group_size == 0`` (every group inside
    one block), same values; full-width blocks on CUDA replay one CUDA graph if ``cuda_graph``."""
    n, k = w.shape
    g = fmt.group_size
    q = torch.empty_like(w)
    scales = torch.empty(n, k // g, dtype=fmt.scale_dtype, device=w.device)
    steps = torch.empty(n, k // g, dtype=torch.float32, device=w.device)
    loss = torch.zeros(n, dtype=w.dtype, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        if cuda_graph and w.is_cuda and i2 - i1 == block and _hashable(fmt):  # a ragged last block runs eagerly
            # Formats are frozen dataclasses, hashed by value: equal formats compute alike, so share a graph.
            key = ("gptq_block", n, block, w.dtype, w.device, fmt)
            q1, err1, s1, st1 = graph_for(key, functools.partial(_block, fmt=fmt), w1, u1).run(w1, u1)
        else:
            q1, err1, s1, st1 = _block(w1.clone(), u1, fmt)
        q[:, i1:i2] = q1
        scales[:, i1 // g:i2 // g], steps[:, i1 // g:i2 // g] = s1, st1
        w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)
        loss += err1.square().sum(1)
    return q, scales, steps, loss


def _hashable(x: object) -> bool:
    try:
        hash(x)
    except TypeError:  # e.g. a format with a list-valued field: it runs eagerly
        return False
    return True


def _block(w1: torch.Tensor, u1: torch.Tensor, fmt: GroupFormat):
    """One block of plain-order GPTQ, its groups inside it: ``w1 [n, b]`` (updated in place),
    ``u1 [b, b]`` -> values, scaled errors, scales and steps of the block. Static shapes and
    no host syncs, so that it can be captured as a CUDA graph."""
    n, b = w1.shape
    g = fmt.group_size
    q1, err1 = torch.empty_like(w1), torch.empty_like(w1)
    scales = torch.empty(n, b // g, dtype=fmt.scale_dtype, device=w1.device)
    steps = torch.empty(n, b // g, dtype=torch.float32, device=w1.device)
    for i in range(b):
        if i % g == 0:  # a group starts: scale from its columns' current values
            scales[:, i // g], steps[:, i // g] = fmt.group_scale(w1[:, i:i + g].abs().amax(1))
        col = w1[:, i]
        qc = fmt.round_to_step(col, steps[:, i // g])
        err1[:, i] = (col - qc) / u1[i, i]
        w1[:, i:].addr_(err1[:, i], u1[i, i:], alpha=-1.0)
        q1[:, i] = qc
    return q1, err1, scales, steps


def _current_columns(w, w1, err1, u, ps: list[int], i1: int, i2: int, i: int) -> torch.Tensor:
    """Current values of the (unquantized) columns at positions ``ps``: in-block ones live in
    ``w1``; later ones still owe this block's pending update ``-err1[:, :i] @ u[i1:i1+i, p]``."""
    if ps[0] >= i1 and ps[-1] < i2:  # the common case: the whole group inside this block
        idx = torch.tensor([p - i1 for p in ps], device=w.device)
        return w1[:, idx]
    cols = []
    for p in ps:
        if p < i2:
            cols.append(w1[:, p - i1])
        else:
            cols.append(w[:, p] - err1[:, :i] @ u[i1:i1 + i, p] if i else w[:, p])
    return torch.stack(cols, 1)


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, fmt: GroupFormat, block_size: int = 128, damp: float = 0.01,
    max_damp_retries: int = 5, act_order: bool = False, name: str = "", dtype: torch.dtype = torch.float32,
    cuda_graph: bool = True,
) -> GPTQResult:
    """GPTQ-quantize ``weight [N, K]`` given the input Hessian ``X^T X [K, K]`` (any scale).

    The Hessian is factorised in fp64; the column loop runs in ``dtype`` (fp32; fp64 for
    reference checks). With ``cuda_graph`` (and plain order, ``block_size`` a multiple of
    the group size, CUDA tensors) each block's column loop is replayed as one CUDA graph:
    same values, far fewer kernel launches.

    Falls back to round-to-nearest, with a warning and ``info["fallback"] == "rtn"``,
    when the Hessian has NaN/Inf or cannot be factorised with any allowed damping.
    """
    who = f"layer {name!r}: " if name else ""
    fmt.check_quantizable(weight, f"{who}weight")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"{who}Hessian has shape {tuple(hessian.shape)}, expected ({k}, {k})")
    h = hessian.to(weight.device, torch.float64)
    h = (h + h.T) * 0.5
    dead = h.diagonal() == 0
    live_mean = float(h.diagonal()[~dead].mean()) if bool((~dead).any()) else 1.0
    h[dead, dead] = live_mean if live_mean > 0 else 1.0
    info: dict[str, Any] = {"dead_columns": int(dead.sum()), "act_order": act_order, "fallback": None}
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k, device=h.device)
    # Plain order skips the permuted copies (two [K, K] fp64 matrices: 1.5 GB each at K = 13824).
    u, rel, tries, why = _factor(h[perm][:, perm] if act_order else h, damp, max_damp_retries)
    info.update(damp=rel, damp_retries=tries)
    if u is None:
        warnings.warn(f"{who}GPTQ impossible ({why}); falling back to round-to-nearest", RuntimeWarning, stacklevel=2)
        qz = fmt.quantize(weight.float())
        deq = fmt.dequantize(qz)
        info.update(fallback="rtn", reason=why)
        return GPTQResult(qz, deq, info)
    perm_l = perm.tolist()
    w = weight.to(dtype)[:, perm].clone() if act_order else weight.to(dtype, copy=True)
    if not act_order and block_size % fmt.group_size == 0:  # every group inside one block
        q, scales, steps, loss = _plain_loop(w, u.to(dtype), fmt, block_size, cuda_graph)
    else:
        q, scales, steps, loss = _gptq_loop(w, u.to(dtype), perm_l, fmt, block_size)
    q = q.float()  # exact: every value is a 4-bit level times its group's (fp32) step
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    codes[:, perm] = _codes(q, steps, perm_l, fmt)
    deq = torch.empty_like(q)
    deq[:, perm] = q
    info["loss"] = float(loss.sum())
    return GPTQResult(Quantized(codes, scales), deq, info)


def _codes(q: torch.Tensor, steps: torch.Tensor, perm: list[int], fmt: GroupFormat) -> torch.Tensor:
    """Codes of the processing-order values ``q``, each column with its own group's step."""
    return fmt.codes_at_step(q, steps[:, [c // fmt.group_size for c in perm]])


def hessian_weighted_error(w: torch.Tensor, w_q: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)``: relative output error on the calibration inputs."""
    h = hessian.to(w.device, torch.float32)
    d = (w_q.float() - w.float())
    den = float(((w.float() @ h) * w.float()).sum())
    return float(((d @ h) * d).sum()) / den if den > 0 else float("nan")
