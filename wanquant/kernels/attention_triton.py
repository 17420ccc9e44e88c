"""The 8-bit attention's Triton kernels and their ``@triton.jit`` helpers.

The K/V pre-pass (statistics, their reduction, the quantization), the ``q_prepass`` Q
pre-pass and the main kernel; :mod:`wanquant.kernels.attention` launches them and its
docstring describes what they compute, :mod:`wanquant.kernels.attention_reference` is their
PyTorch definition. Defined only where Triton is installed (``HAS_TRITON``).
"""

from __future__ import annotations

from wanquant.kernels.act_quant import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from wanquant.kernels.act_quant import _exp2i, _round_bf16

if HAS_TRITON:

    @triton.jit
    def _rne(x):
        """Nearest integer, ties to even, for |x| < 2^22 (the magic-number add)."""
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _round_e4m3(x):
        """``x`` (fp32, clamped to +-448) rounded to the nearest-even e4m3 value, as fp32.

        e4m3 keeps 3 mantissa bits: the step is 2^(e-3) for |x| in [2^e, 2^(e+1)), e >= -6,
        and 2^-9 below 2^-6 (subnormals). Scaling by the inverse step (a power of two,
        exact) makes the step 1; the magic-number add rounds; scaling back is exact. The
        result is representable, so any later cast to e4m3 is exact.
        """
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.maximum(e, -6) - 3
        return _rne(x * _exp2i(-e)) * _exp2i(e)

    @triton.jit
    def _inv_scale(amax, TOP: tl.constexpr):
        """``TOP / amax`` (IEEE-rounded, as the reference) where ``amax > 0``, else 0."""
        safe = tl.maximum(amax, 1e-30)  # no 1/0 in the masked-off lanes
        return tl.where(amax > 0, tl.math.div_rn(safe * 0.0 + TOP, safe), 0.0)

    # Sequence lengths are not specialized (divisibility): every length shares one compiled
    # kernel; padded lengths and strides (multiples of 16 at Wan sizes) still are.
    @triton.jit(do_not_specialize=["S"])
    def _kv_stats_kernel(k_ptr, v_ptr, part_ptr, S, H, tok_per_split,
                         skb, sks, skh, svb, svs, svh,
                         D: tl.constexpr, BT: tl.constexpr, NSPLIT: tl.constexpr):
        """Per (batch*head, split): partial sums of K and V and V's column max/min.

        ``part [B*H, NSPLIT, 4, D]`` fp32: (sum k, sum v, max v, min v) over the split's
        tokens. Splitting S over NSPLIT programs keeps every SM busy (B*H alone is 40).
        The four statistics accumulate elementwise in [BT, D] registers and are reduced
        over tokens once at the end: a reduction per tile puts a cross-warp barrier between
        every load and the next (that form took 1.25 ms at 75,600 tokens x 40 heads on an
        H200, about 3.5x the time to read K and V once). The next tile is loaded before
        this one is added (Triton pipelines only loops with dots).
        """
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        d = tl.arange(0, D)
        t = tl.arange(0, BT)
        ksum = tl.zeros((BT, D), dtype=tl.float32)
        vsum = tl.zeros((BT, D), dtype=tl.float32)
        vmax = tl.full((BT, D), float("-inf"), dtype=tl.float32)
        vmin = tl.full((BT, D), float("inf"), dtype=tl.float32)
        start = sp * tok_per_split
        end = tl.minimum(start + tok_per_split, S)
        k_base = k_ptr + b * skb + h * skh + d[None, :]
        v_base = v_ptr + b * svb + h * svh + d[None, :]
        s = start + t
        ok = s < end
        kt_next = tl.load(k_base + s.to(tl.int64)[:, None] * sks, mask=ok[:, None], other=0.0)
        vt_next = tl.load(v_base + s.to(tl.int64)[:, None] * svs, mask=ok[:, None], other=0.0)
        for t0 in range(start, start + tok_per_split, BT):
            kt = kt_next.to(tl.float32)
            vt = vt_next.to(tl.float32)
            vok = ok
            s = t0 + BT + t
            ok = s < end
            kt_next = tl.load(k_base + s.to(tl.int64)[:, None] * sks, mask=ok[:, None], other=0.0)
            vt_next = tl.load(v_base + s.to(tl.int64)[:, None] * svs, mask=ok[:, None], other=0.0)
            ksum += kt
            vsum += vt
            vmax = tl.maximum(vmax, tl.where(vok[:, None], vt, float("-inf")))
            vmin = tl.minimum(vmin, tl.where(vok[:, None], vt, float("inf")))
        ksum = tl.sum(ksum, 0)
        vsum = tl.sum(vsum, 0)
        vmax = tl.max(vmax, 0)
        vmin = tl.min(vmin, 0)
        base = part_ptr + (bh * NSPLIT + sp) * (4 * D)
        tl.store(base + d, ksum)
        tl.store(base + D + d, vsum)
        tl.store(base + 2 * D + d, vmax)
        tl.store(base + 3 * D + d, vmin)

    @triton.jit
    def _kv_finalize_kernel(part_ptr, stat_ptr, vs_ptr, vm_ptr, inv_s, D: tl.constexpr, NSPLIT: tl.constexpr,
                            SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr):
        """Per (batch*head): reduce the partial statistics once. ``stat [B*H, 2, D]``: K's mean
        and 448 / colmax|V - mu_v|; V's scale and mean go to ``vs``/``vm``."""
        bh = tl.program_id(0)
        d = tl.arange(0, D)
        sp = tl.arange(0, NSPLIT)
        pbase = part_ptr + bh * (NSPLIT * 4 * D) + sp[:, None] * (4 * D) + d[None, :]
        if SMOOTH_K:
            k_mean = tl.sum(tl.load(pbase), 0) * inv_s
        else:
            k_mean = tl.zeros((D,), dtype=tl.float32)
        vmax = tl.max(tl.load(pbase + 2 * D), 0)
        vmin = tl.min(tl.load(pbase + 3 * D), 0)
        if SMOOTH_V:
            v_mean = tl.sum(tl.load(pbase + D), 0) * inv_s
            vamax = tl.maximum(vmax - v_mean, v_mean - vmin)
        else:
            v_mean = tl.zeros((D,), dtype=tl.float32)
            vamax = tl.maximum(vmax, -vmin)
        tl.store(stat_ptr + bh * (2 * D) + d, k_mean)
        tl.store(stat_ptr + bh * (2 * D) + D + d, _inv_scale(vamax, 448.0))
        tl.store(vs_ptr + bh * D + d, vamax * (1.0 / 448.0))
        tl.store(vm_ptr + bh * D + d, v_mean)

    @triton.jit(do_not_specialize=["S"])
    def _kv_quant_kernel(k_ptr, v_ptr, stat_ptr, vm_ptr, k8_ptr, ks_ptr, v8_ptr, S, S_pad, H,
                         skb, sks, skh, svb, svs, svh,
                         D: tl.constexpr, KB: tl.constexpr, VPERM: tl.constexpr):
        """One K scale block (KB tokens) of one (batch, head): INT8 keys and e4m3 values.
        Padded tokens (>= S) are written as zeros."""
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        d = tl.arange(0, D)
        k_mean = tl.load(stat_ptr + bh * (2 * D) + d)
        inv_v = tl.load(stat_ptr + bh * (2 * D) + D + d)
        v_mean = tl.load(vm_ptr + bh * D + d)
        s = blk * KB + tl.arange(0, KB)
        ok = s < S
        s64 = s.to(tl.int64)
        kt = tl.load(k_ptr + b * skb + s64[:, None] * sks + h * skh + d[None, :], mask=ok[:, None], other=0.0)
        kt = tl.where(ok[:, None], kt.to(tl.float32) - k_mean[None, :], 0.0)
        kamax = tl.max(tl.max(tl.abs(kt), 1), 0)
        inv_k = _inv_scale(kamax, 127.0)
        tl.store(ks_ptr + bh * (S_pad // KB) + blk, kamax * (1.0 / 127.0))
        k8 = tl.minimum(tl.maximum(_rne(kt * inv_k), -127.0), 127.0)
        bh64 = bh.to(tl.int64)
        tl.store(k8_ptr + bh64 * S_pad * D + s64[:, None] * D + d[None, :], k8.to(tl.int8))

        vt = tl.load(v_ptr + b * svb + s64[:, None] * svs + h * svh + d[None, :], mask=ok[:, None], other=0.0)
        vt = tl.where(ok[:, None], vt.to(tl.float32) - v_mean[None, :], 0.0)
        v8 = _round_e4m3(vt * inv_v[None, :])
        v8 = v8.to(tl.float8e4nv)
        if VPERM:  # tokens in v_token_order: permuted in registers, so that the store stays contiguous
            v8 = tl.reshape(tl.permute(tl.reshape(v8, (KB // 32, 2, 2, 2, 2, 2, D)), (0, 1, 3, 4, 2, 5, 6)), (KB, D))
        # Transposed store: V^T [B*H, D, S_pad] (tokens contiguous, K-major for the P.V wgmma).
        tl.store(v8_ptr + bh64 * D * S_pad + d[None, :].to(tl.int64) * S_pad + s64[:, None], v8)

    @triton.jit
    def _rescale(acc, l_i, m_i, m_tile, LMMA: tl.constexpr):
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.math.exp2(m_i - m_new)
        if LMMA:  # l_i: [BM, 16] accumulator of P8 . ones
            l_i = l_i * alpha[:, None]
        else:
            l_i = l_i * alpha
        return acc * alpha[:, None], l_i, m_new

    @triton.jit
    def _exp2_f16(t, INTERPRET: tl.constexpr):
        """``2^t`` of fp16 ``t`` in fp16: one ``ex2.approx.f16x2`` per two values on the GPU."""
        if INTERPRET:  # no inline PTX in the interpreter
            return tl.math.exp2(t.to(tl.float32)).to(tl.float16)
        return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [t], dtype=tl.float16,
                                         is_pure=True, pack=2)

    @triton.jit
    def _wgmma_order(p8, BM: tl.constexpr, BN: tl.constexpr):
        """P's columns in :func:`v_token_order`: column n = (j1 j0 t1 t0 b) of each 32 goes to
        k = (j1 t1 t0 j0 b), which in registers is no move at all (see that function)."""
        p8 = tl.reshape(p8, (BM, BN // 32, 2, 2, 2, 2, 2))
        p8 = tl.permute(p8, (0, 1, 2, 4, 5, 3, 6))
        return tl.reshape(p8, (BM, BN))

    @triton.jit
    def _scores(q8, k_src, k_row, n0, D: tl.constexpr, BN: tl.constexpr, TMA: tl.constexpr):
        """Integer scores of one key tile: ``k_src`` is a descriptor of all K rows (TMA) or
        this head's K base pointer."""
        if TMA:
            k = k_src.load([k_row + n0, 0]).T  # [D, BN] int8
        else:
            offs_n = n0 + tl.arange(0, BN)
            k = tl.load(k_src + offs_n[None, :] * D + tl.arange(0, D)[:, None])  # [D, BN] int8, K-major
        return tl.dot(q8, k, out_dtype=tl.int32)  # exact

    @triton.jit
    def _softmax_pv(acc, l_i, m_i, ones, qk, qsc, v_src, ks_base, v_row, n0, S_k, S_kpad,
                    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, MASKED: tl.constexpr,
                    PV_PROMOTE: tl.constexpr, FOLD: tl.constexpr, TMA: tl.constexpr, VPERM: tl.constexpr,
                    LMMA: tl.constexpr, HALF_EXP: tl.constexpr, LAZY: tl.constexpr, SLACK: tl.constexpr,
                    TOP: tl.constexpr, INTERPRET: tl.constexpr):
        """The online softmax of one tile's scores and its P.V (see the module docstring)."""
        offs_n = n0 + tl.arange(0, BN)
        if TMA:  # first: the barrier wait stays out of the wgmma pipeline stage (ptxas would serialize)
            v = v_src.load([v_row, n0]).T  # [BN, D] e4m3 from V^T: K-major
        if MASKED:
            col_ok = offs_n < S_k
            qk = tl.where(col_ok[None, :], qk, -4194303)  # below any real score, inside the 2^22 trick range
        sc = qsc * tl.load(ks_base + n0 // KB)  # log2-domain units per integer unit, per row
        m_tile = tl.max(qk, 1).to(tl.float32) * sc
        if LAZY:  # rescale only when a row's maximum outgrew the reference by more than the slack
            if tl.max(m_tile - m_i, 0) > SLACK:
                acc, l_i, m_i = _rescale(acc, l_i, m_i, m_tile, LMMA)
        else:
            acc, l_i, m_i = _rescale(acc, l_i, m_i, m_tile, LMMA)
        shift = m_i - TOP  # stored P = 448 * 2^(s - m) (lazy: 2^(s - m - SLACK)); TOP = log2(448) (- SLACK)
        qkb = (qk + 0x4B400000).to(tl.float32, bitcast=True)  # 1.5 * 2^23 + qk, exact
        if FOLD:  # t = (M + qk) c - (M c + shift): one FMA per score
            bias = tl.fma(sc, 12582912.0, shift)
            t = tl.fma(qkb, sc[:, None], -bias[:, None])
        else:
            t = (qkb - 12582912.0) * sc[:, None] - shift[:, None]  # int32 -> fp32 exactly, then scale
        if MASKED:
            t = tl.where(col_ok[None, :], t, float("-inf"))
        if HALF_EXP:
            p = _exp2_f16(t.to(tl.float16), INTERPRET)
            l_i += tl.sum(p, 1).to(tl.float32)  # fp16 within the tile: <= BN x 448 < 65,504
        else:
            p = tl.math.exp2(t)  # 448 * 2^(s - m), in [0, 448]
            if not LMMA:
                l_i += tl.sum(p, 1)
        if not TMA:
            v = tl.load(v_src + tl.arange(0, D)[None, :] * S_kpad + offs_n[:, None])  # [BN, D] e4m3, K-major
        if INTERPRET:  # the interpreter's fp32 -> e4m3 cast truncates; the GPU's rounds to nearest even
            p8 = _round_e4m3(p.to(tl.float32)).to(tl.float8e4nv)
        else:
            p8 = p.to(tl.float8e4nv)
        if VPERM:
            p8 = _wgmma_order(p8, BM, BN)
        if PV_PROMOTE:
            acc = tl.dot(p8, v, acc, max_num_imprecise_acc=BN)
        else:
            acc = tl.dot(p8, v, acc)
        if LMMA:  # the row sums of the rounded P on the tensor cores (16: wgmma's smallest N here);
            # promoted per tile: l grows to ~S x 448, far past what Hopper's FP8 accumulator
            # (~22 bits) adds a tile's sum to without losing it (0.5 relative error at 32k keys)
            l_i = tl.dot(p8, ones, l_i, max_num_imprecise_acc=BN)
        return acc, l_i, m_i

    @triton.jit
    def _quant_q_rows(q_ptr, b, h, m64, m_ok, sqb, sqs, sqh, qk_c, D: tl.constexpr):
        """INT8 Q per token (rows beyond S_q: zeros); the softmax scale and log2(e) ride on its scale."""
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sqb + m64[:, None] * sqs + h * sqh + d[None, :], mask=m_ok[:, None], other=0.0)
        q = q.to(tl.float32)
        amax = tl.max(tl.abs(q), 1)
        inv = _inv_scale(amax, 127.0)
        q8 = tl.minimum(tl.maximum(_rne(q * inv[:, None]), -127.0), 127.0).to(tl.int8)
        return q8, amax * qk_c

    @triton.jit(do_not_specialize=["S_q"])
    def _q_quant_kernel(q_ptr, q8_ptr, qs_ptr, S_q, S_qpad, H, qk_c, sqb, sqs, sqh,
                        D: tl.constexpr, BM: tl.constexpr):
        """The ``q_prepass`` variant's Q pre-pass: ``q8 [B*H, S_qpad, D]``, ``qs [B*H, S_qpad]``."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        offs_m = pid_m * BM + tl.arange(0, BM)
        m64 = offs_m.to(tl.int64)
        q8, qsc = _quant_q_rows(q_ptr, (bh // H).to(tl.int64), (bh % H).to(tl.int64), m64, offs_m < S_q,
                                sqb, sqs, sqh, qk_c, D)
        bh64 = bh.to(tl.int64)
        d = tl.arange(0, D)
        tl.store(q8_ptr + bh64 * S_qpad * D + m64[:, None] * D + d[None, :], q8)
        tl.store(qs_ptr + bh64 * S_qpad + m64, qsc)

    @triton.jit(do_not_specialize=["S_q", "S_k"])
    def _attn_fwd_kernel(q_ptr, q8_ptr, qs_ptr, k8_ptr, ks_ptr, v8_ptr, vs_ptr, vm_ptr, o_ptr, ones_ptr,
                         S_q, S_qpad, S_k, S_kpad, H, qk_c,
                         sqb, sqs, sqh, sob, sos, soh,
                         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr,
                         PV_PROMOTE: tl.constexpr, Q_PRE: tl.constexpr, FOLD: tl.constexpr, TMA: tl.constexpr,
                         VPERM: tl.constexpr, LMMA: tl.constexpr, WS: tl.constexpr, HALF_EXP: tl.constexpr,
                         LAZY: tl.constexpr, SLACK: tl.constexpr, AHEAD: tl.constexpr, TOP: tl.constexpr,
                         INTERPRET: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        bh64 = bh.to(tl.int64)
        offs_m = pid_m * BM + tl.arange(0, BM)
        m_ok = offs_m < S_q
        m64 = offs_m.to(tl.int64)
        d = tl.arange(0, D)

        if Q_PRE:  # INT8 Q from the pre-pass (padded to S_qpad rows, a multiple of BM)
            q8 = tl.load(q8_ptr + bh64 * S_qpad * D + m64[:, None] * D + d[None, :])
            qsc = tl.load(qs_ptr + bh64 * S_qpad + m64)
        else:  # prologue: quantize this program's queries in registers
            q8, qsc = _quant_q_rows(q_ptr, b, h, m64, m_ok, sqb, sqs, sqh, qk_c, D)

        if TMA:  # descriptors of the [B*H*S_kpad, D] keys and [B*H*D, S_kpad] values
            k_src = k8_ptr
            v_src = v8_ptr
        else:
            k_src = k8_ptr + bh64 * S_kpad * D
            v_src = v8_ptr + bh64 * D * S_kpad
        ks_base = ks_ptr + bh64 * (S_kpad // KB)
        m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
        if LMMA:
            l_i = tl.zeros((BM, 16), dtype=tl.float32)
        else:
            l_i = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, D), dtype=tl.float32)
        if LMMA:  # loaded (not tl.full) so that Triton stages it in shared memory once, not every tile
            ones = tl.load(ones_ptr + tl.arange(0, BN)[:, None] * 16 + tl.arange(0, 16)[None, :])  # [BN, 16] e4m3
        else:
            ones = 0
        k_row = bh * S_kpad
        v_row = bh * D
        n_full = (S_k // BN) * BN
        if WS:  # the default stays on the plain loop it was measured with
            for n0 in tl.range(0, n_full, BN, warp_specialize=True):
                qk = _scores(q8, k_src, k_row, n0, D, BN, TMA)
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, ones, qk, qsc, v_src, ks_base, v_row, n0, S_k, S_kpad,
                                            D, BM, BN, KB, False, PV_PROMOTE, FOLD, TMA, VPERM, LMMA, HALF_EXP,
                                            LAZY, SLACK, TOP, INTERPRET)
        elif AHEAD:  # tile 0's scores first (K is padded: a valid read even when n_full == 0)
            qk = _scores(q8, k_src, k_row, 0, D, BN, TMA)
            for n0 in range(BN, n_full, BN):
                qk_next = _scores(q8, k_src, k_row, n0, D, BN, TMA)
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, ones, qk, qsc, v_src, ks_base, v_row, n0 - BN, S_k,
                                            S_kpad, D, BM, BN, KB, False, PV_PROMOTE, FOLD, TMA, VPERM, LMMA,
                                            HALF_EXP, LAZY, SLACK, TOP, INTERPRET)
                qk = qk_next
            if n_full > 0:
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, ones, qk, qsc, v_src, ks_base, v_row, n_full - BN, S_k,
                                            S_kpad, D, BM, BN, KB, False, PV_PROMOTE, FOLD, TMA, VPERM, LMMA,
                                            HALF_EXP, LAZY, SLACK, TOP, INTERPRET)
        else:
            for n0 in range(0, n_full, BN):
                qk = _scores(q8, k_src, k_row, n0, D, BN, TMA)
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, ones, qk, qsc, v_src, ks_base, v_row, n0, S_k, S_kpad,
                                            D, BM, BN, KB, False, PV_PROMOTE, FOLD, TMA, VPERM, LMMA, HALF_EXP,
                                            LAZY, SLACK, TOP, INTERPRET)
        if n_full < S_k:  # the ragged last tile, masked
            qk = _scores(q8, k_src, k_row, n_full, D, BN, TMA)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, ones, qk, qsc, v_src, ks_base, v_row, n_full, S_k, S_kpad,
                                        D, BM, BN, KB, True, PV_PROMOTE, FOLD, TMA, VPERM, LMMA, HALF_EXP, LAZY,
                                        SLACK, TOP, INTERPRET)

        vs = tl.load(vs_ptr + bh64 * D + d)
        vm = tl.load(vm_ptr + bh64 * D + d)
        if LMMA:
            l_i = tl.max(l_i, 1)  # 16 equal columns
        o = acc * (1.0 / l_i)[:, None] * vs[None, :] + vm[None, :]
        if INTERPRET:  # the interpreter truncates fp32 -> bf16; round to nearest even first
            if o_ptr.dtype.element_ty == tl.bfloat16:
                o = _round_bf16(o)
        tl.store(o_ptr + b * sob + m64[:, None] * sos + h * soh + d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None])
