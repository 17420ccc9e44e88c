"""The 8-bit attention's main loop as a warp-specialized Gluon kernel (FlashAttention-3's layout).

Same numbers as :func:`wanquant.kernels.attention.attention_prepared` with a ``fold``,
``tma``, ``v_perm``, ``q_prepass`` config (INT8 Q.K^T, the magic-number int32 -> fp32 with the
scale folded into one FMA, P = 448 * 2^(s - m) in e4m3, FP8 P.V, fp32 row sums); only the
schedule differs. Why: with 8-bit operands the tensor cores need as long for a 64 x 128
tile as the special-function units need for its 8,192 exponentials, so the time is the sum
of the two unless the softmax of one tile runs while the tensor cores work on another. The
plain Triton kernel (one warpgroup per program, two programs per SM) leaves that overlap to
chance; Triton 3.6 will not keep a wgmma in flight across the softmax either.

Here one program owns ``CONSUMERS x 64`` queries of one head (2, or 3 for 64-key tiles) and
splits its warps (``gl.warp_specialize``):

* a *producer* (the default partition, 4 warps, few registers) issues every TMA copy: Q
  once (one 128-row box; three consumers: one 64-row box each), then K and V tiles into a
  ring of ``STAGES`` shared-memory slots, each guarded by a ``ready`` and an ``empty``
  mbarrier;
* two *consumer* warpgroups (240 registers each; three at 160) run the online softmax for
  64 queries each. A third consumer gives each SM sub-partition a third warp to issue while
  the others wait on their wgmmas or their exponentials; 160 registers hold 64-key tiles
  with the overlap (scores, P and the accumulator), not 128-key ones.
  The schedule, ``OVERLAP``: 0 tile by tile, as the Triton kernel does; 1 tile j's Q.K^T
  and tile j-1's P.V issued back to back, tile j's softmax while the P.V runs, the
  accumulator rescaled after it retires; 2 the same with that rescale issued after the next
  Q.K^T; 3 (:func:`_key_loop_ahead`) tile j+1's Q.K^T and tile j-1's P.V both under tile
  j's softmax. With ``PINGPONG`` (1 only) the two consumers take turns issuing their
  wgmmas (two mbarriers), so that one's softmax tends to run while the other's products
  do. ``EXP2_FMA`` computes one exponential in that many on the FMA pipe (exp2_fma.py);
  ``TREE_MAX`` takes each row's maximum as a tree (:func:`_row_max_tree`, the default).

Gluon is Triton's lower-level dialect (explicit layouts, async wgmma, mbarriers); it has no
interpreter, so this kernel runs on sm_90 GPUs only and is checked there against the same
PyTorch reference as the Triton kernel (tests/test_attention_gpu.py).
"""

from __future__ import annotations

from wanquant.kernels.act_quant import HAS_TRITON
from wanquant.kernels.exp2_fma import exp2_mix_ptx

HAS_GLUON = False
if HAS_TRITON:
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                                      warpgroup_mma_wait)
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
        # Triton 3.6's name of the TMA load; later Gluon calls it async_load (same arguments)
        _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
        HAS_GLUON = True
    except (ImportError, AttributeError):  # an older Triton without Gluon's Hopper API
        HAS_GLUON = False

BLOCK_M = 64  # queries per consumer warpgroup (one wgmma M)
CONSUMERS = 2  # the default; CONSUMER_REGS lists what else the kernel implements
HEAD_DIM = 128  # the head dim its GPU tests cover (Wan's); attention.py runs others on the Triton kernel
# setmaxnreg for each consumer, by consumer count; the producer keeps what is left of the
# SM's 64 K registers (4 warps at 24: 128 x (24 + 2 x 240) and 128 x (24 + 3 x 160) both fit)
CONSUMER_REGS = {2: 240, 3: 160}
MAX_BLOCK_N = {2: 128, 3: 64}  # key tile that fits each consumer count's registers (with the overlap)


if HAS_GLUON:
    _BM = gl.constexpr(BLOCK_M)
    _REGS2 = gl.constexpr(CONSUMER_REGS[2])
    _REGS3 = gl.constexpr(CONSUMER_REGS[3])
    # inline PTX for exp2 with one element in every 2, 4 or 8 on the FMA pipe (exp2_fma.py)
    _MIX2, _MIX4, _MIX8 = (gl.constexpr(exp2_mix_ptx(n)[0]) for n in (2, 4, 8))
    _CONS2, _CONS4, _CONS8 = (gl.constexpr(exp2_mix_ptx(n)[1]) for n in (2, 4, 8))

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
                  q_row, k_row, v_row, n_tiles, BN: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        if CONSUMERS == 2:  # one [128, D] box
            mbarrier.expect(q_ready, q_desc.block_type.nbytes)
            _tma_load(q_desc, [q_row, 0], q_ready, q_smem)
        else:  # one [64, D] box per consumer: TMA boxes are powers of two, 192 rows are not
            mbarrier.expect(q_ready, CONSUMERS * q_desc.block_type.nbytes)
            for c in gl.static_range(CONSUMERS):
                _tma_load(q_desc, [q_row + c * _BM, 0], q_ready, q_smem.index(c))
        for j in range(n_tiles):
            s = j % STAGES
            # a fresh barrier counts as having completed the phase before its first: parity 1 passes
            mbarrier.wait(kv_empty.index(s), ((j // STAGES) & 1) ^ 1)
            bar = kv_ready.index(s)
            mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            _tma_load(k_desc, [k_row + j * BN, 0], bar, k_smem.index(s))
            _tma_load(v_desc, [v_row, j * BN], bar, v_smem.index(s))

    @gluon.jit
    def _wgmma_order(p8, BM: gl.constexpr, BN: gl.constexpr):
        """P's columns in ``v_token_order`` (see attention_config.py): a move-free register relabelling."""
        p8 = gl.reshape(p8, (BM, BN // 32, 2, 2, 2, 2, 2))
        p8 = gl.permute(p8, (0, 1, 2, 4, 5, 3, 6))
        return gl.reshape(p8, (BM, BN))

    @gluon.jit
    def _p_operand(p, p_layout: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
        """P (fp32, accumulator layout) as the e4m3 register operand of the P.V wgmma. The
        column order is relabelled first, in fp32, so that the conversion packs each register's
        four e4m3 values directly (F2FP pairs merged in place, no byte moves)."""
        return gl.convert_layout(_wgmma_order(p, BM, BN), p_layout, assert_trivial=True).to(gl.float8e4nv)

    @gluon.jit
    def _exp2(t, FMA_EVERY: gl.constexpr):
        """2^t; with ``FMA_EVERY`` (2, 4 or 8) one element in that many per thread is computed
        on the FMA pipe instead of MUFU (FlashAttention-4's emulation, kernels/exp2_fma.py)."""
        if FMA_EVERY == 2:
            p = gl.inline_asm_elementwise(_MIX2, _CONS2, [t], gl.float32, True, 2)
        elif FMA_EVERY == 4:
            p = gl.inline_asm_elementwise(_MIX4, _CONS4, [t], gl.float32, True, 4)
        elif FMA_EVERY == 8:
            p = gl.inline_asm_elementwise(_MIX8, _CONS8, [t], gl.float32, True, 8)
        else:
            p = gl.exp2(t)
        return p

    @gluon.jit
    def _row_max_tree(qk):
        """Row maxima as a tree: a thread's 32 scores per row are reduced over the register
        bits of their column (bit 0, bits 3-4, then bits 5+) before the lane bits (1-2, by
        shuffles), so the chain is a few deep instead of one max after another."""
        BM: gl.constexpr = qk.shape[0]
        BN: gl.constexpr = qk.shape[1]
        rows: gl.constexpr = gl.SliceLayout(1, qk.type.layout)
        x = gl.reshape(qk, (BM, BN // 32, 4, 4, 2))  # column = 32 a + 8 b + 2 c + e (c: lane % 4)
        x = gl.max(gl.max(x, axis=4), axis=2)  # [BM, a, c]
        x = gl.max(x, axis=1)  # [BM, c]
        return gl.convert_layout(gl.max(x, axis=1), rows, assert_trivial=True)

    @gluon.jit
    def _softmax(qk, m_i, l_i, sc, n_valid, TOP: gl.constexpr, MASK: gl.constexpr, EXP2_FMA: gl.constexpr,
                 TREE_MAX: gl.constexpr):
        """One tile's online-softmax step on integer scores: (p fp32, alpha, m_new, l_new)."""
        if MASK:  # the column indices made here, not kept live across the key loop (32 registers)
            col = gl.arange(0, qk.shape[1], layout=gl.SliceLayout(0, qk.type.layout))
            qk = gl.where(col[None, :] < n_valid, qk, -4194303)  # below any real score, in the 2^22 range
        if TREE_MAX:
            m_tile = _row_max_tree(qk).to(gl.float32) * sc
        else:
            m_tile = gl.max(qk, axis=1).to(gl.float32) * sc
        m_new = gl.maximum(m_i, m_tile)
        alpha = gl.exp2(m_i - m_new)
        bias = gl.fma(sc, 12582912.0, m_new - TOP)
        qkb = (qk + 0x4B400000).to(gl.float32, bitcast=True)  # 1.5 * 2^23 + qk, exact
        t = gl.fma(qkb, sc[:, None], -bias[:, None])
        if MASK:  # exactly 0 where masked: all on MUFU (the emulation floors at 2^-125)
            p = gl.exp2(gl.where(col[None, :] < n_valid, t, float("-inf")))
        else:
            p = _exp2(t, EXP2_FMA)  # 448 * 2^(s - m)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)

    @gluon.jit
    def _tile_softmax(qk, m_i, l_i, qsc, ks_base, j, n_tiles, n_last,
                      BN: gl.constexpr, KB: gl.constexpr, TOP: gl.constexpr, EXP2_FMA: gl.constexpr,
                      TREE_MAX: gl.constexpr):
        """:func:`_softmax` of key tile ``j`` at its K scale; only the last tile is masked."""
        sc = qsc * gl.load(ks_base + (j * BN) // KB)
        if j == n_tiles - 1:
            p, alpha, m_new, l_new = _softmax(qk, m_i, l_i, sc, n_last, TOP, True, EXP2_FMA, TREE_MAX)
        else:
            p, alpha, m_new, l_new = _softmax(qk, m_i, l_i, sc, n_last, TOP, False, EXP2_FMA, TREE_MAX)
        return p, alpha, m_new, l_new

    @gluon.jit
    def _key_loop_ahead(q_mine, k_smem, v_smem, kv_ready, kv_empty, acc, m_i, l_i, qsc, ks_base, zero_s,
                        n_tiles, n_last, p_layout: gl.constexpr, rows_o: gl.constexpr, BN: gl.constexpr,
                        KB: gl.constexpr, STAGES: gl.constexpr, TOP: gl.constexpr, EXP2_FMA: gl.constexpr,
                        TREE_MAX: gl.constexpr):
        """The key loop with Q.K^T(j+1) issued, beside P.V(j-1), before tile j's softmax and
        waited after it: the softmax runs under both products, so no Q.K^T latency sits
        between two softmaxes. Costs a second score tile in registers (64 a thread). Every
        wgmma is issued and waited in the same block (ptxas serializes wgmmas left in flight
        across a branch), hence the first and last tiles peeled off. Returns (acc, l)."""
        BM: gl.constexpr = _BM
        mbarrier.wait(kv_ready.index(0), 0)
        tok = warpgroup_mma(q_mine, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
        sc = qsc * gl.load(ks_base)
        if n_tiles > 1:
            mbarrier.wait(kv_ready.index(1 % STAGES), (1 // STAGES) & 1)
            tok = warpgroup_mma(q_mine, k_smem.index(1 % STAGES).permute((1, 0)), zero_s, use_acc=False,
                                is_async=True)
            p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, sc, n_last, TOP, False, EXP2_FMA, TREE_MAX)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
        else:
            p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, sc, n_last, TOP, True, EXP2_FMA, TREE_MAX)
        for j in range(1, n_tiles - 1):  # on entry: the scores of tile j, P of tile j-1
            sp = (j - 1) % STAGES
            sn = (j + 1) % STAGES
            acc_tok = warpgroup_mma(_p_operand(p, p_layout, BM, BN), v_smem.index(sp).permute((1, 0)), acc,
                                    is_async=True)
            mbarrier.wait(kv_ready.index(sn), ((j + 1) // STAGES) & 1)
            tok = warpgroup_mma(q_mine, k_smem.index(sn).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            sc = qsc * gl.load(ks_base + (j * BN) // KB)
            p, alpha, m_new, l_i = _softmax(qk, m_i, l_i, sc, n_last, TOP, False, EXP2_FMA, TREE_MAX)
            acc, qk = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, tok))
            mbarrier.arrive(kv_empty.index(sp), count=1)
            acc = acc * gl.convert_layout(alpha, rows_o, assert_trivial=True)[:, None]
            m_i = m_new
        if n_tiles > 1:  # the last tile: masked, nothing to issue ahead
            sp = (n_tiles - 2) % STAGES
            acc_tok = warpgroup_mma(_p_operand(p, p_layout, BM, BN), v_smem.index(sp).permute((1, 0)), acc,
                                    is_async=True)
            sc = qsc * gl.load(ks_base + ((n_tiles - 1) * BN) // KB)
            p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, sc, n_last, TOP, True, EXP2_FMA, TREE_MAX)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
            mbarrier.arrive(kv_empty.index(sp), count=1)
            acc = acc * gl.convert_layout(alpha, rows_o, assert_trivial=True)[:, None]
        sl = (n_tiles - 1) % STAGES
        acc_tok = warpgroup_mma(_p_operand(p, p_layout, BM, BN), v_smem.index(sl).permute((1, 0)), acc,
                                is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
        mbarrier.arrive(kv_empty.index(sl), count=1)
        return acc, l_i

    @gluon.jit
    def _consumer(q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty, turn, qs_ptr, ks_ptr, vs_ptr, vm_ptr, o_ptr,
                  q_srow, bh, b, h, s0, S_q, S_k, S_kpad, n_tiles, sob, sos, soh,
                  D: gl.constexpr, BN: gl.constexpr, KB: gl.constexpr, STAGES: gl.constexpr, TOP: gl.constexpr,
                  OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, CONSUMERS: gl.constexpr, EXP2_FMA: gl.constexpr,
                  TREE_MAX: gl.constexpr, CID: gl.constexpr):
        BM: gl.constexpr = _BM
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        if CONSUMERS == 2:
            q_mine = q_smem.slice(CID * BM, BM, dim=0)
        else:
            q_mine = q_smem.index(CID)
        r = gl.arange(0, BM, layout=rows_s)
        qsc = gl.load(qs_ptr + q_srow + CID * BM + r)  # per-row scale (softmax scale, log2 e folded in)
        ks_base = ks_ptr + bh * (S_kpad // KB)
        m_i = gl.full([BM], float("-inf"), gl.float32, layout=rows_s)
        l_i = gl.zeros([BM], gl.float32, layout=rows_s)
        acc = gl.zeros([BM, D], gl.float32, layout=o_layout)
        zero_s = gl.zeros([BM, BN], gl.int32, layout=s_layout)
        mbarrier.wait(q_ready, 0)
        n_last = S_k - (n_tiles - 1) * BN  # valid keys of the last tile

        # OVERLAP 1: tile 0 alone, then QK(j) and PV(j-1) in flight together, softmax(j) under
        # PV(j-1), the accumulator rescaled by tile j's alpha once PV(j-1) retires. 2: the same,
        # but that rescale waits until QK(j+1) is issued: it leaves the chain from one Q.K^T's
        # wait to the next one's issue (same operations on the same values, same bits).
        # 3: QK(j+1) issued before softmax(j) as well (_key_loop_ahead).
        if OVERLAP == 3:
            acc, l_i = _key_loop_ahead(q_mine, k_smem, v_smem, kv_ready, kv_empty, acc, m_i, l_i, qsc, ks_base,
                                       zero_s, n_tiles, n_last, p_layout, rows_o, BN, KB, STAGES, TOP, EXP2_FMA,
                                       TREE_MAX)
        elif OVERLAP:
            mbarrier.wait(kv_ready.index(0), 0)
            tok = warpgroup_mma(q_mine, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
            # P crosses the loop in fp32: an e4m3 tensor would cross it one byte per register
            # and be re-packed with ~100 byte moves per tile
            p, alpha, m_i, l_i = _tile_softmax(qk, m_i, l_i, qsc, ks_base, 0, n_tiles, n_last, BN, KB, TOP,
                                              EXP2_FMA, TREE_MAX)
            if PINGPONG and CID == 1:  # consumer 0 issues first
                mbarrier.arrive(turn.index(0), count=1)
            for j in range(1, n_tiles):
                s = j % STAGES
                sp = (j - 1) % STAGES
                mbarrier.wait(kv_ready.index(s), (j // STAGES) & 1)
                if PINGPONG:  # FlashAttention-3's ping-pong: the consumers take turns at the tensor cores
                    mbarrier.wait(turn.index(CID), (j - 1) & 1)
                tok = warpgroup_mma(q_mine, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                if OVERLAP == 2:  # tile j-1's rescale, while Q.K^T(j) runs
                    acc = acc * gl.convert_layout(alpha, rows_o, assert_trivial=True)[:, None]
                p8 = _p_operand(p, p_layout, BM, BN)
                acc_tok = warpgroup_mma(p8, v_smem.index(sp).permute((1, 0)), acc, is_async=True)
                if PINGPONG:
                    mbarrier.arrive(turn.index(1 - CID), count=1)
                qk = warpgroup_mma_wait(num_outstanding=1, deps=(tok,))
                p, alpha, m_new, l_i = _tile_softmax(qk, m_i, l_i, qsc, ks_base, j, n_tiles, n_last, BN, KB, TOP,
                                                     EXP2_FMA, TREE_MAX)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
                mbarrier.arrive(kv_empty.index(sp), count=1)
                if OVERLAP == 1:
                    acc = acc * gl.convert_layout(alpha, rows_o, assert_trivial=True)[:, None]
                m_i = m_new
            sl = (n_tiles - 1) % STAGES
            if OVERLAP == 2:
                acc = acc * gl.convert_layout(alpha, rows_o, assert_trivial=True)[:, None]
            p8 = _p_operand(p, p_layout, BM, BN)
            acc_tok = warpgroup_mma(p8, v_smem.index(sl).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
            mbarrier.arrive(kv_empty.index(sl), count=1)
        else:
            for j in range(n_tiles):
                s = j % STAGES
                mbarrier.wait(kv_ready.index(s), (j // STAGES) & 1)
                tok = warpgroup_mma(q_mine, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                qk = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
                p, alpha, m_i, l_i = _tile_softmax(qk, m_i, l_i, qsc, ks_base, j, n_tiles, n_last, BN, KB, TOP,
                                                   EXP2_FMA, TREE_MAX)
                acc = acc * gl.convert_layout(alpha, rows_o, assert_trivial=True)[:, None]
                p8 = _p_operand(p, p_layout, BM, BN)
                acc_tok = warpgroup_mma(p8, v_smem.index(s).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
                mbarrier.arrive(kv_empty.index(s), count=1)

        d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        vs = gl.load(vs_ptr + bh * D + d)
        vm = gl.load(vm_ptr + bh * D + d)
        inv_l = gl.convert_layout(1.0 / l_i, rows_o, assert_trivial=True)
        o = acc * inv_l[:, None] * vs[None, :] + vm[None, :]
        m = s0 + CID * BM + gl.arange(0, BM, layout=rows_o)
        ptr = o_ptr + b * sob + m.to(gl.int64)[:, None] * sos + h * soh + d[None, :]
        gl.store(ptr, o.to(o_ptr.dtype.element_ty), mask=(m < S_q)[:, None])

    @gluon.jit(do_not_specialize=["S_q", "S_k"])
    def _attn_ws_kernel(q_desc, k_desc, v_desc, qs_ptr, ks_ptr, vs_ptr, vm_ptr, o_ptr,
                        S_q, S_qpad, S_k, S_kpad, H, sob, sos, soh,
                        D: gl.constexpr, BN: gl.constexpr, KB: gl.constexpr, STAGES: gl.constexpr,
                        TOP: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr,
                        CONSUMERS: gl.constexpr = 2, EXP2_FMA: gl.constexpr = 0,
                        TREE_MAX: gl.constexpr = False):
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = (bh // H).to(gl.int64)
        h = (bh % H).to(gl.int64)
        s0 = pid_m * (CONSUMERS * _BM)
        q_row = bh * S_qpad + s0
        n_tiles = gl.cdiv(S_k, BN)

        # shared-memory shapes are powers of two too: three consumers' Q is [3, 64, D]
        if CONSUMERS == 2:
            q_smem = gl.allocate_shared_memory(gl.int8, [2 * _BM, D], q_desc.layout)
        else:
            q_smem = gl.allocate_shared_memory(gl.int8, [CONSUMERS, _BM, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, D, BN], v_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(kv_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=CONSUMERS)

        # (Gluon takes the partitions as literal (function, arguments) pairs: one call per count)
        if CONSUMERS == 3:
            gl.warp_specialize(
                [(_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
                              q_row, bh * S_kpad, bh * D, n_tiles, BN, STAGES, CONSUMERS)),
                 (_consumer, (q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty, turn, qs_ptr, ks_ptr, vs_ptr,
                              vm_ptr, o_ptr, q_row, bh, b, h, s0, S_q, S_k, S_kpad, n_tiles, sob, sos, soh,
                              D, BN, KB, STAGES, TOP, OVERLAP, PINGPONG, CONSUMERS, EXP2_FMA, TREE_MAX, 0)),
                 (_consumer, (q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty, turn, qs_ptr, ks_ptr, vs_ptr,
                              vm_ptr, o_ptr, q_row, bh, b, h, s0, S_q, S_k, S_kpad, n_tiles, sob, sos, soh,
                              D, BN, KB, STAGES, TOP, OVERLAP, PINGPONG, CONSUMERS, EXP2_FMA, TREE_MAX, 1)),
                 (_consumer, (q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty, turn, qs_ptr, ks_ptr, vs_ptr,
                              vm_ptr, o_ptr, q_row, bh, b, h, s0, S_q, S_k, S_kpad, n_tiles, sob, sos, soh,
                              D, BN, KB, STAGES, TOP, OVERLAP, PINGPONG, CONSUMERS, EXP2_FMA, TREE_MAX, 2))],
                [4, 4, 4], [_REGS3, _REGS3, _REGS3])
        else:
            gl.warp_specialize(
                [(_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
                              q_row, bh * S_kpad, bh * D, n_tiles, BN, STAGES, CONSUMERS)),
                 (_consumer, (q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty, turn, qs_ptr, ks_ptr, vs_ptr,
                              vm_ptr, o_ptr, q_row, bh, b, h, s0, S_q, S_k, S_kpad, n_tiles, sob, sos, soh,
                              D, BN, KB, STAGES, TOP, OVERLAP, PINGPONG, CONSUMERS, EXP2_FMA, TREE_MAX, 0)),
                 (_consumer, (q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty, turn, qs_ptr, ks_ptr, vs_ptr,
                              vm_ptr, o_ptr, q_row, bh, b, h, s0, S_q, S_k, S_kpad, n_tiles, sob, sos, soh,
                              D, BN, KB, STAGES, TOP, OVERLAP, PINGPONG, CONSUMERS, EXP2_FMA, TREE_MAX, 1))],
                [4, 4], [_REGS2, _REGS2])


def attention_ws_launch(q8, qs, kv, ov, s_q: int, s_qpad: int, block_n: int, stages: int, overlap: int,
                        pingpong: bool, top: float, consumers: int = CONSUMERS, exp2_fma: int = 0,
                        tree_max: bool = False) -> None:
    """Run :func:`_attn_ws_kernel` on a prepared problem (``q8 [B*H, S_qpad, D]`` INT8 from the Q
    pre-pass with ``S_qpad`` a multiple of ``consumers x 64``, ``kv`` a ``QuantKV`` with ``v_perm``,
    ``ov`` the ``[B, S, H, D]`` output view; ``overlap`` the schedule, 0 to 3 (see
    ``_consumer``); ``exp2_fma``: one exponential in that many on the FMA pipe, 0 for none;
    ``tree_max``: the row maxima as a tree, :func:`_row_max_tree`)."""
    if not HAS_GLUON:
        raise RuntimeError("the warp-specialized attention needs Triton >= 3.6 with Gluon (triton.experimental.gluon)")
    import triton
    d = kv.head_dim
    rows = consumers * BLOCK_M
    box = rows if consumers == 2 else BLOCK_M  # the producer's Q copies (see _producer)
    q_layout = gl.NVMMASharedLayout.get_default_for([box, d], gl.int8)
    k_layout = gl.NVMMASharedLayout.get_default_for([block_n, d], gl.int8)
    v_layout = gl.NVMMASharedLayout.get_default_for([d, block_n], gl.float8e4nv)
    q_desc = GluonDescriptor.from_tensor(q8.view(-1, d), [box, d], q_layout)
    k_desc = GluonDescriptor.from_tensor(kv.k8.view(-1, d), [block_n, d], k_layout)
    v_desc = GluonDescriptor.from_tensor(kv.v8t.view(-1, kv.seq_pad), [d, block_n], v_layout)
    grid = (triton.cdiv(s_q, rows), kv.batch * kv.heads)
    _attn_ws_kernel[grid](q_desc, k_desc, v_desc, qs, kv.k_scale, kv.v_scale, kv.v_mean, ov,
                          s_q, s_qpad, kv.seq, kv.seq_pad, kv.heads, ov.stride(0), ov.stride(1), ov.stride(2),
                          D=d, BN=block_n, KB=kv.k_block, STAGES=stages, TOP=top, OVERLAP=overlap,
                          PINGPONG=pingpong, CONSUMERS=consumers, EXP2_FMA=exp2_fma, TREE_MAX=tree_max,
                          num_warps=4)


def compile_offline(block_n: int, stages: int, overlap: int, pingpong: bool = False, head_dim: int = HEAD_DIM,
                    consumers: int = CONSUMERS, exp2_fma: int = 0, tree_max: bool = False) -> dict[str, object]:
    """:func:`_attn_ws_kernel` compiled for sm_90 without a GPU (Triton's bundled ptxas):
    its ``asm`` dict (``ptx``, ``cubin``, ...), for the CPU tests and for reading its SASS
    (benchmarks/attention_sass.py)."""
    if not HAS_GLUON:
        raise RuntimeError("compiling the warp-specialized attention needs Triton >= 3.6 with Gluon")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource  # private: moves between versions

    from wanquant.kernels.attention_config import K_BLOCK, LOG2_P_SCALE  # (it imports this module)

    d = head_dim
    box = consumers * BLOCK_M if consumers == 2 else BLOCK_M  # as attention_ws_launch
    layouts = {"q": gl.NVMMASharedLayout.get_default_for([box, d], gl.int8),
               "k": gl.NVMMASharedLayout.get_default_for([block_n, d], gl.int8),
               "v": gl.NVMMASharedLayout.get_default_for([d, block_n], gl.float8e4nv)}
    types = {"q_desc": f"tensordesc<i8[{box},{d}],{layouts['q']!r}>",
             "k_desc": f"tensordesc<i8[{block_n},{d}],{layouts['k']!r}>",
             "v_desc": f"tensordesc<fp8e4nv[{d},{block_n}],{layouts['v']!r}>", "o_ptr": "*bf16"}
    consts = dict(D=d, BN=block_n, KB=K_BLOCK, STAGES=stages, TOP=LOG2_P_SCALE, OVERLAP=overlap,
                  PINGPONG=pingpong, CONSUMERS=consumers, EXP2_FMA=exp2_fma, TREE_MAX=tree_max)
    fn = _attn_ws_kernel
    sig = {n: "constexpr" if n in consts else types.get(n, "*fp32" if n.endswith("_ptr") else "i32")
           for n in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm
