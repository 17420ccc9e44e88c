"""The 8-bit attention in plain PyTorch: the definition the kernels implement.

:func:`attention_int8_reference` and its two steps (:func:`quantize_kv_reference`,
:func:`attention_prepared_reference`) compute what the Triton kernels do, tile by tile
(:mod:`wanquant.kernels.attention` describes the design); exact attention
(:func:`attention_fp32`) and :func:`relative_error` are what the tests and benchmarks
measure the 8-bit results against. No Triton: these run on any device.
"""

from __future__ import annotations

import math

import torch

from wanquant.kernels.attention_config import (_MAGIC_F, DEFAULT_CONFIG, E4M3_MAX, INT8_MAX, K_BLOCK, LAZY_SLACK,
                                               LOG2_P_SCALE, AttnConfig, Layout, QuantKV, _bshd_view,
                                               _ceil_to, _check_v_perm, default_scale,
                                               query_scale_factor, v_token_order)


def _round_half_even(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # torch.round rounds half to even, as the kernels' magic-number add


def _fp32(v: float, device) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=device)


def _inverse_scale(top: float, amax: torch.Tensor) -> torch.Tensor:
    """``top / amax`` where ``amax > 0``, else 0, correctly rounded as the kernels compute it.

    (A tensor/tensor division: torch evaluates ``float / tensor`` as ``reciprocal * float``,
    which can be one ulp off and then flips an integer rounding.)
    """
    return torch.where(amax > 0, torch.full_like(amax, top) / amax.clamp_min(1e-30), torch.zeros_like(amax))


def quantize_kv_reference(k: torch.Tensor, v: torch.Tensor, layout: Layout = "bshd", k_block: int = K_BLOCK,
                          smooth_k: bool = True, smooth_v: bool = True, v_perm: bool | None = None) -> QuantKV:
    """What :func:`quantize_kv` writes, in plain PyTorch (fp32 math, same formulas).

    ``v_perm``: V's token order (default :data:`DEFAULT_CONFIG`'s; see :func:`v_token_order`).
    """
    v_perm = DEFAULT_CONFIG.v_perm if v_perm is None else v_perm
    _check_v_perm(v_perm, k_block)
    k, b, s, h, d = _bshd_view(k, layout)
    v, bv, sv, hv, dv = _bshd_view(v, layout)
    if (b, s, h, d) != (bv, sv, hv, dv):
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    dev = k.device
    s_pad = _ceil_to(s, k_block)
    kf = k.permute(0, 2, 1, 3).reshape(b * h, s, d).float()
    vf = v.permute(0, 2, 1, 3).reshape(b * h, s, d).float()
    inv_s = _fp32(1.0 / s, dev)
    if smooth_k:
        kf = kf - kf.sum(1, keepdim=True) * inv_s
    kp = torch.zeros(b * h, s_pad, d, dtype=torch.float32, device=dev)
    kp[:, :s] = kf
    kb = kp.view(b * h, s_pad // k_block, k_block, d)
    kamax = kb.abs().amax(dim=(2, 3))
    inv_k = _inverse_scale(INT8_MAX, kamax)
    k8 = _round_half_even(kb * inv_k[..., None, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    k_scale = kamax * _fp32(1.0 / INT8_MAX, dev)
    if smooth_v:
        v_mean = vf.sum(1) * inv_s
        vamax = torch.maximum(vf.amax(1) - v_mean, v_mean - vf.amin(1))
        vf = vf - v_mean[:, None, :]
    else:
        v_mean = torch.zeros(b * h, d, dtype=torch.float32, device=dev)
        vamax = torch.maximum(vf.amax(1), -vf.amin(1))
    inv_v = _inverse_scale(E4M3_MAX, vamax)
    v8 = (vf * inv_v[:, None, :]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    v8t = torch.zeros(b * h, d, s_pad, dtype=torch.float8_e4m3fn, device=dev)
    v8t[:, :, :s] = v8.transpose(1, 2)
    if v_perm:
        v8t[:, :, v_token_order(torch.arange(s_pad, device=dev))] = v8t.clone()
    return QuantKV(k8.view(b * h, s_pad, d).contiguous(), k_scale.contiguous(), v8t,
                   (vamax * _fp32(1.0 / E4M3_MAX, dev)).contiguous(), v_mean.contiguous(), b, h, s, k_block,
                   v_perm)


def quantize_q_reference(q: torch.Tensor, scale: float | None = None, layout: Layout = "bshd"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 Q per token: ``(q8 int8 [B*H, S, D], qs fp32 [B*H, S])`` with
    ``q * scale * log2(e) ~ q8 * qs`` (the main kernel's prologue)."""
    q, b, s, h, d = _bshd_view(q, layout)
    qf = q.permute(0, 2, 1, 3).reshape(b * h, s, d).float()
    amax = qf.abs().amax(-1)
    inv = _inverse_scale(INT8_MAX, amax)
    q8 = _round_half_even(qf * inv[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    qs = amax * _fp32(query_scale_factor(d, scale), q.device)
    return q8, qs


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 ``a * b + c`` rounded once (as ``tl.fma``): exact in fp64 for the kernel's operands."""
    return (a.double() * b.double() + c.double()).float()


def _exponent(qk: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, top: float, fold: bool) -> torch.Tensor:
    """``t = s - m + top`` (log2 of the stored P) from integer scores ``qk``, as the kernel computes it."""
    shift = m - _fp32(top, m.device)
    if not fold:
        return qk * sc[..., None] - shift[..., None]
    bias = _fma(sc, _fp32(_MAGIC_F, sc.device), shift)  # M c + m - top
    return _fma(qk + _MAGIC_F, sc[..., None], -bias[..., None])  # (qk + M) c - (M c + m - top)


def _block_any(flags: torch.Tensor, rows: int) -> torch.Tensor:
    """``flags [..., S]`` with each run of ``rows`` entries along the last dim set to its any()."""
    s = flags.shape[-1]
    pad = -s % rows
    f = torch.nn.functional.pad(flags, (0, pad)).unflatten(-1, (-1, rows)).any(-1, keepdim=True)
    return f.expand(*f.shape[:-1], rows).flatten(-2)[..., :s]


def attention_prepared_reference(q: torch.Tensor, kv: QuantKV, scale: float | None = None, layout: Layout = "bshd",
                                 block_n: int | None = None, out_dtype: torch.dtype | None = None,
                                 config: AttnConfig | None = None) -> torch.Tensor:
    """What :func:`attention_prepared` computes with ``config`` (default :data:`DEFAULT_CONFIG`;
    ``block_n`` overrides its key tile), tile by tile in ``block_n`` keys.

    The running maximum at which each tile's P is rounded to e4m3 is the kernel's, so only
    accumulation order and exp2's last bits differ from it.
    """
    cfg = config or DEFAULT_CONFIG
    block_n = block_n or cfg.block_n
    if kv.k_block % block_n:
        raise ValueError(f"block_n {block_n} must divide the K scale block {kv.k_block}")
    qv, b, s_q, h, d = _bshd_view(q, layout)
    if (b, h, d) != (kv.batch, kv.heads, kv.head_dim):
        raise ValueError(f"q {tuple(q.shape)} ({layout}) does not match the keys (B={kv.batch}, H={kv.heads}, "
                         f"D={kv.head_dim})")
    q8, qs = quantize_q_reference(qv, scale, "bshd")
    bh = b * h
    dev = q.device
    qd = q8.double()
    v8t = kv.v8t[:, :, v_token_order(torch.arange(kv.seq_pad, device=dev))] if kv.v_perm else kv.v8t
    m = torch.full((bh, s_q), -math.inf, dtype=torch.float32, device=dev)
    l = torch.zeros(bh, s_q, dtype=torch.float32, device=dev)
    acc = torch.zeros(bh, s_q, d, dtype=torch.float32, device=dev)
    for n0 in range(0, kv.seq, block_n):
        n1 = min(n0 + block_n, kv.seq)
        qk = (qd @ kv.k8[:, n0:n1].double().transpose(1, 2)).float()  # exact integers
        sc = qs * kv.k_scale[:, n0 // kv.k_block, None]
        m_tile = qk.amax(-1) * sc
        if cfg.lazy_rescale:  # per block of block_m rows, as the kernel's programs decide
            m_new = torch.where(_block_any(m_tile - m > LAZY_SLACK, cfg.block_m), torch.maximum(m, m_tile), m)
            t = _exponent(qk, sc, m_new, LOG2_P_SCALE - LAZY_SLACK, cfg.fold)
        else:
            m_new = torch.maximum(m, m_tile)
            t = _exponent(qk, sc, m_new, LOG2_P_SCALE, cfg.fold)
        if cfg.half_exp:  # exp2 of the fp16-rounded exponent, rounded to fp16
            p = torch.exp2(t.half().float()).half().float()
        else:
            p = torch.exp2(t)  # 448 * 2^(s - m)
        alpha = torch.exp2(m - m_new)
        p8 = p.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        l = l * alpha + (p8.float().sum(-1) if cfg.l_mma else p.sum(-1))
        v8 = v8t[:, :, n0:n1].transpose(1, 2)
        acc = acc * alpha[..., None] + (p8.double() @ v8.double()).float()
        m = m_new
    o = acc * (1.0 / l)[..., None] * kv.v_scale[:, None, :] + kv.v_mean[:, None, :]
    o = o.to(out_dtype or q.dtype).view(b, h, s_q, d)
    return o.transpose(1, 2) if layout == "bshd" else o


def attention_int8_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                             layout: Layout = "bshd", block_n: int | None = None, k_block: int = K_BLOCK,
                             smooth_k: bool = True, smooth_v: bool = True, config: AttnConfig | None = None
                             ) -> torch.Tensor:
    """The 8-bit attention in plain PyTorch: the definition the kernels implement.

    ``smooth_k=False`` / ``smooth_v=False`` switch the smoothing off (ablations, tests).
    Output: ``q``'s dtype and layout.
    """
    cfg = config or DEFAULT_CONFIG
    kv = quantize_kv_reference(k, v, layout, k_block, smooth_k, smooth_v, v_perm=cfg.v_perm)
    return attention_prepared_reference(q, kv, scale, layout, block_n, config=cfg)


def attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   layout: Layout = "bshd", dtype: torch.dtype = torch.float32, heads_per_step: int = 4
                   ) -> torch.Tensor:
    """Exact softmax attention in ``dtype`` (fp32 or fp64), ``[B, H, S, D]`` out (a few
    heads at a time: the score matrix of all heads would not fit at Wan sizes)."""
    qv, b, s_q, h, d = _bshd_view(q, layout)
    kv_, *_ = _bshd_view(k, layout)
    vv, _, _, _, _ = _bshd_view(v, layout)
    sm = default_scale(d, scale)
    out = torch.empty(b, h, s_q, d, dtype=dtype, device=q.device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would make the "exact" reference ~1e-3 off
    try:
        for h0 in range(0, h, heads_per_step):
            hs = slice(h0, min(h, h0 + heads_per_step))
            qq = qv[:, :, hs].transpose(1, 2).to(dtype)
            kk = kv_[:, :, hs].transpose(1, 2).to(dtype)
            vvv = vv[:, :, hs].transpose(1, 2).to(dtype)
            out[:, hs] = torch.softmax((qq @ kk.transpose(-1, -2)) * sm, dim=-1) @ vvv
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return out


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in fp64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))
