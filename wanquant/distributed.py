"""This process's place in a ``torch.distributed`` job started by torchrun, and the
object collectives wanquant uses (agreement checks, errors that reach every rank).

    torchrun --nproc_per_node 2 -m wanquant.cli quantize ...   # calibration over GPUs
    torchrun --nproc_per_node 2 -m wanquant.cli generate ...   # context-parallel generation

Generic: no model and no calibration knowledge. :func:`init_distributed` returns ``None``
in a single process, so callers can write one code path.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_REBUILT = (FileExistsError, FileNotFoundError, ValueError, TypeError, KeyError, RuntimeError)


@dataclass
class DistContext:
    """This process's place in the default process group, and the collectives wanquant uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device  # where this rank's pipeline runs
    backend: str
    owns_group: bool = False  # created by init_distributed: close() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for collectives: the GPU for NCCL, the CPU for gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    @classmethod
    def current(cls, device: torch.device | str | None = None) -> "DistContext":
        """The context of an already initialised default group (tests, notebooks)."""
        if not (tdist.is_available() and tdist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised; call init_distributed() under torchrun")
        backend = str(tdist.get_backend()).lower()
        local = int(os.environ.get("LOCAL_RANK", tdist.get_rank()))
        if device is None:
            device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
        return cls(tdist.get_rank(), tdist.get_world_size(), local, torch.device(device), backend)

    # -- objects ---------------------------------------------------------------------
    def barrier(self) -> None:
        if self.backend == "nccl":
            tdist.barrier(device_ids=[self.device.index])
        else:
            tdist.barrier()

    def all_gather_object(self, obj: Any) -> list:
        out: list = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        tdist.broadcast_object_list(box, src=src, device=self.comm_device)
        return box[0]

    def send_object(self, obj: Any, dst: int) -> None:
        tdist.send_object_list([obj], dst=dst, device=self.comm_device)

    def recv_object(self, src: int) -> Any:
        box = [None]
        tdist.recv_object_list(box, src=src, device=self.comm_device)
        return box[0]

    # -- agreement and errors ----------------------------------------------------------
    def check_agree(self, what: str, value: Any) -> None:
        """Raise on every rank unless every rank has the same ``value``."""
        values = self.all_gather_object(value)
        if any(v != values[0] for v in values):
            raise ValueError(f"the ranks disagree on {what}: {values}; every rank must run the same command "
                             "with the same model and calibration samples")

    def on_main(self, fn: Callable, *args) -> Any:
        """``fn(*args)`` on rank 0; its result, or its error, reaches every rank."""
        result, err = None, None
        if self.is_main:
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the others
                err = e
        msg = self.broadcast_object((result, None if err is None else (type(err).__name__, str(err))))
        if err is not None:
            raise err
        if msg[1] is not None:
            raise _rebuild(*msg[1], 0)
        return msg[0]

    def guarded(self, fn: Callable, *args) -> Any:
        """``fn(*args)`` on every rank; if any rank fails, every rank raises (none waits forever)."""
        result, err = None, None
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001
            err = e
        errors = self.all_gather_object(None if err is None else (type(err).__name__, str(err)))
        if err is not None:
            raise err
        for r, e in enumerate(errors):
            if e is not None:
                raise _rebuild(*e, r)
        return result

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()


def _rebuild(name: str, message: str, rank: int) -> Exception:
    for cls in _REBUILT:
        if cls.__name__ == name:
            return cls(f"rank {rank}: {message}")
    return RuntimeError(f"rank {rank} failed with {name}: {message}")


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process job (torchrun sets these)."""
    return all(k in os.environ for k in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device: torch.device | str | None = None, timeout_s: float = 3600.0) -> DistContext | None:
    """Join the job torchrun started; ``None`` when this is a single process.

    ``device``: ``"cuda"`` (default when CUDA is available) puts this rank on
    ``cuda:LOCAL_RANK`` with NCCL; ``"cpu"`` runs on the CPU with gloo. A device index
    given by the user is ignored (each rank takes its local GPU). ``timeout_s`` bounds a
    collective waiting for a rank that died (torchrun also stops the others then).
    """
    if not launched_by_torchrun():
        return None
    rank, world, local = (int(os.environ[k]) for k in _ENV)
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local:
            raise RuntimeError(f"rank {rank} has LOCAL_RANK {local} but this node shows "
                               f"{torch.cuda.device_count()} CUDA device(s); start at most that many processes per node")
        dev, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(dev)
    elif kind == "cpu":
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"wanquant runs distributed on 'cuda' or 'cpu', not {kind!r}")
    owns = not tdist.is_initialized()
    if owns:
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    log.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistContext(rank, world, local, dev, backend, owns_group=owns)
