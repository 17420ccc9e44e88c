"""The FMA-pipe exponential (wanquant.kernels.exp2_fma) against fp64, and its PTX's shape.

The kernel's PTX cannot run here; the GPU test (tests/test_attention_gpu.py -k exp2) checks
it bit for bit against :func:`exp2_fma_reference`, which these tests hold to fp64.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from wanquant.kernels import exp2_fma as E


def test_coefficients_are_the_minimax_error_they_claim():
    """Brute force over f in [-1/2, 1/2] in fp64: the polynomial's relative error stays under
    MAX_REL_ERR and equioscillates (a minimax polynomial of degree 3 touches it 5 times)."""
    f = np.linspace(-0.5, 0.5, 400_001)
    err = np.polyval(np.array(E.COEFFS[::-1], dtype=np.float32).astype(np.float64), f) / np.exp2(f) - 1
    assert np.abs(err).max() < E.MAX_REL_ERR
    peaks = [i for i in range(1, len(f) - 1) if abs(err[i]) >= max(abs(err[i - 1]), abs(err[i + 1]))]
    big = [i for i in [0, *peaks, len(f) - 1] if abs(err[i]) > 0.95 * np.abs(err).max()]
    assert len(big) >= 5
    assert len({np.sign(err[i]) for i in big}) == 2


def test_reference_is_within_its_bound_of_fp64_on_random_inputs():
    seed = int(torch.randint(0, 2**31, ()).item())
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(200_000, generator=g) * (9.0 - E.FLOOR) + E.FLOOR  # P's range: 448 * 2^(s - m) <= 2^8.81
    t = torch.cat([t, torch.arange(-125, 10).float(), torch.arange(-125, 9).float() + 0.5,  # ties go to even
                   torch.tensor([math.log2(448.0), 0.0, -0.0])])
    got = E.exp2_fma_reference(t).double()
    want = torch.exp2(t.double())
    rel = (got / want - 1).abs()
    assert rel.max() < E.MAX_REL_ERR, f"seed {seed}: worst at t = {t[rel.argmax()].item()}"
    assert torch.isfinite(got).all() and (got > 0).all()


def test_below_the_floor_is_tiny_and_positive():
    """The exponent field stays normal: anything under 2^-125 comes out at ~2^-125 (e4m3 rounds
    it to 0), never as a wrapped-around exponent (a huge or negative number)."""
    t = torch.tensor([-125.0, -125.5, -126.0, -200.0, -1e30, -float("inf")])
    got = E.exp2_fma_reference(t).double()
    assert torch.allclose(got, torch.full_like(got, 2.0 ** -125), rtol=E.MAX_REL_ERR)
    assert torch.tensor(2.0 ** -125).to(torch.float8_e4m3fn).float() == 0


@pytest.mark.parametrize("pack", E.PACKS)
def test_ptx_emulates_one_in_pack(pack):
    asm, constraints = E.exp2_mix_ptx(pack)
    assert constraints.split(",") == ["=f"] * pack + ["f"] * pack
    assert len(re.findall(r"ex2\.approx\.ftz\.f32 \$(\d+), \$(\d+);", asm)) == pack - 1
    for out, inp in re.findall(r"ex2\.approx\.ftz\.f32 \$(\d+), \$(\d+);", asm):
        assert int(inp) == int(out) + pack  # each output from its own input
    assert asm.count("fma.rn.f32") == 3 and asm.count("shl.b32") == 1
    assert f"mov.b32 ${pack - 1}," in asm and f"${2 * pack - 1}," in asm
    # the constants are the fp32 bits of the Python values
    hexes = re.findall(r"0f([0-9A-F]{8})", asm)
    floats = {np.frombuffer(bytes.fromhex(h)[::-1], dtype=np.float32)[0] for h in hexes}
    assert {np.float32(c) for c in E.COEFFS} <= floats and np.float32(E.FLOOR) in floats
    with pytest.raises(ValueError, match="pack must be one of"):
        E.exp2_mix_ptx(3)
