"""One activation-clip policy for both experts (the ``shared_policy`` ablation).

With ``ClipConfig.per_expert = False`` the clip table of a layer is searched once on
the pooled tokens of every expert, bin ``i`` with bin ``i``, and used by all of them.
Each expert has its own smoothing and weights, so tokens cannot simply be concatenated:
expert ``e``'s smoothed tokens are placed in their own block of columns and the
dequantized weights side by side, ``[x_1 0; 0 x_2] [W_1 | W_2]^T = [x_1 W_1^T; x_2 W_2^T]``.
Zero groups quantize to zero exactly, so the standard clip search on this block matrix
optimises the pooled objective ``sum_e |err_e|^2 / sum_e |y_e|^2``.
"""

from __future__ import annotations

import torch

from wanquant.method.config import QuantConfig
from wanquant.method.layer import search_clip_table
from wanquant.method.params import QuantizedLinearParams


def shared_clip_table(parts: list[tuple[QuantizedLinearParams, dict[int, torch.Tensor]]], cfg: QuantConfig,
                      num_bins: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """``parts``: per expert, its quantized layer and raw input reservoirs (bin -> tokens)."""
    k = parts[0][0].in_features
    if any(p.in_features != k for p, _ in parts):
        raise ValueError("experts disagree on the layer's input size; a shared clip policy needs equal shapes")
    weights, reservoirs = [], {}
    for e, (p, res) in enumerate(parts):
        w = p.dequantized_weight(cfg.weight_format)
        weights.append(w)
        inv = 1.0 / p.smooth.float()
        for b, tokens in res.items():
            block = torch.zeros(tokens.shape[0], k * len(parts), device=w.device)
            block[:, e * k:(e + 1) * k] = tokens.to(w.device).float() * inv.to(w.device)
            reservoirs.setdefault(b, []).append(block)
    pooled = {b: torch.cat(blocks) for b, blocks in reservoirs.items()}
    return search_clip_table(cfg.clip, pooled, torch.cat(weights, dim=1), cfg.act_format, num_bins, seed=seed)
