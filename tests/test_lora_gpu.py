"""GPU checks of LoRAs on the fast path at Wan shapes (skipped without CUDA + FP8).

Base rank 32 plus rank-64 LoRAs makes the branch 96..416 wide: this compiles and runs the
chunked low-rank GEMM and the narrowed activation launches (dispatch.fit_act_launch) for
the token counts whose launches differ (text 512, 480p 32,760, 720p 75,600), and
compares each layer with the reference path.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs a CUDA GPU with FP8 tensor cores", allow_module_level=True)
pytest.importorskip("triton")

from wanquant.formats import MXFP4
from wanquant.numerics.lora import LoraPiece
from wanquant.runtime.linear import W4A4Linear

CUDA = torch.device("cuda")


def _layer(n: int, k: int, seed: int) -> W4A4Linear:
    from benchmarks.common.a14b import random_qparams

    torch.manual_seed(seed)
    layer = W4A4Linear.from_params(random_qparams(n, k, 32, 3, CUDA), MXFP4, MXFP4)
    layer.set_backend("fast")
    return layer


def _lora(n_members: int, rows: int, k: int, rank: int, seed: int) -> tuple[LoraPiece, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(LoraPiece(j * rows, (torch.randn(rank, k, generator=g) / k**0.5).bfloat16(),
                           (torch.randn(rows, rank, generator=g) * 0.02).bfloat16()) for j in range(n_members))


@pytest.mark.parametrize("m", [512, 32760, 75600])
@pytest.mark.parametrize("n,k,members,loras", [(15360, 5120, 3, 1), (15360, 5120, 3, 2), (13824, 5120, 1, 1),
                                               (5120, 13824, 1, 2)])
def test_fast_layer_with_loras_matches_reference(m, n, k, members, loras):
    layer = _layer(n, k, 0)
    x = (torch.randn(m, k, device=CUDA) * 2).to(torch.bfloat16)
    base = layer(x)
    for i in range(loras):
        layer.set_lora(f"l{i}", _lora(members, n // members, k, 64, i), 0.9)
    got = layer(x).float()
    assert layer.backend_reason.startswith("hopper-fp8")
    rows = slice(0, min(m, 2048))  # the fp32 reference on a slice of the tokens
    c, o = layer._clip_host[0]
    want = layer.forward_reference(x[rows], c, o).float()
    rel = float((got[rows] - want).norm() / want.norm())
    assert rel < 5e-3, rel
    delta_want = want - _strip(layer).forward_reference(x[rows], c, o).float()
    delta_got = got[rows] - base[rows].float()
    assert float((delta_got - delta_want).norm() / delta_want.norm()) < 2e-2
    for i in range(loras):
        layer.remove_lora(f"l{i}")
    assert torch.equal(layer(x), base)


def _strip(layer: W4A4Linear) -> W4A4Linear:
    """The same layer without LoRAs (a reference-path copy)."""
    bare = W4A4Linear.from_params(layer.to_params(), layer.wfmt, layer.afmt)
    bare.set_backend("reference")
    return bare
