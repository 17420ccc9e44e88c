"""LoRA as more rank in a W4A4 layer's 16-bit branch: the math, as small pure functions.

A W4A4 layer computes ``y = Q(x/s) Q(R)^T + (x/s) L1^T L2^T + b`` (``x/s`` the smoothed
input). A LoRA adds ``strength * (B A x + b_lora)``, and since
``B A x = B (A diag(s)) (x/s)`` it is exactly more rank in the branch (DESIGN.md
section 9): append the rows ``strength * A diag(s)`` to L1 and the columns ``B`` to L2.

A layer that fuses several source linears (``attn1.to_qkv`` = q|k|v along the output)
takes one piece per member a LoRA touches: the pieces' A stack along the rank and their
B sit in the member's rows only, so the appended L2 block is block-diagonal (members a
LoRA does not touch add no rank at all).

``strength`` goes on the down side (``A``), not on ``B``: the kernels fold ``1/s`` into the
down projection in fp32 and keep it as a bf16 hi/lo pair anyway (~16 mantissa bits),
while the up projection is a plain bf16 operand, which keeps the file's bf16 ``B``
exact at any strength. Everything here is fp32; only the kernels narrow.

Part of ``numerics`` (pure math, explicit arguments, no wanquant imports): the runtime
layer (:mod:`wanquant.runtime.linear`) and the pipeline-level :mod:`wanquant.lora` use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraPiece:
    """A LoRA's factors for one member of a layer: ``y[rows] += B (A x) + bias``.

    ``row0`` is the member's first output row inside the (fused) layer; ``down`` is
    ``A [r, K]``, ``up`` is ``B [n, r]`` (``r`` may be 0 for a bias-only piece), ``bias``
    is ``[n]`` or None. Tensors keep the file's dtype; the functions below compute in fp32.
    """

    row0: int
    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def rows(self) -> int:
        return self.up.shape[0]


@dataclass
class LoraTerm:
    """One named LoRA on one layer: its pieces (one per member) and its strength."""

    pieces: tuple[LoraPiece, ...]
    strength: float = 1.0

    @property
    def rank(self) -> int:
        return sum(p.rank for p in self.pieces)


def check_pieces(pieces: Sequence[LoraPiece], in_features: int, out_features: int) -> None:
    """Raise ValueError for pieces that do not fit a ``[out_features, in_features]`` layer."""
    for p in pieces:
        if p.down.ndim != 2 or p.up.ndim != 2:
            raise ValueError(f"LoRA factors must be matrices, got A {tuple(p.down.shape)}, B {tuple(p.up.shape)}")
        if p.down.shape[1] != in_features:
            raise ValueError(f"A has {p.down.shape[1]} input features, the layer has {in_features}")
        if p.up.shape[1] != p.down.shape[0]:
            raise ValueError(f"B's rank {p.up.shape[1]} differs from A's {p.down.shape[0]}")
        if not (0 <= p.row0 and p.row0 + p.rows <= out_features):
            raise ValueError(f"rows {p.row0}..{p.row0 + p.rows} outside the layer's {out_features} outputs")
        if p.bias is not None and tuple(p.bias.shape) != (p.rows,):
            raise ValueError(f"bias has shape {tuple(p.bias.shape)}, expected ({p.rows},)")


def lora_rank(terms: Sequence[LoraTerm]) -> int:
    """Rank the LoRAs add to the branch."""
    return sum(t.rank for t in terms)


def extend_lowrank(l1: torch.Tensor, l2: torch.Tensor, smooth: torch.Tensor, terms: Sequence[LoraTerm],
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1', L2')`` in fp32 on ``device``: the base branch plus every term's rank.

    ``L1' = [L1; strength_1 A_1 diag(s); ...]`` ([r + r_lora, K]) and
    ``L2' = [L2 | B_1 | ...]`` ([N, r + r_lora], each ``B`` in its member's rows, zero
    elsewhere), so ``(x/s) L1'^T L2'^T = (x/s) L1^T L2^T + sum strength B A x``.
    """
    device = l1.device if device is None else torch.device(device)
    n, r = l2.shape
    extra = lora_rank(terms)
    s = _on(smooth, device)
    l1e = torch.empty(r + extra, l1.shape[1], dtype=torch.float32, device=device)
    l2e = torch.zeros(n, r + extra, dtype=torch.float32, device=device)
    l1e[:r] = _on(l1, device)
    l2e[:, :r] = _on(l2, device)
    c = r
    for term in terms:
        for p in term.pieces:
            k = p.rank
            if k:
                l1e[c:c + k] = _on(p.down, device) * s[None, :] * float(term.strength)
                l2e[p.row0:p.row0 + p.rows, c:c + k] = _on(p.up, device)
            c += k
    return l1e, l2e


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as fp32 on ``device``, moved in its own (usually 16-bit) dtype first: half the transfer."""
    return t.to(device).float()


def extend_bias(bias: torch.Tensor | None, out_features: int, terms: Sequence[LoraTerm],
                device: torch.device | str | None = None) -> torch.Tensor | None:
    """The layer bias plus every term's ``strength * bias`` (fp32), or ``bias`` unchanged when no term has one."""
    if not any(p.bias is not None for t in terms for p in t.pieces):
        return bias
    device = (bias.device if bias is not None else "cpu") if device is None else torch.device(device)
    out = torch.zeros(out_features, dtype=torch.float32, device=device)
    if bias is not None:
        out += bias.to(device, torch.float32)
    for term in terms:
        for p in term.pieces:
            if p.bias is not None:
                out[p.row0:p.row0 + p.rows] += p.bias.to(device, torch.float32) * float(term.strength)
    return out


def lora_delta(x: torch.Tensor, terms: Sequence[LoraTerm], out_features: int) -> torch.Tensor:
    """``sum strength (B A x + bias)`` in fp32 for ``x [..., K]``: the LoRA alone, for 16-bit layers and tests."""
    y = torch.zeros(*x.shape[:-1], out_features, dtype=torch.float32, device=x.device)
    xf = x.float()
    for term in terms:
        for p in term.pieces:
            d = (xf @ p.down.to(x.device, torch.float32).T) @ p.up.to(x.device, torch.float32).T
            if p.bias is not None:
                d = d + p.bias.to(x.device, torch.float32)
            y[..., p.row0:p.row0 + p.rows] += d * float(term.strength)
    return y


def merged_weight(weight: torch.Tensor, terms: Sequence[LoraTerm]) -> torch.Tensor:
    """``W + sum strength B A`` in fp32 (rows per piece): the LoRA merged the ordinary way (tests, references)."""
    w = weight.float().clone()
    for term in terms:
        for p in term.pieces:
            if p.rank:
                w[p.row0:p.row0 + p.rows] += float(term.strength) * (p.up.float() @ p.down.float())
    return w
