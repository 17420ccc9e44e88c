"""Streaming, mergeable calibration statistics of a linear layer's input.

Every accumulator takes batches ``[..., K]`` (any leading shape) and can be merged with
another of its kind (sums across processes or calibration shards). Whole activations
are never kept: only maxima, a histogram, a Hessian and a bounded token reservoir.

Collection never waits for the device (a calibration forward feeds seven inputs per block
through here): maxima, histogram counts and Hessians stay on the batches' device, and a
reservoir draws its keys on the host, so the host alone decides which tokens enter it;
only those are gathered on the device and copied out asynchronously. Results reach the
host when read (finalize, merge). NaN or Inf in a CPU batch is refused at once; on a GPU
that check would wait for the device, so there the maxima carry them (max propagates NaN
and Inf) and :meth:`AbsMax.host` refuses them when the statistics are read.

The Hessian ``X^T X`` is symmetric: :class:`HessianAccumulator` forms and stores only its
upper strips (``strip`` rows each, from the diagonal on): about half the memory and half
the GEMM work of the full matrix (29 GB instead of 52 GB for one A14B expert).

Part of ``numerics`` (formats -> numerics -> method -> kernels/runtime): plain tensors,
no configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

HESSIAN_STRIP = 1024  # rows per stored strip of a Hessian: large GEMMs, ~55 % of the full matrix at K = 5120


def _check_weight(weight: int) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ValueError(f"a batch's repeat weight must be a whole number >= 1, got {weight!r}")
    return weight


_FP32_OUT_GEMM: dict[str, tuple[str, bool] | None] = {}


def fp32_out_gemm(device: torch.device) -> tuple[str, bool] | None:
    """How this device forms a 16-bit GEMM with fp32 output, if it can: ``(mode, contiguous)``
    with mode ``"addmm"`` (accumulating in place) or ``"mm"`` (a product, then an addition),
    and whether column slices must be copied first; None: it cannot.

    CUDA on torch >= 2.8 has ``out_dtype`` on ``mm``/``addmm``; the CPU does not (and its bf16
    GEMM would be slower than fp32 anyway). Probed once per device type on a tiny problem
    whose result is exact (column slices, as the strips read them), checked against fp32.
    """
    key = torch.device(device).type
    if key not in _FP32_OUT_GEMM:
        _FP32_OUT_GEMM[key] = None
        if key == "cuda":
            x = (torch.arange(48, device=device, dtype=torch.float32).reshape(12, 4) / 8).bfloat16()
            ref = 1 + 3 * (x.float()[:, :2].T @ x.float()[:, 1:])
            for how in (("addmm", False), ("mm", False), ("addmm", True), ("mm", True)):
                h = torch.ones(2, 3, device=device)
                try:
                    _gemm16(how, h, x[:, :2], x[:, 1:], 3)
                except (RuntimeError, TypeError):
                    continue
                if torch.equal(h, ref):
                    _FP32_OUT_GEMM[key] = how
                    break
    return _FP32_OUT_GEMM[key]


def fp32_out_gemm_available(device: torch.device) -> bool:
    return fp32_out_gemm(device) is not None


def _gemm16(how: tuple[str, bool], h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: int) -> None:
    """``h += weight * a^T b`` with 16-bit ``a``, ``b`` and fp32 ``h``."""
    mode, contiguous = how
    if contiguous:
        a, b = a.contiguous(), b.contiguous()
    if mode == "addmm":
        torch.addmm(h, a.T, b, alpha=weight, out_dtype=torch.float32, out=h)
    else:
        h.add_(torch.mm(a.T, b, out_dtype=torch.float32), alpha=weight)


# ---------------------------------------------------------------------------------------
# symmetric matrices stored as upper strips


def strip_rows(k: int, strip: int | None) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` of the strips of a symmetric ``[k, k]`` matrix; strip ``[r0, r1)``
    holds those rows from column ``r0`` on. ``strip`` None (or >= k): one strip, the whole matrix."""
    s = k if not strip or strip >= k else int(strip)
    return [(r, min(r + s, k)) for r in range(0, k, s)]


def packed_numel(k: int, strip: int | None) -> int:
    """Elements of the packed strips: ``(k^2 + sum of strip heights^2) / 2``."""
    return sum((r1 - r0) * (k - r0) for r0, r1 in strip_rows(k, strip))


def strip_views(packed: torch.Tensor, k: int, strip: int | None) -> list[tuple[int, int, torch.Tensor]]:
    """``(r0, r1, view [r1 - r0, k - r0])`` of each strip inside the flat ``packed`` buffer."""
    out, off = [], 0
    for r0, r1 in strip_rows(k, strip):
        n = (r1 - r0) * (k - r0)
        out.append((r0, r1, packed[off:off + n].view(r1 - r0, k - r0)))
        off += n
    return out


def unpack_symmetric(packed: torch.Tensor, k: int, strip: int | None) -> torch.Tensor:
    """The full ``[k, k]`` matrix: the strips' upper triangle, mirrored (exactly symmetric)."""
    h = packed.new_zeros(k, k)
    for r0, r1, v in strip_views(packed, k, strip):
        h[r0:r1, r0:] = v
    h.triu_()
    return h.add_(h.T.tril(-1))  # tril(-1) of the transpose is a new tensor: no aliasing


def accumulate_gram(h: torch.Tensor, x: torch.Tensor, weight: int = 1, fast: bool = True,
                    strip: int | None = None) -> str:
    """``h += weight * x^T x`` for ``x`` ``[T, K]``; returns the path taken.

    ``h``: the full ``[K, K]`` matrix (``strip`` None), or the flat packed upper strips of
    ``strip`` rows (:func:`strip_views`), of which only the strips are formed.
    ``"bf16_gemm"``: 16-bit ``x`` with an fp32 ``h`` on a device with an fp32-output 16-bit
    GEMM (:func:`fp32_out_gemm`). Products of two bf16 (or fp16) numbers are exact in fp32
    and the GEMM accumulates in fp32, so this differs from the fp32 GEMM of the upcast
    input only in the order of the additions, at a fraction of its cost on Hopper.
    ``"fp32"``: ``x`` upcast to ``h``'s dtype (TF32 as the backend flags say: off by default).
    ``h`` may live on another device than ``x`` (statistics spilled to host memory): the
    product is formed on ``x``'s device and added where ``h`` is (synchronously).
    """
    weight = _check_weight(weight)
    if x.device != h.device:
        g = torch.zeros(h.shape, dtype=h.dtype, device=x.device)
        path = accumulate_gram(g, x, weight, fast, strip)
        h.add_(g.to(h.device))
        return path + "+spill"
    k = x.shape[1]
    if strip is None and tuple(h.shape) != (k, k):
        raise ValueError(f"a full Hessian must be [{k}, {k}], got {tuple(h.shape)}; pass strip= for a packed one")
    views = [(0, k, h)] if strip is None else strip_views(h, k, strip)
    how = fp32_out_gemm(x.device) if fast and h.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16) \
        else None
    if how is None:
        x = x.to(h.dtype)  # once, not per strip
    for r0, r1, v in views:
        a, b = x[:, r0:r1], x[:, r0:]
        if how is not None:
            _gemm16(how, v, a, b, weight)
        else:
            v.addmm_(a.T, b, alpha=weight)
    if how is None:
        return "fp32"
    return ("bf16_gemm" if how[0] == "addmm" else "bf16_gemm_mm") + ("_copied" if how[1] else "")


def _flat(x: torch.Tensor, k: int, name: str, what: str) -> torch.Tensor:
    """``x`` as ``[T, K]``; clear errors for a wrong width or dtype, and for non-finite values
    of a CPU batch (on a GPU the check would wait for the device: see :meth:`AbsMax.host`)."""
    who = f"layer {name!r}: " if name else ""
    if not x.is_floating_point():
        raise TypeError(f"{who}{what} must be floating point, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != k:
        raise ValueError(f"{who}{what} has last dimension {tuple(x.shape)[-1:]}, expected {k}")
    if x.device.type == "cpu" and not torch.isfinite(x).all():
        raise ValueError(_nonfinite(name, what))
    return x.reshape(-1, k)


def _nonfinite(name: str, what: str = "activation batch") -> str:
    who = f"layer {name!r}: " if name else ""
    return f"{who}{what} contains NaN or Inf; the calibration activations are broken"


# ---------------------------------------------------------------------------------------
# accumulators


class AbsMax:
    """Per-channel maximum of ``|x|``, kept on the batches' device (:meth:`host` reads it)."""

    def __init__(self, k: int, name: str = "") -> None:
        self.k, self.name = k, name
        self.value = torch.zeros(k, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> None:
        self._add(_flat(x, self.k, self.name, "activation batch"))

    def _add(self, x: torch.Tensor) -> None:
        if x.shape[0]:
            lo, hi = torch.aminmax(x, dim=0)  # one pass, no |x| temporary; NaN propagates
            self.value = torch.maximum(self.value.to(x.device), torch.maximum(hi, -lo).float())

    def host(self) -> torch.Tensor:
        """The maxima on the host; refuses NaN or Inf seen in any batch (GPU batches are not
        checked one by one)."""
        v = self.value.float().cpu().clone()
        if not torch.isfinite(v).all():
            raise ValueError(_nonfinite(self.name))
        return v

    def merge(self, other: "AbsMax") -> "AbsMax":
        self.value = torch.maximum(self.value, other.value.to(self.value.device))
        return self


class LogHistogram:
    """Per-channel histogram of ``log2|x|`` for a high percentile of ``|x|``.

    Bins are ``bins_per_octave`` per power of two over ``[2^min_exp, 2^max_exp)``; bin 0
    holds zeros and anything smaller, the last bin anything larger. Counts add exactly,
    so merging is exact. :meth:`quantile` returns the upper edge of the bin holding the
    requested order statistic, capped by the exact channel maximum: the estimate is
    never below the true percentile and at most ``2^(1/bins_per_octave)`` above it
    (9 % for the default 8) for values inside the range. Memory: ``K x bins`` int64 on
    the batches' device (57 MB at K = 13824).
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
        self.amax._add(x)
        self._count(x, weight, chunk)

    def _count(self, x: torch.Tensor, weight: int, chunk: int = 4096) -> None:
        self.counts = self.counts.to(x.device)
        offs = torch.arange(self.k, device=x.device) * self.nbins
        for i in range(0, x.shape[0], chunk):  # chunks bound the int64 index temporaries
            a = x[i : i + chunk].abs().float()
            b = torch.floor((torch.log2(a) - self.min_exp) * self.bpo) + 1  # log2(0) = -inf
            b = b.clamp(0, self.nbins - 1).long()
            counts = torch.bincount((b + offs).flatten(), minlength=self.k * self.nbins).view(self.k, -1)
            self.counts += counts * weight if weight != 1 else counts

    def merge(self, other: "LogHistogram") -> "LogHistogram":
        if (other.bpo, other.min_exp, other.max_exp, other.k) != (self.bpo, self.min_exp, self.max_exp, self.k):
            raise ValueError("cannot merge histograms with different binning")
        self.counts = self.counts + other.counts.to(self.counts.device)  # counts grown in inference mode: not in place
        self.amax.merge(other.amax)
        return self

    def quantile(self, q: float) -> torch.Tensor:
        """Estimated per-channel ``q``-quantile of ``|x|`` (fp32 [K], host); q=1 gives the max."""
        if not 0.0 < q <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {q}")
        amax, counts = self.amax.host(), self.counts.cpu()
        n = counts.sum(1)
        if q == 1.0 or int(n.max()) == 0:
            return amax
        rank = torch.ceil(q * n.double()).clamp(min=1).long()  # 1-based order statistic
        j = (counts.cumsum(1) < rank[:, None]).sum(1)  # first bin reaching the rank
        edge = torch.exp2(self.min_exp + j.double() / self.bpo).float()
        return torch.minimum(edge, amax)


class HessianAccumulator:
    """The sum ``X^T X`` over all tokens (fp32, or fp64 for long runs) and the token count.

    Kept as a sum, not a mean, so that merging is a plain addition; GPTQ is invariant to
    the Hessian's overall scale, use :meth:`mean` where a normalised one is wanted.
    Stored as the flat ``packed`` upper strips of ``strip`` rows (:func:`strip_views`;
    ``strip`` None: one strip, the full matrix); :attr:`hessian` builds the full matrix.
    ``fast``: 16-bit batches on CUDA go through an fp32-output bf16 GEMM
    (:func:`accumulate_gram`); ``self.path`` records the path the last batch took.
    ``device`` may differ from the batches' (a Hessian spilled to host memory: each batch's
    strips are formed on the batch's device, copied out asynchronously and added on the
    host in batch order once they have arrived).
    """

    def __init__(self, k: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 name: str = "", fast: bool = True, strip: int | None = HESSIAN_STRIP) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"Hessian dtype must be float32 or float64, got {dtype}")
        self.k, self.name, self.fast = k, name, fast
        self.strip = k if not strip or strip >= k else int(strip)
        self.packed = torch.zeros(packed_numel(k, self.strip), dtype=dtype, device=device)
        self.n_tokens = 0
        self.path = ""
        self._pending: list[tuple[torch.Tensor, object]] = []  # spilled batches in flight: (host copy, event)

    def update(self, x: torch.Tensor, weight: int = 1) -> None:
        """``weight``: the batch stands for that many identical copies of itself."""
        self._add(_flat(x, self.k, self.name, "activation batch"), _check_weight(weight))

    def _add(self, x: torch.Tensor, weight: int) -> None:
        if x.device == self.packed.device or x.device.type != "cuda":
            self.path = accumulate_gram(self.packed, x, weight, self.fast, self.strip)
        else:  # spilled: formed here, added on the host when it has arrived
            g = torch.zeros(self.packed.shape, dtype=self.packed.dtype, device=x.device)
            self.path = accumulate_gram(g, x, weight, self.fast, self.strip) + "+spill"
            event = torch.cuda.Event()
            self._pending.append((g.to(self.packed.device, non_blocking=True), event))
            event.record(torch.cuda.current_stream(x.device))
            self._settle(wait=len(self._pending) > 2)  # bounds the pinned copies in flight
        self.n_tokens += x.shape[0] * weight

    def _settle(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][1].query()):
            host, event = self._pending.pop(0)
            event.synchronize()
            self.packed.add_(host)
            wait = wait and len(self._pending) > 2

    def _settled(self) -> torch.Tensor:
        while self._pending:
            self._settle(wait=True)
        return self.packed

    @property
    def hessian(self) -> torch.Tensor:
        """The full symmetric ``[K, K]`` sum (a new tensor, where the strips are)."""
        return unpack_symmetric(self._settled(), self.k, self.strip)

    def merge(self, other: "HessianAccumulator") -> "HessianAccumulator":
        if (other.k, other.strip) != (self.k, self.strip):
            raise ValueError(f"layer {self.name!r}: cannot merge Hessians stored as strips of {other.strip} and "
                             f"{self.strip} rows (K {other.k} and {self.k})")
        self._settled().add_(other._settled().to(self.packed.device, self.packed.dtype))
        self.n_tokens += other.n_tokens
        return self

    def mean(self) -> torch.Tensor:
        return self.hessian / max(self.n_tokens, 1)


def admission_threshold(capacity: int, stream: int, sigmas: float = 6.0) -> float:
    """A key bound that the ``capacity`` smallest of ``stream`` i.i.d. uniform keys stay below
    but for a ``sigmas``-sigma event: the keys below it number Binomial(stream, threshold),
    mean ``capacity + sigmas sqrt(capacity) + 32``, sd below ``sqrt`` of that."""
    if stream <= capacity:
        return 1.0
    return min(1.0, (capacity + sigmas * math.sqrt(capacity) + 32) / stream)


class TokenReservoir:
    """A uniform random sample of at most ``capacity`` tokens from a stream.

    Each token gets an i.i.d. uniform key and the reservoir keeps the ``capacity``
    smallest keys: every subset of that size is equally likely (reservoir sampling by
    random priorities). Because keys travel with the tokens, :meth:`merge` keeps the
    smallest keys of both and is exactly a uniform sample of the union, whatever the
    two streams' lengths. Deterministic given ``seed`` and the batches; give every
    process its own seed (merging two equal-seed streams would correlate their keys).

    Keys are drawn on the host, so the host decides which tokens enter without reading
    the batch: only those are gathered on the batch's device and copied to host memory
    (asynchronously from a CUDA batch, written into their slots when they have arrived).
    An entering token takes the slot of one that leaves, so :attr:`tokens` is in slot
    order (deterministic). Over a stream of equal batches about ``capacity * (1 + ln
    batches)`` tokens are copied in all (``n_copied``), not ``capacity`` per batch.
    Tokens are kept on the CPU in ``dtype`` (default: the first batch's dtype).

    A stream of known length (:meth:`expect_batches`) copies far fewer: only tokens whose
    key is below :func:`admission_threshold` of the whole stream can end among the
    ``capacity`` smallest (but for a 6-sigma miss), so only they are admitted, about
    ``capacity`` in all, spread over the stream instead of a full fill first. The final
    sample is the same set of tokens as without the plan.
    """

    def __init__(self, k: int, capacity: int, seed: int = 0, dtype: torch.dtype | None = None, name: str = "") -> None:
        if capacity < 0:
            raise ValueError(f"reservoir capacity must be >= 0, got {capacity}")
        self.k, self.capacity, self.seed, self.name = k, capacity, seed, name
        self.gen = torch.Generator().manual_seed(seed)
        self._keys = torch.zeros(0, dtype=torch.float64)  # one per slot, always current
        self._tokens = torch.zeros(0, k, dtype=dtype or torch.float32)  # slots; grown geometrically, rows >= len(keys)
        self.expected_batches: int | None = None
        self.threshold = 1.0  # keys at or above it are never admitted (set from the first batch of a planned stream)
        self._dtype_set = dtype is not None
        self._pending: list[tuple[torch.Tensor, torch.Tensor, object]] = []  # (slots, rows, event or None), in order
        self.n_seen = 0
        self.n_copied = 0

    @property
    def keys(self) -> torch.Tensor:
        return self._keys

    @property
    def tokens(self) -> torch.Tensor:
        self._settle(wait=True)
        return self._tokens[:len(self._keys)]

    def expect_batches(self, n: int) -> None:
        """The stream will be ``n`` batches of equal size: admit only what can end in the sample."""
        if n < 1:
            raise ValueError(f"layer {self.name!r}: expected batches must be >= 1, got {n}")
        if self.n_seen:
            raise RuntimeError(f"layer {self.name!r}: plan the stream before its first batch")
        self.expected_batches = n

    def load(self, keys: torch.Tensor, tokens: torch.Tensor, n_seen: int) -> None:
        """Take over another reservoir's state (slot order), e.g. one received from another process."""
        if len(keys) != len(tokens) or len(keys) > self.capacity:
            raise ValueError(f"layer {self.name!r}: {len(keys)} keys for {len(tokens)} tokens, "
                             f"capacity {self.capacity}")
        self._pending.clear()
        self._keys, self._tokens = keys.double().cpu().clone(), tokens.cpu().to(self._tokens.dtype).clone()
        self.n_seen = n_seen

    def update(self, x: torch.Tensor, weight: int = 1) -> None:
        """``weight``: the batch stands for that many identical copies; its distinct tokens
        are sampled once (a sample of the same distribution when every batch of a stream
        carries the same weight) and ``n_seen`` counts every copy."""
        self._add(_flat(x, self.k, self.name, "activation batch"), _check_weight(weight))

    def _add(self, x: torch.Tensor, weight: int) -> None:
        if not self._dtype_set:
            self._tokens, self._dtype_set = self._tokens.to(x.dtype), True
        keys = torch.rand(x.shape[0], generator=self.gen, dtype=torch.float64)
        if self.expected_batches is not None and not self.n_seen:
            self.threshold = admission_threshold(self.capacity, self.expected_batches * x.shape[0])
        self.n_seen += x.shape[0] * weight
        if self.threshold < 1.0:
            below = torch.nonzero(keys < self.threshold).flatten()
            slots, rows = self._admit(keys[below])
            rows = below[rows]
        else:
            slots, rows = self._admit(keys)
        if not len(rows):
            return
        self.n_copied += len(rows)
        if x.device.type == "cuda":
            idx = rows.pin_memory().to(x.device, non_blocking=True)
            event = torch.cuda.Event()
            self._pending.append((slots, x.index_select(0, idx).to("cpu", non_blocking=True), event))  # pinned
            event.record(torch.cuda.current_stream(x.device))
            self._settle(wait=False)
        else:
            self._pending.append((slots, x.index_select(0, rows.to(x.device)).cpu(), None))
            self._settle(wait=True)

    def _admit(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Host only: ``(slots, rows)``, the batch rows (keys ``keys``) that enter and the slots
        they take (free ones first, then those of evicted tokens, both ascending); updates the keys."""
        n, cap = len(self._keys), self.capacity
        if n + len(keys) <= cap:  # room for all
            self._keys = torch.cat([self._keys, keys])
            return torch.arange(n, n + len(keys)), torch.arange(len(keys))
        cand = torch.arange(len(keys))
        if n == cap:  # full: only keys below the current worst can enter
            cand = torch.nonzero(keys < self._keys.max()).flatten() if cap else cand[:0]
            if not len(cand):
                return cand, cand
        both = torch.cat([self._keys, keys[cand]])
        keep = torch.zeros(len(both), dtype=torch.bool)
        keep[torch.topk(both, cap, largest=False).indices] = True
        rows = cand[keep[n:]]
        slots = torch.cat([torch.arange(n, cap), torch.nonzero(~keep[:n]).flatten()])
        new = torch.cat([self._keys, self._keys.new_empty(cap - n)])
        new[slots] = keys[rows]
        self._keys = new
        return slots, rows

    def _settle(self, wait: bool) -> None:
        """Write the rows that have arrived into their slots, in order (``wait``: all)."""
        backlog = sum(len(s) for s, _, _ in self._pending)
        while self._pending:
            slots, rows, event = self._pending[0]
            if event is not None:
                if not (wait or backlog > self.capacity or event.query()):
                    break  # still in flight: written at a later update
                event.synchronize()
            if len(self._tokens) < len(self._keys) or self._tokens.is_inference():
                # Slots beyond the last written one are filled below; doubling keeps a stream
                # of small admissions from copying the buffer each time. The buffer outlives
                # the (inference-mode) forward that grows it: a normal tensor, writable afterwards.
                rows_now = max(len(self._keys), min(self.capacity, 2 * len(self._tokens)))
                with torch.inference_mode(False):
                    grown = self._tokens.new_empty(rows_now, self.k)
                    grown[:len(self._tokens)] = self._tokens
                    self._tokens = grown
            self._tokens[slots] = rows.to(self._tokens.dtype)
            backlog -= len(slots)
            self._pending.pop(0)

    def merge(self, other: "TokenReservoir") -> "TokenReservoir":
        if other.n_seen and self.n_seen and other.seed == self.seed:
            raise ValueError(f"layer {self.name!r}: merging reservoirs drawn with the same seed {self.seed}; "
                             "give every calibration process its own seed")
        tokens = other.tokens
        slots, rows = self._admit(other.keys)
        if len(rows):
            self._pending.append((slots, tokens.index_select(0, rows), None))
            self._settle(wait=True)
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
    per process when the results will be merged. ``hessian_strip``: rows per stored
    Hessian strip (:class:`HessianAccumulator`). Each batch is checked once and goes to
    every accumulator without waiting for the device.
    """

    def __init__(self, k: int, num_bins: int, reservoir_capacity: int = 4096, quantile: float | None = None,
                 hessian_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 seed: int = 0, name: str = "", fast_hessian: bool = True,
                 hessian_strip: int | None = HESSIAN_STRIP) -> None:
        self.k, self.num_bins, self.quantile, self.name = k, num_bins, quantile, name
        self.absmax = AbsMax(k, name)
        self.hist = LogHistogram(k, name=name) if quantile is not None else None
        if self.hist is not None:
            self.hist.amax = self.absmax  # the same maxima: computed once
        self.hessian = HessianAccumulator(k, hessian_dtype, device, name, fast=fast_hessian, strip=hessian_strip)
        self.reservoirs = [TokenReservoir(k, reservoir_capacity, seed + b, name=name) for b in range(num_bins)]

    def expect_batches(self, per_bin: dict[int, int]) -> None:
        """How many batches (forwards) each bin's stream will have: see :meth:`TokenReservoir.expect_batches`."""
        for b, n in per_bin.items():
            if not 0 <= b < self.num_bins:
                raise ValueError(f"layer {self.name!r}: bin {b} outside [0, {self.num_bins})")
            if n:
                self.reservoirs[b].expect_batches(n)

    def update(self, x: torch.Tensor, bin_index: int) -> None:
        if not 0 <= bin_index < self.num_bins:
            raise ValueError(f"layer {self.name!r}: bin {bin_index} outside [0, {self.num_bins})")
        x = _flat(x, self.k, self.name, "activation batch")
        self.absmax._add(x)
        if self.hist is not None:
            self.hist._count(x, 1)
        self.hessian._add(x, 1)
        self.reservoirs[bin_index]._add(x, 1)

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
        self.absmax._add(x)
        if self.hist is not None:
            self.hist._count(x, total)
        self.hessian._add(x, total)
        for b, w in sorted(weights.items()):
            self.reservoirs[b]._add(x, w)

    def merge(self, other: "LayerStatsAccumulator") -> "LayerStatsAccumulator":
        self.absmax.merge(other.absmax)
        if self.hist is not None and other.hist is not None:
            self.hist.merge(other.hist)
        self.hessian.merge(other.hessian)
        for a, b in zip(self.reservoirs, other.reservoirs):
            a.merge(b)
        return self

    def settle(self) -> None:
        """Wait for this input's copies in flight (reading the statistics does it anyway)."""
        self.hessian._settled()
        for r in self.reservoirs:
            r._settle(wait=True)

    def finalize(self) -> LayerStats:
        """The :class:`LayerStats` seen so far (bins with no tokens are left out); raises if
        any batch held NaN or Inf."""
        absmax = self.absmax.host()
        return LayerStats(
            act_absmax=absmax,
            act_quantile=self.hist.quantile(self.quantile) if self.hist is not None else None,
            hessian=self.hessian.hessian,
            n_tokens=self.hessian.n_tokens,
            reservoirs={b: r.tokens.clone() for b, r in enumerate(self.reservoirs) if len(r.keys)},
            reservoir_seen={b: r.n_seen for b, r in enumerate(self.reservoirs) if len(r.keys)},
        )
