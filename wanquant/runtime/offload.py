"""Moving modules' tensors between a pinned host copy and an accelerator, ahead of use.

Model-independent mechanics (which modules form a group and when a group moves is the
model adapter's business: :mod:`wanquant.model.offload`):

* :class:`TensorGroup`: the parameters and buffers of some modules packed at aligned
  offsets in ONE flat host buffer, pinned once (exact size, ``cudaHostRegister``) and
  kept for the group's life. On the device the group is one flat buffer too, so a move
  in is one copy and a move out is free: the host copy stays authoritative (inference
  never writes weights), so evicting only points the modules back at their host views
  and drops the device buffer. Same-shaped groups (blocks of two experts) get the same
  buffer size, which the caching allocator hands back without new allocations.
* :class:`Transfer`: host-to-device copies on a side CUDA stream, ``non_blocking`` from
  pinned memory, each ending in an event that the compute stream waits on only right
  before the group is used; on other devices a plain copy.
* :class:`GroupSequence`: groups used in a known order (blocks of a transformer):
  forward pre-hooks wait for group ``i`` and start copying ``i + 1``, so the copy of
  the next block overlaps the compute of this one; ``keep=False`` evicts each group
  right after its forward (a layer-streamed text encoder).
* :func:`run_on_host`: a module that stays in host memory and runs there (an embedding
  table looked up for a few hundred tokens), its inputs moved in, its output out.
* :func:`file_ranges` / :func:`release_file_pages`: weights a loader memory-mapped from
  their file (transformers maps safetensors files) count in the process's resident set
  once read, for as long as any tensor keeps the map open (an embedding table left in
  host memory does). A group built from such tensors reads every page while copying: it
  hands the pages it copied back to the kernel (``MADV_PAGEOUT``), so the resident set
  holds the group's copy only, and the rest of the map only where it is read.

Device memory of a group is allocated on the compute stream (the current stream when
it is moved in), so memory just freed by an evicted group is reused right away; the
side stream first waits for the compute stream's queued work, which may still read the
recycled memory. An evicted group whose copy was never waited on is waited on first.

Modules may take part through two optional methods (duck-typed, e.g.
:class:`~wanquant.runtime.linear.W4A4Linear`):

* ``host_resident_buffers(device) -> tuple[str, ...]``: buffers that stay in host
  memory when the module runs on ``device`` (they are left out of the group);
* ``release_device_state()``: drop what was derived from the tensors on their device
  (repacked kernel operands, caches); called before a group's tensors move.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Offsets inside a flat buffer: every dtype's alignment, and what GEMM kernels like.
ALIGN = 256


# ---------------------------------------------------------------------------------------
# pinned host memory of an exact size
def _register_pinned(t: torch.Tensor) -> bool:
    """Page-lock ``t``'s memory in place (exact size; ``Tensor.pin_memory`` rounds every
    allocation up to a power of two, up to 2x the host memory). False if CUDA refuses."""
    try:
        # flags 1 = cudaHostRegisterPortable (pinned for every CUDA context)
        err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 1))
    except (AttributeError, RuntimeError) as e:  # no cudart binding in this build
        log.debug("cudaHostRegister unavailable: %s", e)
        return False
    return err == 0


def _unregister_pinned(t: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
    except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may be gone already
        pass


def host_buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """A flat uint8 host buffer of ``nbytes``, page-locked when ``pin`` (and CUDA allows);
    returns it and whether it was registered in place (the owner must unregister it)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if not (pin and nbytes):
        return buf, False
    if _register_pinned(buf):
        return buf, True
    log.warning("could not page-lock %.2f GB of host memory in place; using pin_memory() "
                "(rounds up to a power of two)", nbytes / 1e9)
    return buf.pin_memory(), False


# ---------------------------------------------------------------------------------------
# host memory that a file backs
MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (clean file pages are dropped, data stays in the file)
PAGE = 4096


def file_ranges() -> list[tuple[int, int]]:
    """Sorted ``(start, end)`` addresses of this process's file-backed memory maps
    (``/proc/self/maps``; empty where there is none)."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            lo, hi = fields[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return sorted(out)


def in_file(t: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether host tensor ``t``'s storage lies in one of ``ranges`` (:func:`file_ranges`)."""
    if t.device.type != "cpu" or not ranges:
        return False
    ptr = t.untyped_storage().data_ptr()
    i = bisect.bisect_right(ranges, (ptr, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= ptr < ranges[i][1]


def release_file_pages(t: torch.Tensor) -> int:
    """Ask the kernel to take back the whole pages inside ``t``'s bytes (a tensor in a
    file-backed map that has just been copied elsewhere). ``MADV_PAGEOUT`` only reclaims:
    the bytes stay readable (from the file) and nothing is lost, so a page shared with a
    neighbour is safe too; pages at the edges are left alone anyway. Returns the bytes
    asked for (0 where the kernel refuses: before Linux 5.4, or another OS)."""
    start = -(-t.data_ptr() // PAGE) * PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // PAGE * PAGE
    if end <= start:
        return 0
    try:
        ok = _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT) == 0
    except (OSError, AttributeError):
        return 0
    return end - start if ok else 0


# ---------------------------------------------------------------------------------------
# a group of tensors
@dataclass(frozen=True)
class Slot:
    """Where a tensor lives: ``module._parameters[name]`` or ``module._buffers[name]``."""

    module: nn.Module
    name: str
    is_param: bool

    def get(self) -> torch.Tensor:
        return (self.module._parameters if self.is_param else self.module._buffers)[self.name]

    def set(self, t: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name].data = t  # the Parameter object (and ties) stay
        else:
            self.module._buffers[self.name] = t


def module_slots(modules: Iterable[nn.Module], device: torch.device | str,
                 exclude: Iterable[nn.Module] = ()) -> list[Slot]:
    """Every parameter and buffer of ``modules`` and their submodules, except inside
    ``exclude`` and except the buffers a module keeps in host memory on ``device``."""
    device = torch.device(device)
    skip = {id(m) for e in exclude for m in e.modules()}
    slots, seen = [], set()
    for root in modules:
        for m in root.modules():
            if id(m) in skip or id(m) in seen:
                continue
            seen.add(id(m))
            host_only = set(m.host_resident_buffers(device)) if hasattr(m, "host_resident_buffers") else set()
            slots += [Slot(m, n, True) for n, p in m._parameters.items() if p is not None]
            slots += [Slot(m, n, False) for n, b in m._buffers.items() if b is not None and n not in host_only]
    return slots


@dataclass
class _Entry:
    """One distinct tensor of a group (several slots share it when weights are tied)."""

    slots: list[Slot]
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _release_device_state(modules: Iterable[nn.Module]) -> None:
    for m in modules:
        release = getattr(m, "release_device_state", None)
        if release is not None:
            release()


class TensorGroup:
    """Tensors that move together, with their one flat host copy and, when resident, one
    flat device buffer. Building the group moves the tensors into the host copy (from
    wherever they are) and leaves the group evicted."""

    def __init__(self, name: str, slots: Sequence[Slot], device: torch.device | str, pin: bool | None = None):
        self.name = name
        self.device = torch.device(device)
        self.entries = self._layout(slots)
        self.nbytes = self.entries[-1].offset + self.entries[-1].nbytes if self.entries else 0
        pin = self.device.type == "cuda" if pin is None else pin
        self.modules = list({id(s.module): s.module for e in self.entries for s in e.slots}.values())
        self.host, registered = host_buffer(self.nbytes, pin)
        if registered:
            # The finalizer holds the buffer: unregistered before its memory can be freed.
            # Module views that outlive the group keep valid (then unpinned) memory.
            weakref.finalize(self, _unregister_pinned, self.host)
        _release_device_state(self.modules)
        from_host = any(e.slots[0].get().device.type == "cpu" for e in self.entries)
        files = file_ranges() if from_host else []
        self.pages_released = 0  # bytes of file-backed sources handed back (see release_file_pages)
        for e, view in zip(self.entries, self._views(self.host)):
            src = e.slots[0].get().detach()
            view.copy_(src.reshape(e.shape))
            if in_file(src, files):
                self.pages_released += release_file_pages(src)
            for s in e.slots:
                s.set(view)
            del src
        if from_host:
            # The sources are freed; mid-sized ones stay in the heap until trimmed: building
            # every group first and trimming after would hold a model's worth twice meanwhile.
            trim_host_heap()
        self.device_buffer: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None  # the copy in, until the compute stream waited

    @staticmethod
    def _layout(slots: Sequence[Slot]) -> list[_Entry]:
        by_tensor: dict[int, _Entry] = {}
        offset = 0
        for s in slots:
            t = s.get()
            entry = by_tensor.get(id(t))
            if entry is None:
                nbytes = t.numel() * t.element_size()
                entry = by_tensor[id(t)] = _Entry([], offset, nbytes, t.dtype, t.shape)
                offset = _align(offset + nbytes)
            entry.slots.append(s)
        return list(by_tensor.values())

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]

    def _point_at(self, flat: torch.Tensor) -> None:
        for e, view in zip(self.entries, self._views(flat)):
            for s in e.slots:
                s.set(view)

    # -- state -----------------------------------------------------------------------
    @property
    def resident(self) -> bool:
        return self.device_buffer is not None

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lies in the group's device buffer (what a resident group's modules use)."""
        buf = self.device_buffer
        if buf is None or t.device != buf.device:
            return False
        start = buf.data_ptr()
        return start <= t.data_ptr() < start + max(1, buf.numel())

    def tensors(self) -> list[torch.Tensor]:
        return [e.slots[0].get() for e in self.entries]

    # -- moves -------------------------------------------------------------------------
    def onload(self, transfer: Transfer) -> None:
        """Start moving the group in (no-op if resident); :meth:`wait` before using it."""
        if self.resident:
            return
        _release_device_state(self.modules)
        buf = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)  # on the compute stream
        self.ready = transfer.copy_in(buf, self.host)
        self.device_buffer = buf
        self._point_at(buf)

    def wait(self) -> None:
        """Make the compute stream wait for the copy in (once)."""
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None

    def evict(self) -> None:
        """Point the modules back at the host copy and drop the device buffer (no copy out)."""
        if not self.resident:
            return
        self.wait()  # an unused prefetch may still be writing the memory about to be recycled
        _release_device_state(self.modules)
        self._point_at(self.host)
        self.device_buffer = None

    def __repr__(self) -> str:
        where = f"resident on {self.device}" if self.resident else "in host memory"
        return f"TensorGroup({self.name}, {self.nbytes / 1e9:.3f} GB, {len(self.entries)} tensors, {where})"


class Transfer:
    """Host-to-device copies on a side stream (CUDA) so that they overlap compute."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> torch.cuda.Event | None:
        """Copy ``src`` (host) into ``dst``; returns the event the compute stream must wait on
        (None: the copy is done)."""
        if self.stream is None:
            dst.copy_(src)
            return None
        # dst may be memory the compute stream freed with reads still queued: wait for them.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done


class GroupSequence:
    """Groups used in order, moved in one step ahead of use by forward hooks.

    ``keep=True``: a group stays resident once moved in (until :meth:`evict`); a forward
    after the first finds everything resident and the hooks cost a flag check.
    ``keep=False``: each group is evicted right after its module's forward. A sequence of
    flags, one per group, mixes both: kept groups stay, the others stream through the
    device at every use (what a budget too small for the whole sequence does).
    """

    def __init__(self, name: str, groups: Sequence[TensorGroup], transfer: Transfer,
                 keep: bool | Sequence[bool] = True, lookahead: int = 1):
        self.name = name
        self.groups = list(groups)
        self.transfer = transfer
        self.keep = [bool(keep)] * len(self.groups) if isinstance(keep, bool) else [bool(k) for k in keep]
        if len(self.keep) != len(self.groups):
            raise ValueError(f"{name}: {len(self.keep)} keep flags for {len(self.groups)} groups")
        self.lookahead = max(0, int(lookahead))

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    @property
    def kept_nbytes(self) -> int:
        return sum(g.nbytes for g, k in zip(self.groups, self.keep) if k)

    @property
    def resident(self) -> bool:
        return all(g.resident for g in self.groups)

    def any_resident(self) -> bool:
        return any(g.resident for g in self.groups)

    def start(self, count: int | None = None) -> None:
        """Start moving in the first ``count`` groups (default: the lookahead + 1)."""
        for g in self.groups[: (self.lookahead + 1) if count is None else count]:
            g.onload(self.transfer)

    def before(self, i: int) -> None:
        """Group ``i`` is about to be used: have it, and start copying the next ones."""
        g = self.groups[i]
        g.onload(self.transfer)
        for nxt in self.groups[i + 1:i + 1 + self.lookahead]:
            nxt.onload(self.transfer)
        g.wait()

    def after(self, i: int) -> None:
        if not self.keep[i]:
            self.groups[i].evict()

    def evict(self) -> None:
        for g in self.groups:
            g.evict()

    def hook(self, modules: Sequence[nn.Module]) -> list:
        """Forward hooks on ``modules[i]`` (the module that uses group ``i``); returns handles."""
        if len(modules) != len(self.groups):
            raise ValueError(f"{self.name}: {len(modules)} modules for {len(self.groups)} groups")
        handles = []
        for i, m in enumerate(modules):
            handles.append(m.register_forward_pre_hook(_call_with_index(self.before, i)))
            if not self.keep[i]:
                handles.append(m.register_forward_hook(_call_with_index(self.after, i, post=True)))
        return handles

    def __repr__(self) -> str:
        n = sum(g.resident for g in self.groups)
        return f"GroupSequence({self.name}, {len(self.groups)} groups, {self.nbytes / 1e9:.2f} GB, {n} resident)"


def _call_with_index(fn: Callable[[int], None], i: int, post: bool = False):
    if post:
        def post_hook(module, args, output):
            fn(i)
        return post_hook

    def pre_hook(module, args):
        fn(i)
    return pre_hook


def move_to(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module.to(device)``, except the buffers a submodule keeps in host memory on
    ``device`` (``host_resident_buffers``): those are not copied there and back."""
    device = torch.device(device)
    held = []
    for m in module.modules():
        names = m.host_resident_buffers(device) if hasattr(m, "host_resident_buffers") else ()
        for n in names:
            b = m._buffers.get(n)
            if b is not None:
                held.append((m, n, b.cpu()))
                m._buffers[n] = None
    module.to(device)
    for m, n, b in held:
        m._buffers[n] = b
    return module


# ---------------------------------------------------------------------------------------
# a module that runs in host memory
def _to(x, device: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def run_on_host(module: nn.Module, device: torch.device | str) -> list:
    """Keep ``module`` in host memory and run it there: inputs are moved to the host, the
    output to ``device``. For modules that touch a small part of large weights (an
    embedding table read for a few hundred tokens). Returns the hook handles."""
    device = torch.device(device)
    module.to("cpu")

    def inputs_to_host(mod, args):
        return _to(args, torch.device("cpu"))

    def output_to_device(mod, args, output):
        return _to(output, device)

    return [module.register_forward_pre_hook(inputs_to_host), module.register_forward_hook(output_to_device)]


def trim_host_heap() -> None:
    """Give freed host memory back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    Tensors copied into a group's host buffer are freed, but glibc keeps freed heap pages
    of mid-sized allocations (a few MB, below its mmap threshold) mapped: without this the
    process's resident memory would count a model's worth of memory it no longer uses.
    """
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)


def sync_device(device: torch.device | str) -> None:
    """Wait for ``device``'s queued work (no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["TensorGroup", "Transfer", "GroupSequence", "Slot", "module_slots", "move_to", "run_on_host",
           "host_buffer", "sync_device", "trim_host_heap", "file_ranges", "in_file", "release_file_pages", "ALIGN"]
