"""2^t on the FMA pipe (FlashAttention-4's exponential emulation), for part of a tile's P.

Why: on sm_90 the 8-bit attention's exponentials (MUFU.EX2, 16 lanes per SM and clock) take
as long per tile as its tensor-core work, and the kernel measures close to the sum of the
two (benchmarks/KERNEL_NOTES.md). Computing one exponential in every ``pack`` on the
FP32 pipe (128 lanes per SM and clock) shortens the MUFU queue of each softmax at the cost
of about eight more issued instructions per such exponential.

How: ``t`` is clamped to ``[FLOOR, inf)``, split as ``t = j + f`` with ``j = round(t)``
(the add/subtract of 1.5 * 2^23, ties to even) and ``f`` in ``[-1/2, 1/2]``; ``2^f`` is the
degree-3 polynomial :data:`COEFFS` (minimax in relative error: 7.5e-5, under the 2^-4 of
the e4m3 rounding that P goes through next); ``2^j`` is added to its exponent field as an
integer. :data:`FLOOR` keeps that field >= 1 (2^f >= 2^-1/2 has field >= 126), so results
below 2^-125 come out as about 2^-125 instead of 0: far under e4m3's smallest step (2^-9)
and under any row sum's last bit.

:func:`exp2_fma_reference` is the arithmetic in PyTorch, operation for operation;
:func:`exp2_mix_ptx` is the kernel's inline PTX for one pack. No Triton here.
"""

from __future__ import annotations

import struct

import torch

# minimax (relative error) of 2^f on [-1/2, 1/2], c0 + c1 f + c2 f^2 + c3 f^3, as fp32
COEFFS = (0.99992807, 0.69326099, 0.24261112, 0.05517167)
MAX_REL_ERR = 7.5e-5  # of the fp32 evaluation, over f in [-1/2, 1/2] (tests/test_exp2_fma.py)
FLOOR = -125.0
PACKS = (2, 4, 8)  # one exponential in every `pack` per thread: 1/2, 1/4, 1/8 of them
_MAGIC = 12582912.0  # 1.5 * 2^23


def _hex(v: float) -> str:
    """PTX's exact spelling of an fp32 constant."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", v))[0]


def _fma32(a: torch.Tensor, b: torch.Tensor | float, c: torch.Tensor | float) -> torch.Tensor:
    """fp32 ``a * b + c`` rounded once: the product is exact in fp64, the sum is rounded to
    fp64 and then to fp32 (a double rounding that differs from one only in ~2^-29 of cases)."""
    b = torch.as_tensor(b, dtype=torch.float32).double()
    c = torch.as_tensor(c, dtype=torch.float32).double()
    return (a.double() * b + c).float()


def exp2_fma_reference(t: torch.Tensor) -> torch.Tensor:
    """2^t (fp32 ``t``) as :func:`exp2_mix_ptx`'s emulated element computes it."""
    c = [torch.tensor(v, dtype=torch.float32) for v in COEFFS]
    tc = torch.clamp_min(t.float(), FLOOR)
    r = tc + _MAGIC  # round(tc) + 1.5 * 2^23, exact in fp32's [2^23, 2^24) binade
    f = tc - (r - _MAGIC)  # exact (Sterbenz)
    q = _fma32(_fma32(_fma32(f, c[3], c[2]), f, c[1]), f, c[0])
    j = r.view(torch.int32) - 0x4B400000
    return (q.view(torch.int32) + (j << 23)).view(torch.float32)


def _emulated(out: str, inp: str) -> str:
    c0, c1, c2, c3 = (_hex(v) for v in COEFFS)
    return ("{ .reg .f32 %tc, %r, %jf, %f, %q; .reg .b32 %rb, %qb;\n"
            f"max.f32 %tc, {inp}, {_hex(FLOOR)};\n"
            f"add.rn.f32 %r, %tc, {_hex(_MAGIC)};\n"
            f"sub.rn.f32 %jf, %r, {_hex(_MAGIC)};\n"
            "sub.rn.f32 %f, %tc, %jf;\n"
            f"fma.rn.f32 %q, %f, {c3}, {c2};\n"
            f"fma.rn.f32 %q, %q, %f, {c1};\n"
            f"fma.rn.f32 %q, %q, %f, {c0};\n"
            "mov.b32 %rb, %r;\nmov.b32 %qb, %q;\n"
            # the magic's own bits vanish in the shift: 0x4B400000 << 23 = 0 mod 2^32
            "shl.b32 %rb, %rb, 23;\nadd.s32 %qb, %qb, %rb;\n"
            f"mov.b32 {out}, %qb;\n}}\n")


def exp2_mix_ptx(pack: int) -> tuple[str, str]:
    """Inline PTX (and its constraints) for ``pack`` fp32 exponentials: the first ``pack - 1``
    on MUFU (``ex2.approx.ftz.f32``, what ``exp2`` compiles to), the last emulated."""
    if pack not in PACKS:
        raise ValueError(f"pack must be one of {PACKS}, got {pack}")
    lines = [f"ex2.approx.ftz.f32 ${i}, ${pack + i};\n" for i in range(pack - 1)]
    lines.append(_emulated(f"${pack - 1}", f"${2 * pack - 1}"))
    return "".join(lines), ",".join(["=f"] * pack + ["f"] * pack)
