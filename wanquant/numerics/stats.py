"""Streaming, mergeable calibration statistics of a linear layer's input.

Every accumulator takes batches ``[..., K]`` (any leading shape) and can be merged with
another of its kind (sums across processes or calibration shards). Whole activations
are never kept: only maxima, a histogram, a Hessian and a bounded token reservoir.
Part of ``numerics`` (formats -> numerics -> method -> kernels/runtime): plain tensors,
no configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _check_weight(weight: int) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ValueError(f"a batch's repeat weight must be a whole number >= 1, got {weight!r}")
    return weight


_FP32_OUT_GEMM: dict[str, str | None] = {}


def fp32_out_gemm(device: torch.device) -> str | None:
    """How this device forms a 16-bit GEMM with fp32 output, if it can: ``"addmm"``
    (accumulating in place), ``"mm"`` (a product, then an addition) or None.

    CUDA on torch >= 2.8 has ``out_dtype`` on ``mm``/``addmm``; the CPU does not (and its bf16
    GEMM would be slower than fp32 anyway). Probed once per device type on a tiny problem
    whose result is exact, and checked against fp32.
    """
    key = torch.device(device).type
    if key not in _FP32_OUT_GEMM:
        _FP32_OUT_GEMM[key] = None
        if key == "cuda":
            x = (torch.arange(48, device=device, dtype=torch.float32).reshape(12, 4) / 8).bfloat16()
            ref = 1 + 3 * (x.float().T @ x.float())
            for mode in ("addmm", "mm"):
                h = torch.ones(4, 4, device=device)
                try:
                    _gemm16(mode, h, x, 3)
                except (RuntimeError, TypeError):
                    continue
                if torch.equal(h, ref):
                    _FP32_OUT_GEMM[key] = mode
                    break
    return _FP32_OUT_GEMM[key]


def fp32_out_gemm_available(device: torch.device) -> bool:
    return fp32_out_gemm(device) is not None


def _gemm16(mode: str, h: torch.Tensor, x: torch.Tensor, weight: int) -> None:
    if mode == "addmm":
        torch.addmm(h, x.T, x, alpha=weight, out_dtype=torch.float32, out=h)
    else:
        h.add_(torch.mm(x.T, x, out_dtype=torch.float32), alpha=weight)


def accumulate_gram(h: torch.Tensor, x: torch.Tensor, weight: int = 1, fast: bool = True) -> str:
    """``h += weight * x^T x`` for ``x`` ``[T, K]``; returns the path taken.

    ``"bf16_gemm"``: 16-bit ``x`` with an fp32 ``h`` on a device with an fp32-output 16-bit
    GEMM (:func:`fp32_out_gemm`). Products of two bf16 (or fp16) numbers are exact in fp32
    and the GEMM accumulates in fp32, so this differs from the fp32 GEMM of the upcast
    input only in the order of the additions, at a fraction of its cost on Hopper.
    ``"fp32"``: ``x`` upcast to ``h``'s dtype (TF32 as the backend flags say: off by default).
    ``h`` may live on another device than ``x`` (statistics spilled to host memory): the
    product is formed on ``x``'s device and added where ``h`` is.
    """
    weight = _check_weight(weight)
    if x.device != h.device:
        g = torch.zeros(h.shape, dtype=h.dtype, device=x.device)
        path = accumulate_gram(g, x, weight, fast)
        h.add_(g.to(h.device))
        return path + "+spill"
    mode = fp32_out_gemm(x.device) if fast and h.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16) \
        else None
    if mode is not None:
        _gemm16(mode, h, x, weight)
        return "bf16_gemm" if mode == "addmm" else "bf16_gemm_mm"
    xf = x.to(h.dtype)
    h.addmm_(xf.T, xf, alpha=weight)
    return "fp32"


def _flat(x: torch.Tensor, k: int, name: str, what: str) -> torch.Tensor:
    """``x`` as ``[T, K]``; clear errors for a wrong width, dtype or non-finite values."""
    who = f"layer {name!r}: " if name else ""
    if not x.is_floating_point():
        raise TypeError(f"{who}{what} must be floating point, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != k:
        raise ValueError(f"{who}{what} has last dimension {tuple(x.shape)[-1:]}, expected {k}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{who}{what} contains NaN or Inf; the calibration activations are broken")
    return x.reshape(-1, k)


class AbsMax:
    """Per-channel maximum of ``|x|``."""

    def __init__(self, k: int, name: str = "") -> None:
        self.k, self.name = k, name
        self.value = torch.zeros(k, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> None:
        x = _flat(x, self.k, self.name, "activation batch")
        if x.shape[0]:
            self.value = torch.maximum(self.value, x.abs().amax(0).float().cpu())

    def merge(self, other: "AbsMax") -> "AbsMax":
        self.value = torch.maximum(self.value, other.value)
        return self


class LogHistogram:
    """Per-channel histogram of ``log2|x|`` for a high percentile of ``|x|``.

    Bins are ``bins_per_octave`` per power of two over ``[2^min_exp, 2^max_exp)``; bin 0
    holds zeros and anything smaller, the last bin anything larger. Counts add exactly,
    so merging is exact. :meth:`quantile` returns the upper edge of the bin holding the
    requested order statistic, capped by the exact channel maximum: the estimate is
    never below the true percentile and at most ``2^(1/bins_per_octave)`` above it
    (9 % for the default 8) for values inside the range. Memory: ``K x bins`` int64.
    """

    def __init__(self, k: int, bins_per_octave: int = 8, min_exp: int = -32, max_exp: int = 32, name: str = "") -> None:
        if bins_per_octave < 1 or max_exp <= min_exp:
            raise ValueError("need bins_per_octave >= 1 and max_exp > min_exp")
        self.k, self.bpo, self.min_exp, self.max_exp, self.name = k, bins_per_octave, min_exp, max_exp, name
        self.nbins = (max_exp - min_exp) * bins_per_octave + 1
        self.counts = torch.zeros(k, self.nbins, dtype=torch.int64)
        self.amax = AbsMax(k, name)

    def update(self, x: torch.Tensor, chunk: int = 4096, weight: int = 1) -> None:
        """``weight``: the batch stands for that many identical copies (counts scale exactly)."""
        weight = _check_weight(weight)
        x = _flat(x, self.k, self.name, "activation batch")
        self.amax.update(x)
        offs = torch.arange(self.k, device=x.device) * self.nbins
        for i in range(0, x.shape[0], chunk):  # chunks bound the int64 index temporaries
            a = x[i : i + chunk].abs().float()
            b = torch.floor((torch.log2(a) - self.min_exp) * self.bpo) + 1  # log2(0) = -inf
            b = b.clamp(0, self.nbins - 1).long()
            counts = torch.bincount((b + offs).flatten(), minlength=self.k * self.nbins).view(self.k, -1).cpu()
            self.counts += counts * weight if weight != 1 else counts

    def merge(self, other: "LogHistogram") -> "LogHistogram":
        if (other.bpo, other.min_exp, other.max_exp, other.k) != (self.bpo, self.min_exp, self.max_exp, self.k):
            raise ValueError("cannot merge histograms with different binning")
        self.counts += other.counts
        self.amax.merge(other.amax)
        return self

    def quantile(self, q: float) -> torch.Tensor:
        """Estimated per-channel ``q``-quantile of ``|x|`` (fp32 [K]); q=1 gives the max."""
        if not 0.0 < q <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {q}")
        n = self.counts.sum(1)
        if q == 1.0 or int(n.max()) == 0:
            return self.amax.value.clone()
        rank = torch.ceil(q * n.double()).clamp(min=1).long()  # 1-based order statistic
        j = (self.counts.cumsum(1) < rank[:, None]).sum(1)  # first bin reaching the rank
        edge = torch.exp2(self.min_exp + j.double() / self.bpo).float()
        return torch.minimum(edge, self.amax.value)


class HessianAccumulator:
    """The sum ``X^T X`` over all tokens (fp32, or fp64 for long runs) and the token count.

    Kept as a sum, not a mean, so that merging is a plain addition; GPTQ is invariant to
    the Hessian's overall scale, use :meth:`mean` where a normalised one is wanted.
    ``fast``: 16-bit batches on CUDA go through an fp32-output bf16 GEMM
    (:func:`accumulate_gram`); ``self.path`` records the path the last batch took.
    ``device`` may differ from the batches' (a Hessian spilled to host memory).
    """

    def __init__(self, k: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 name: str = "", fast: bool = True) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"Hessian dtype must be float32 or float64, got {dtype}")
        self.k, self.name, self.fast = k, name, fast
        self.hessian = torch.zeros(k, k, dtype=dtype, device=device)
        self.n_tokens = 0
        self.path = ""

    def update(self, x: torch.Tensor, weight: int = 1) -> None:
        """``weight``: the batch stands for that many identical copies of itself."""
        x = _flat(x, self.k, self.name, "activation batch")
        self.path = accumulate_gram(self.hessian, x, weight, self.fast)
        self.n_tokens += x.shape[0] * weight

    def merge(self, other: "HessianAccumulator") -> "HessianAccumulator":
        self.hessian += other.hessian.to(self.hessian.device, self.hessian.dtype)
        self.n_tokens += other.n_tokens
        return self

    def mean(self) -> torch.Tensor:
        return self.hessian / max(self.n_tokens, 1)


class TokenReservoir:
    """A uniform random sample of at most ``capacity`` tokens from a stream.

    Each token gets an i.i.d. uniform key and the reservoir keeps the ``capacity``
    smallest keys: every subset of that size is equally likely (reservoir sampling by
    random priorities). Because keys travel with the tokens, :meth:`merge` keeps the
    smallest keys of both and is exactly a uniform sample of the union, whatever the
    two streams' lengths. Deterministic given ``seed`` and the batches; give every
    process its own seed (merging two equal-seed streams would correlate their keys).
    Tokens are stored on the CPU in ``dtype`` (default: the first batch's dtype).
    """

    def __init__(self, k: int, capacity: int, seed: int = 0, dtype: torch.dtype | None = None, name: str = "") -> None:
        if capacity < 0:
            raise ValueError(f"reservoir capacity must be >= 0, got {capacity}")
        self.k, self.capacity, self.seed, self.name = k, capacity, seed, name
        self.gen = torch.Generator().manual_seed(seed)
        self.keys = torch.zeros(0, dtype=torch.float64)
        self.tokens = torch.zeros(0, k, dtype=dtype or torch.float32)
        self._dtype_set = dtype is not None
        self.n_seen = 0

    def update(self, x: torch.Tensor, weight: int = 1) -> None:
        """``weight``: the batch stands for that many identical copies; its distinct tokens
        are sampled once (a sample of the same distribution when every batch of a stream
        carries the same weight) and ``n_seen`` counts every copy."""
        weight = _check_weight(weight)
        x = _flat(x, self.k, self.name, "activation batch")
        if not self._dtype_set:
            self.tokens, self._dtype_set = self.tokens.to(x.dtype), True
        keys = torch.rand(x.shape[0], generator=self.gen, dtype=torch.float64)
        self.n_seen += x.shape[0] * weight
        if len(self.keys) >= self.capacity:  # full: only keys below the current worst can enter
            keep = keys < self.keys.max() if self.capacity else torch.zeros_like(keys, dtype=torch.bool)
            keys, x = keys[keep], x[keep.to(x.device)]
        if len(keys) > self.capacity:  # only the batch's own smallest keys can survive: copy just those
            idx = torch.topk(keys, self.capacity, largest=False).indices.sort().values
            keys, x = keys[idx], x[idx.to(x.device)]
        self._absorb(keys, x.to("cpu", self.tokens.dtype))

    def _absorb(self, keys: torch.Tensor, tokens: torch.Tensor) -> None:
        keys, tokens = torch.cat([self.keys, keys]), torch.cat([self.tokens, tokens.to(self.tokens.dtype)])
        if len(keys) > self.capacity:
            idx = torch.topk(keys, self.capacity, largest=False).indices.sort().values
            keys, tokens = keys[idx], tokens[idx]
        self.keys, self.tokens = keys, tokens

    def merge(self, other: "TokenReservoir") -> "TokenReservoir":
        if other.n_seen and self.n_seen and other.seed == self.seed:
            raise ValueError(f"layer {self.name!r}: merging reservoirs drawn with the same seed {self.seed}; "
                             "give every calibration process its own seed")
        self._absorb(other.keys, other.tokens)
        self.n_seen += other.n_seen
        return self


@dataclass
class LayerStats:
    """What quantizing one linear needs from calibration (one expert).

    ``hessian`` is the *sum* ``X^T X`` over ``n_tokens`` tokens of the unsmoothed input.
    ``reservoirs[b]`` holds sampled input tokens of timestep bin ``b``;
    ``reservoir_seen[b]`` (optional) how many tokens that sample stands for.
    """

    act_absmax: torch.Tensor  # fp32 [K]
    act_quantile: torch.Tensor | None  # fp32 [K]
    hessian: torch.Tensor  # fp32/fp64 [K, K]
    n_tokens: int
    reservoirs: dict[int, torch.Tensor] = field(default_factory=dict)  # bin -> [T, K]
    reservoir_seen: dict[int, int] = field(default_factory=dict)

    def merge(self, other: "LayerStats", reservoir_capacity: int | None = None, seed: int = 0) -> "LayerStats":
        """Combine two shards into a new object.

        Maxima take the max, Hessians and counts add. Quantiles cannot be merged from
        their values: the larger is kept (conservative; merge the histograms instead
        where exactness matters). Reservoirs are concatenated; with
        ``reservoir_capacity`` each bin is subsampled to it, taking from each side in
        proportion to the tokens it stands for (``reservoir_seen``, else its size).
        """
        q = None
        if self.act_quantile is not None and other.act_quantile is not None:
            q = torch.maximum(self.act_quantile, other.act_quantile)
        gen = torch.Generator().manual_seed(seed)
        res, seen = {}, {}
        for b in sorted(set(self.reservoirs) | set(other.reservoirs)):
            parts = [(s.reservoirs[b], s.reservoir_seen.get(b, len(s.reservoirs[b])))
                     for s in (self, other) if b in s.reservoirs]
            seen[b] = sum(n for _, n in parts)
            res[b] = _weighted_union(parts, reservoir_capacity, gen)
        return LayerStats(torch.maximum(self.act_absmax, other.act_absmax), q,
                          self.hessian + other.hessian.to(self.hessian.dtype), self.n_tokens + other.n_tokens, res, seen)


def _weighted_union(parts: list[tuple[torch.Tensor, int]], cap: int | None, gen: torch.Generator) -> torch.Tensor:
    """Concatenate samples, or draw ``cap`` tokens taking from each in proportion to its weight."""
    if cap is None or sum(len(t) for t, _ in parts) <= cap:
        return torch.cat([t for t, _ in parts])
    total = sum(n for _, n in parts) or 1
    want = [min(len(t), round(cap * n / total)) for t, n in parts]
    for i, (t, _) in enumerate(parts):  # rounding or a short side: top up from whoever has spare
        want[i] = min(len(t), want[i] + cap - sum(want))
    return torch.cat([t[torch.randperm(len(t), generator=gen)[:m].sort().values] for (t, _), m in zip(parts, want)])


class LayerStatsAccumulator:
    """All statistics of one layer input for one expert, fed batch by batch with their bin.

    ``quantile``: also keep a :class:`LogHistogram` and report that percentile.
    ``seed`` seeds the reservoirs (bin ``b`` uses ``seed + b``); use a distinct seed
    per process when the results will be merged.
    """

    def __init__(self, k: int, num_bins: int, reservoir_capacity: int = 4096, quantile: float | None = None,
                 hessian_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 seed: int = 0, name: str = "", fast_hessian: bool = True) -> None:
        self.k, self.num_bins, self.quantile, self.name = k, num_bins, quantile, name
        self.absmax = AbsMax(k, name)
        self.hist = LogHistogram(k, name=name) if quantile is not None else None
        self.hessian = HessianAccumulator(k, hessian_dtype, device, name, fast=fast_hessian)
        self.reservoirs = [TokenReservoir(k, reservoir_capacity, seed + b, name=name) for b in range(num_bins)]

    def update(self, x: torch.Tensor, bin_index: int) -> None:
        if not 0 <= bin_index < self.num_bins:
            raise ValueError(f"layer {self.name!r}: bin {bin_index} outside [0, {self.num_bins})")
        x = _flat(x, self.k, self.name, "activation batch")
        self.absmax.update(x)
        if self.hist is not None:
            self.hist.update(x)
        self.hessian.update(x)
        self.reservoirs[bin_index].update(x)

    def update_repeated(self, x: torch.Tensor, bin_weights: dict[int, int]) -> None:
        """``x`` fed ``bin_weights[b]`` times in bin ``b``, computed once.

        For an input that is the same tensor at every step (cross-attention k/v read the
        text context): maxima, histogram counts and token counts equal those of the
        repeated feeds exactly; the Hessian is one weighted GEMM (the repeated sum up to
        fp32 summation order, equal bit for bit where the sums are exact); each bin's
        reservoir samples the distinct tokens once and counts every copy.
        """
        weights = {int(b): int(w) for b, w in bin_weights.items() if w}
        for b, w in weights.items():
            if not 0 <= b < self.num_bins:
                raise ValueError(f"layer {self.name!r}: bin {b} outside [0, {self.num_bins})")
            _check_weight(w)
        if not weights:
            return
        total = sum(weights.values())
        x = _flat(x, self.k, self.name, "activation batch")
        self.absmax.update(x)
        if self.hist is not None:
            self.hist.update(x, weight=total)
        self.hessian.update(x, weight=total)
        for b, w in sorted(weights.items()):
            self.reservoirs[b].update(x, weight=w)

    def merge(self, other: "LayerStatsAccumulator") -> "LayerStatsAccumulator":
        self.absmax.merge(other.absmax)
        if self.hist is not None and other.hist is not None:
            self.hist.merge(other.hist)
        self.hessian.merge(other.hessian)
        for a, b in zip(self.reservoirs, other.reservoirs):
            a.merge(b)
        return self

    def finalize(self) -> LayerStats:
        """The :class:`LayerStats` seen so far (bins with no tokens are left out)."""
        return LayerStats(
            act_absmax=self.absmax.value.clone(),
            act_quantile=self.hist.quantile(self.quantile) if self.hist is not None else None,
            hessian=self.hessian.hessian.clone(),
            n_tokens=self.hessian.n_tokens,
            reservoirs={b: r.tokens.clone() for b, r in enumerate(self.reservoirs) if len(r.tokens)},
            reservoir_seen={b: r.n_seen for b, r in enumerate(self.reservoirs) if len(r.tokens)},
        )
