"""MXFP4 / INT4 formats against tables and brute force (fresh random inputs each run)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from wanquant.formats import (
    FORMATS, INT4, MXFP4, GroupFormat, INT4Format, MXFP4Format, Quantized, format_from_dict, make_format,
    pack_nibbles, register_format, unpack_nibbles,
)
from wanquant.formats.mxfp4 import E2M1_VALUES, e2m1_decode, e2m1_nearest, e2m1_round, mx_group_exponents


# A fresh torch seed per test, printed for reproduction (conftest.py).
pytestmark = pytest.mark.usefixtures("seed")


# Every E2M1 code: value -> code (bit 3 sign, bits 0-2 magnitude index).
CODE_TABLE = {0.0: 0, 0.5: 1, 1.0: 2, 1.5: 3, 2.0: 4, 3.0: 5, 4.0: 6, 6.0: 7,
              -0.5: 9, -1.0: 10, -1.5: 11, -2.0: 12, -3.0: 13, -4.0: 14, -6.0: 15}
# Midpoints go to the neighbour whose code is even (ties to even); beyond 6 saturates.
TIE_TABLE = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0,
             6.5: 6.0, 7.0: 6.0, 1e30: 6.0, -0.25: 0.0, -0.75: -1.0, -1.25: -1.0, -1.75: -2.0,
             -2.5: -2.0, -3.5: -4.0, -5.0: -4.0, -8.0: -6.0}


def test_every_e2m1_code() -> None:
    vals = torch.tensor(list(CODE_TABLE))
    codes = e2m1_round(vals)
    assert codes.tolist() == list(CODE_TABLE.values())
    assert e2m1_decode(codes).tolist() == list(CODE_TABLE)
    assert e2m1_decode(torch.tensor([8], dtype=torch.uint8)).item() == 0.0  # -0 decodes to 0
    assert e2m1_round(torch.tensor([-0.0, -0.1])).tolist() == [0, 0]  # and is never produced


def test_e2m1_ties_and_neighbours() -> None:
    v = torch.tensor(list(TIE_TABLE))
    assert e2m1_decode(e2m1_round(v)).tolist() == list(TIE_TABLE.values())
    # Just off a midpoint, nearest wins whatever the parity.
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    lo, hi = torch.tensor(E2M1_VALUES[:-1]), torch.tensor(E2M1_VALUES[1:])
    assert torch.equal(e2m1_decode(e2m1_round(torch.nextafter(mids, torch.zeros(7)))), lo)
    assert torch.equal(e2m1_decode(e2m1_round(torch.nextafter(mids, torch.full((7,), 9.0)))), hi)


def _nearest_e2m1(v: torch.Tensor, step: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Brute force: the nearest of all signed E2M1 values times ``step``; an exact midpoint
    goes to the even code (a random float lands on one now and then: -1.25 at step 0.5)."""
    mags = torch.tensor(E2M1_VALUES)
    odd = torch.tensor([i % 2 for i in range(len(E2M1_VALUES))], dtype=torch.bool)
    cand = torch.cat([mags, -mags]) * torch.as_tensor(step)[..., None]
    odd = torch.cat([odd, odd])
    dist = (v[..., None] - cand).abs()
    rank = 2 * (dist > dist.amin(-1, keepdim=True)).int() + odd.int()  # nearest first, then even
    return cand.expand_as(dist).gather(-1, rank.argmin(-1, keepdim=True))[..., 0]


def test_e2m1_random_vs_brute_force() -> None:
    v = torch.randn(20000) * 3
    v[:7] = torch.tensor([0.25, -0.75, 1.25, 1.75, -2.5, 3.5, 5.0])  # exact midpoints: ties to even
    assert torch.equal(e2m1_decode(e2m1_round(v)), _nearest_e2m1(v))


def _brute_exp(a: float, rule: str) -> int:
    es = range(-140, 140)
    if rule == "ocp_floor":  # largest e with 4 * 2^e <= a  (the top binade of E2M1 starts at 4)
        return max(e for e in es if 4 * 2.0**e <= a)
    return min(e for e in es if a <= 6 * 2.0**e)  # smallest e with no saturation


@pytest.mark.parametrize("rule", ["ocp_floor", "safe_ceil"])
def test_e8m0_rules_vs_brute_force(rule: str) -> None:
    k = torch.randint(-60, 60, (40,)).double()
    special = torch.cat([2.0**k, 6 * 2.0**k, 1.5 * 2.0**k, torch.nextafter(6 * 2.0**k, torch.tensor(1e9).double())])
    amax = torch.cat([special, torch.rand(200).double() * 10.0 ** torch.randint(-20, 20, (200,))]).float()
    got = mx_group_exponents(amax, rule)
    want = [max(-127, min(127, _brute_exp(float(a), rule))) for a in amax]
    assert got.tolist() == want
    # clip scales amax before the rule, the offset shifts the result
    c, o = 0.7, -1
    want_co = [max(-127, min(127, _brute_exp(float(torch.tensor(float(a), dtype=torch.float32) * c), rule) + o)) for a in amax]
    assert mx_group_exponents(amax, rule, c, o).tolist() == want_co


@pytest.mark.parametrize("rule", ["ocp_floor", "safe_ceil"])
def test_mx_quantize_vs_brute_force(rule: str) -> None:
    fmt = make_format("mxfp4", scale_rule=rule)
    x = torch.randn(16, 128) * torch.exp(torch.randn(16, 1) * 3)
    q = fmt.quantize(x)
    e = q.scales.to(torch.int32) - 127
    assert e.tolist() == [[_brute_exp(float(a), rule) for a in row] for row in x.reshape(16, 4, 32).abs().amax(-1)]
    best = _nearest_e2m1(x, torch.exp2(e.float()).repeat_interleave(32, 1))
    assert torch.equal(fmt.dequantize(q), best)
    assert torch.equal(fmt.fake_quantize(fmt.fake_quantize(x)), fmt.fake_quantize(x))  # idempotent


@pytest.mark.parametrize("qmax", [7, 8])
def test_int4_vs_brute_force(qmax: int) -> None:
    fmt = INT4Format(64, qmax=qmax)
    x = torch.randn(8, 256) * torch.exp(torch.randn(8, 1))
    for clip in (1.0, 0.6):
        q = fmt.quantize(x, clip_ratio=clip)
        amax = x.reshape(8, 4, 64).abs().amax(-1)
        step = (amax * clip / qmax).to(torch.bfloat16).float()
        assert torch.equal(q.scales.float(), step)
        # all 16 nibbles, keeping the format's range, nearest value wins
        ints = torch.tensor([i for i in range(-8, 8) if -qmax <= i <= 7]).float()
        cand = ints * step.repeat_interleave(64, 1)[..., None]
        best = cand.gather(-1, (x[..., None] - cand).abs().argmin(-1, keepdim=True))[..., 0]
        assert torch.equal(fmt.dequantize(q), best)


def test_int4_zero_group() -> None:
    q = INT4.quantize(torch.zeros(2, 64))
    assert q.codes.eq(0).all() and q.scales.float().eq(0).all()


def test_pack_roundtrip() -> None:
    codes = torch.randint(0, 16, (5, 3, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 3, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), codes)
    assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) | (int(codes[0, 0, 1]) << 4)  # element 2i low nibble
    with pytest.raises(TypeError):
        pack_nibbles(codes.to(torch.int32))
    with pytest.raises(ValueError):
        pack_nibbles(codes[..., :3])
    with pytest.raises(ValueError):
        pack_nibbles(codes | 16)


@pytest.mark.parametrize("name", ["mxfp4", "int4"])
def test_errors(name: str) -> None:
    fmt = make_format(name)
    x = torch.randn(4, 128)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 7] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            fmt.quantize(y)
    with pytest.raises(ValueError, match="divisible"):
        fmt.quantize(torch.randn(4, 2 * fmt.group_size + fmt.group_size // 2))
    with pytest.raises(TypeError):
        fmt.quantize(torch.ones(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError):
        fmt.quantize(x, clip_ratio=1.5)
    if name == "int4":
        with pytest.raises(ValueError, match="exp_offset"):
            fmt.quantize(x, exp_offset=1)


def test_bf16_input_and_shapes() -> None:
    fmt = make_format("mxfp4")
    x = torch.randn(3, 5, 64).bfloat16()
    q = fmt.quantize(x)
    assert q.codes.shape == (3, 5, 64) and q.scales.shape == (3, 5, 2) and q.scales.dtype == torch.uint8
    assert fmt.fake_quantize(x).dtype == torch.bfloat16
    assert fmt.bits_per_element == 4.25 and math.isclose(make_format("int4").bits_per_element, 4.25)
    # codes and scales describe the values exactly
    assert torch.equal(fmt.dequantize(Quantized(q.codes, q.scales)), fmt.fake_quantize(x.float()))


def test_e2m1_nearest_matches_codes() -> None:
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 100.0]
    v = torch.cat([torch.randn(50000) * 3, torch.tensor(mids), -torch.tensor(mids), torch.zeros(1)])
    assert torch.equal(e2m1_nearest(v), e2m1_decode(e2m1_round(v)))


@pytest.mark.parametrize("fmt", [MXFP4, MXFP4Format(64, "safe_ceil"), INT4, INT4Format(32, qmax=8)],
                         ids=lambda f: f.describe())
def test_static_scale_methods_agree_with_quantize(fmt: GroupFormat) -> None:
    """GPTQ's view of a format (group_scale, round_to_step, codes_at_step) is quantize at clip 1."""
    x = torch.randn(6, 4 * fmt.group_size) * torch.exp(torch.randn(6, 1) * 2)
    x[0, : fmt.group_size] = 0.0  # an all-zero group
    q = fmt.quantize(x)
    stored, step = fmt.group_scale(fmt.grouped(x).abs().amax(-1))
    assert stored.dtype == fmt.scale_dtype and torch.equal(stored, q.scales)
    steps = step.repeat_interleave(fmt.group_size, dim=-1)
    values = fmt.round_to_step(x, steps)
    assert torch.equal(values, fmt.dequantize(q))
    assert torch.equal(fmt.codes_at_step(values, steps), q.codes)


def test_registry_round_trip() -> None:
    assert {"mxfp4", "int4"} <= set(FORMATS)
    assert make_format("mxfp4") == MXFP4 and MXFP4.group_size == 32
    assert make_format("int4") == INT4 and INT4.group_size == 64
    for fmt in (MXFP4, INT4, MXFP4Format(16, "safe_ceil"), INT4Format(128, qmax=8), make_format("int4", 32)):
        d = json.loads(json.dumps(fmt.to_dict()))
        assert d["name"] == fmt.name and format_from_dict(d) == fmt
    assert MXFP4.to_dict() == {"name": "mxfp4", "group_size": 32, "scale_rule": "ocp_floor"}
    assert MXFP4Format(32, "safe_ceil") != MXFP4 and MXFP4Format(64) != INT4Format(64)
    assert make_format("mxfp4", scale_rule="safe_ceil").describe() == "mxfp4 g32 scale_rule=safe_ceil"
    with pytest.raises(ValueError, match="unknown format 'nvfp4'.*int4.*mxfp4"):
        make_format("nvfp4")
    with pytest.raises(ValueError, match="scale_rule"):
        MXFP4Format(32, "round_up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group_size"):
        make_format("int4", 7)
    with pytest.raises(ValueError, match="qmax"):
        INT4Format(qmax=6)
    register_format(MXFP4Format)  # idempotent

    class Impostor(INT4Format):
        name = "mxfp4"

    with pytest.raises(ValueError, match="already registered"):
        register_format(Impostor)
    assert FORMATS["mxfp4"] is MXFP4Format
