"""The warp-specialized Gluon attention kernel (wanquant.kernels.attention_ws), on the CPU.

Gluon has no interpreter: here the kernel is compiled for sm_90 with the installed Triton's
ptxas (no GPU needed) and its PTX is checked for what the design relies on, and its
mbarrier protocol is simulated under random interleavings; its numbers are checked on an
H100 by tests/test_attention_gpu.py against the PyTorch reference.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from wanquant.kernels import attention_ws as W

if not W.HAS_GLUON:
    pytest.skip("this Triton has no Gluon Hopper API", allow_module_level=True)

pytest.importorskip("triton.experimental.gluon._runtime", reason="compile_offline's private entry point moved")


def compile_ptx(block_n: int, stages: int, overlap: bool, pingpong: bool = False, consumers: int = 2,
                exp2_fma: int = 0) -> str:
    return W.compile_offline(block_n, stages, overlap, pingpong, consumers=consumers, exp2_fma=exp2_fma)["ptx"]


@pytest.mark.parametrize("block_n,stages,overlap,pingpong,consumers",
                         [(128, 3, True, False, 2), (128, 4, False, False, 2), (64, 2, True, False, 2),
                          (128, 3, True, True, 2), (64, 4, True, False, 3), (64, 6, False, False, 3)])
def test_kernel_compiles_for_sm90_as_designed(block_n, stages, overlap, pingpong, consumers):
    ptx = compile_ptx(block_n, stages, overlap, pingpong, consumers=consumers)
    # each consumer warpgroup gets its share of the registers; the producer gives its surplus back
    grants = re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+)", ptx)
    assert grants.count(str(W.CONSUMER_REGS[consumers])) >= consumers
    assert 128 * (24 + consumers * W.CONSUMER_REGS[consumers]) <= 65536  # the SM's register file
    assert "setmaxnreg.dec" in ptx
    assert "wgmma.mma_async.sync.aligned.m64n%dk32.s32.s8.s8" % block_n in ptx  # INT8 Q.K^T
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in ptx  # FP8 P.V, D = 128
    assert "cp.async.bulk.tensor.2d" in ptx  # TMA copies
    # the P.V is left in flight across the softmax only in the overlapped schedule
    waits = set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))
    assert ("1" in waits) == overlap


@pytest.mark.parametrize("exp2_fma", [2, 4, 8])
def test_exp2_on_the_fma_pipe_replaces_one_mufu_exponential_in_pack(exp2_fma):
    """Per thread and 64 x 128 tile, each specialization of the softmax has 64 exponentials
    of P and 2 of alpha; the unmasked ones give up 64 / pack of P's to the polynomial, the
    masked last tile keeps all of them on MUFU (its -inf must give exactly 0)."""
    ex2 = r"ex2\.approx\.ftz\.f32"
    base = len(re.findall(ex2, compile_ptx(128, 3, 1)))
    ptx = compile_ptx(128, 3, 1, exp2_fma=exp2_fma)
    emulated = len(re.findall(r"shl\.b32\s+%rb, %rb, 23;", ptx))
    assert emulated > 0 and emulated % (64 // exp2_fma) == 0
    assert len(re.findall(ex2, ptx)) == base - emulated
    assert emulated * exp2_fma < base / 2  # the masked specializations kept theirs


def test_deferred_rescale_compiles_to_the_same_products():
    """Overlap 2 moves the accumulator's rescale after the next Q.K^T's issue: the same
    wgmmas and waits as overlap 1; its multiplications once more per consumer in the code
    (the last tile's rescale, after the loop, where overlap 1 does it inside)."""
    ptx1, ptx2 = compile_ptx(128, 3, 1), compile_ptx(128, 3, 2)
    for pattern in (r"wgmma\.mma_async[\w.]+", r"wgmma\.wait_group\.sync\.aligned\s+\d"):
        assert sorted(re.findall(pattern, ptx1)) == sorted(re.findall(pattern, ptx2)), pattern
    muls = [len(re.findall(r"\bmul(?:\.rn)?\.f32", p)) for p in (ptx1, ptx2)]
    assert muls[1] - muls[0] == 2 * 64  # two consumers, a 64 x 128 accumulator: 64 a thread


@pytest.mark.parametrize("config", ["m64-n128-w4-s3-qpre-fold-tma-vperm-gws-ov",
                                    "m64-n128-w4-s3-qpre-fold-tma-vperm-gws-ov-dr-e4",
                                    "m64-n128-w4-s3-qpre-fold-tma-vperm-gws-ov-tm",
                                    "m64-n128-w4-s4-qpre-fold-tma-vperm-ahead-gws-ov",
                                    "m64-n64-w4-s4-qpre-fold-tma-vperm-ahead-gws-ov"])
def test_ptxas_keeps_the_wgmmas_in_flight(config):
    """In the SASS of the key loop, each schedule's products stay asynchronous: ptxas
    serializes wgmmas it cannot prove safe (a wait after every one), which would undo the
    overlap without any error. The overlapped loops wait twice a tile at most."""
    from benchmarks.attention_sass import key_loop, parse_sass, sass_of
    from wanquant.kernels.attention_config import parse_config

    try:
        insns, labels = parse_sass(sass_of(parse_config(config)))
    except FileNotFoundError:
        pytest.skip("this Triton has no bundled nvdisasm")
    first, last = key_loop(insns, labels)
    body = [op for _, op, _ in insns[first:last + 1]]
    products = sum("GMMA" in op for op in body)
    waits = sum(op.startswith("WARPGROUP.DEPBAR") for op in body)
    assert products >= 6 and waits <= 2, f"{waits} waits for {products} wgmmas in the loop"


# ---------------------------------------------------------------------------------
# The mbarrier protocol, simulated (no Triton): the kernel's waits and arrivals transcribed
# one for one, run under random interleavings of the producer and the two consumers.
# A wrong phase parity or stage index shows up as a deadlock or as a consumer reading a
# tile the producer has not written yet, or has already overwritten.
# ---------------------------------------------------------------------------------
class Barrier:
    def __init__(self, count):
        self.count, self.pending, self.completed = count, count, 0

    def arrive(self):
        self.pending -= 1
        assert self.pending >= 0
        if self.pending == 0:
            self.completed, self.pending = self.completed + 1, self.count

    def passes(self, parity):  # mbarrier.try_wait.parity: the phase of this parity has completed
        return self.completed % 2 != parity


def producer(n, stages, buf, ready, empty):
    for j in range(n):
        s = j % stages
        yield empty[s], ((j // stages) & 1) ^ 1
        buf[s] = j  # the TMA copy lands, then completes the expect-tx arrival
        ready[s].arrive()


def consumer(cid, n, stages, buf, ready, empty, turn, overlap, pingpong, log):
    def read(stage, tile):
        assert buf[stage] == tile, f"consumer {cid} wanted tile {tile} in stage {stage}, found {buf[stage]}"
        log.append((cid, tile))

    def still(stage, tile):  # an operand in flight since its wgmma's issue, checked at its wait
        assert buf[stage] == tile, f"consumer {cid}: tile {tile} in stage {stage} overwritten while in flight"

    if overlap == "ahead":  # Q.K^T(j+1) in flight with P.V(j-1) under softmax(j)
        yield ready[0], 0
        read(0, 0)
        if n > 1:
            yield ready[1 % stages], (1 // stages) & 1
            read(1 % stages, 1)
        for j in range(1, n):
            sp = (j - 1) % stages
            read(sp, j - 1)  # P.V(j-1) issued
            still(j % stages, j)  # Q.K^T(j) waited
            if j + 1 < n:
                yield ready[(j + 1) % stages], ((j + 1) // stages) & 1
                read((j + 1) % stages, j + 1)
            still(sp, j - 1)  # P.V(j-1) waited
            empty[sp].arrive()
        read((n - 1) % stages, n - 1)
        empty[(n - 1) % stages].arrive()
    elif overlap:
        yield ready[0], 0
        read(0, 0)
        if pingpong and cid == 1:
            turn[0].arrive()
        for j in range(1, n):
            s, sp = j % stages, (j - 1) % stages
            yield ready[s], (j // stages) & 1
            if pingpong:
                yield turn[cid], (j - 1) & 1
            read(s, j)  # Q.K^T of tile j
            read(sp, j - 1)  # P.V of tile j-1, in flight until the arrival below
            if pingpong:
                turn[1 - cid].arrive()
            still(s, j)  # Q.K^T(j) waited
            still(sp, j - 1)  # P.V(j-1) waited
            empty[sp].arrive()
        read((n - 1) % stages, n - 1)
        empty[(n - 1) % stages].arrive()
    else:
        for j in range(n):
            s = j % stages
            yield ready[s], (j // stages) & 1
            read(s, j)
            empty[s].arrive()


def simulate(n, stages, schedule, consumers, seed):
    """One random interleaving; returns the log of (consumer, tile) reads, or raises
    AssertionError on a deadlock or on a tile read from the wrong stage."""
    import random

    rng = random.Random(seed)
    buf = [None] * stages
    ready = [Barrier(1) for _ in range(stages)]
    empty = [Barrier(consumers) for _ in range(stages)]
    turn = [Barrier(1), Barrier(1)]
    log = []
    overlap = "ahead" if schedule == "ahead" else schedule != "plain"
    threads = [producer(n, stages, buf, ready, empty)] + [
        consumer(c, n, stages, buf, ready, empty, turn, overlap, schedule == "pingpong", log)
        for c in range(consumers)]
    waiting = {i: next(t, None) for i, t in enumerate(threads)}
    while any(w is not None for w in waiting.values()):
        runnable = [i for i, w in waiting.items() if w is not None and w[0].passes(w[1])]
        assert runnable, f"deadlock (n={n}, stages={stages}, {schedule}, seed {seed})"
        i = rng.choice(runnable)
        waiting[i] = next(threads[i], None)
    return log


@pytest.mark.parametrize("n,stages", [(1, 2), (2, 2), (7, 2), (9, 3), (13, 4)])
@pytest.mark.parametrize("schedule,consumers", [("plain", 2), ("overlap", 2), ("pingpong", 2), ("plain", 3),
                                                ("overlap", 3), ("ahead", 2)])
def test_barrier_protocol_has_no_deadlock_or_race(n, stages, schedule, consumers):
    if schedule == "ahead" and stages < 3:
        pytest.skip("the look-ahead schedule needs three stages (test_look_ahead_needs_three_stages)")
    for seed in range(40):
        log = simulate(n, stages, schedule, consumers, seed)
        for c in range(consumers):  # every tile read by each consumer: once (plain) or twice (Q.K^T, then P.V)
            tiles = [t for cc, t in log if cc == c]
            assert sorted(tiles) == sorted(list(range(n)) * (1 if schedule == "plain" else 2))


def test_look_ahead_needs_three_stages():
    """With two stages, Q.K^T(j+1) needs the slot that P.V(j-1) still holds, and the consumer
    waits for its copy before it retires P.V(j-1): a deadlock, which check_config refuses."""
    from wanquant.kernels import attention as K

    with pytest.raises(AssertionError, match="deadlock"):
        simulate(5, 2, "ahead", 2, seed=0)
    cfg = K.AttnConfig(64, 128, 4, 2, q_prepass=True, tma=True, fold=True, v_perm=True, gluon_ws=True,
                       pv_overlap=True, qk_ahead=True)
    with pytest.raises(ValueError, match="three K/V stages"):
        K.check_config(cfg, K.K_BLOCK)
    K.check_config(replace(cfg, num_stages=3), K.K_BLOCK)
