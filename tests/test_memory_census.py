"""Byte accounting (``wanquant.runtime.memory.device_census``) against brute-force sums, and
policy switches that leave nothing of the previous arrangement behind (CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SETTINGS
from torch import nn

from wanquant.model import offload as mo
from wanquant.runtime.memory import (
    device_census,
    held_tensors,
    owned_storages,
    storage_key,
)
from wanquant.runtime.offload import ALIGN, move_to


class Prepared:
    """Stands for a prepared kernel: operands kept outside the module's buffers."""

    def __init__(self, a, b):
        self.a, self.b = a, b


class Holder(nn.Module):
    def __init__(self, g: torch.Generator):
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.register_buffer("table", torch.randn(5, 7, generator=g))
        self.prepared = Prepared(torch.randn(33, generator=g), self.table)  # one new, one a buffer
        self.cache = {"ctx": (torch.randn(4, 3, generator=g), {"layer": ((4, 3), torch.randn(9, generator=g))})}


def _brute(tensors) -> int:
    """Bytes of the distinct storages among ``tensors`` (by data pointer), summed by hand."""
    sizes = {}
    for t in tensors:
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(sizes.values())


def test_census_counts_each_storage_once_against_a_brute_force_sum(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = Holder(g), Holder(g)
    b.lin.weight = a.lin.weight  # tied across components: counted for the first only
    flat = torch.randn(100, generator=g)
    a.register_buffer("view", flat[10:30])  # a view keeps its whole buffer: counted whole
    extra = [torch.randn(11, generator=g), flat]  # flat already counted through the view
    c = device_census({"a": a, "b": b}, {"extra": extra})
    params_a = [*a.parameters(), *a.buffers()]
    held_a = [a.prepared.a, a.cache["ctx"][0], a.cache["ctx"][1]["layer"][1]]
    assert c["components"]["a"]["params"]["cpu"] == _brute(params_a)
    assert c["components"]["a"]["held"]["cpu"] == _brute(held_a)  # prepared.b is a buffer: not again
    params_b = [b.lin.bias, b.table]
    assert c["components"]["b"]["params"]["cpu"] == _brute(params_b)
    assert c["components"]["extra"]["held"]["cpu"] == extra[0].numel() * 4
    everything = params_a + held_a + params_b + [b.prepared.a, b.cache["ctx"][0], b.cache["ctx"][1]["layer"][1]]
    assert c["total"]["cpu"] == _brute(everything + extra)
    assert flat.untyped_storage().nbytes() == 400 and c["components"]["a"]["params"]["cpu"] >= 400
    keys = owned_storages({"a": a, "b": b})
    assert {storage_key(t) for t in everything} == keys
    # submodules are reached through modules(), not through attributes: no double walk
    assert len(held_tensors(nn.Sequential(a))) == len(held_tensors(a))


def test_move_to_leaves_host_resident_buffers_in_host_memory():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.ones(4))
            self.register_buffer("l1", torch.arange(3.0))

        def host_resident_buffers(self, device):
            return ("l1",) if torch.device(device).type == "meta" else ()

    m = nn.Sequential(Layer())
    l1 = m[0].l1
    move_to(m, "meta")  # a device that holds no data stands for the accelerator
    assert m[0].w.device.type == "meta" and m[0].l1 is l1 and l1.device.type == "cpu"


@pytest.fixture(scope="module")
def pipe(tiny_quantized_pipe):
    return tiny_quantized_pipe


def _apply(pipe, memory, kept=None):
    s = TINY_SETTINGS
    plan = mo.plan_for(pipe, memory, "cpu", s.height, s.width, s.num_frames)
    plan.kept_blocks = kept if memory == "low" else None
    return mo.apply_memory_policy(pipe, plan)


def _expert_storages(pipe) -> set[int]:
    return {t.untyped_storage().data_ptr() for e in (pipe.transformer, pipe.transformer_2)
            for t in (*e.parameters(), *e.buffers())}


def test_policy_switches_leave_no_old_buffer_alive(pipe):
    """low -> low (other blocks kept) -> resident -> low: after each switch the experts'
    tensors live only in the current groups' buffers (or, for a kept fast-path layer's
    L1/L2, in their own storage), every old group is gone, and nothing is resident."""
    import gc
    import weakref

    previous = []
    for memory, kept in (("low", None), ("low", 1), ("resident", None), ("low", 0)):
        state = groups = g = None  # this test's own references to the old groups
        _apply(pipe, memory, kept)
        gc.collect()
        assert all(ref() is None for ref in previous)  # the old groups (and their buffers) were freed
        state = mo.memory_state_of(pipe)
        groups = [g for seq in (*state.experts.values(), *state.per_forward.values()) for g in seq.groups]
        previous = [weakref.ref(g) for g in groups]
        if memory != "low":
            continue
        assert not any(g.resident for g in groups)
        buffers = {g.host.untyped_storage().data_ptr() for g in groups}
        lowrank = {m.l1.untyped_storage().data_ptr() for e in (pipe.transformer, pipe.transformer_2)
                   for m in mo.quantized_layers(e).values()}
        assert _expert_storages(pipe) <= buffers | lowrank
        # the plan's byte model against a brute-force sum over each block's tensors (no fast
        # path on a CPU: no repacked operands), and the groups built (aligned offsets)
        fp = mo.measure_footprint(pipe, "cpu")
        sums = [sum(t.numel() * t.element_size() for t in {id(t): t for t in (*b.parameters(), *b.buffers())}.values())
                for b in mo.blocks_of(pipe.transformer)]
        assert fp.blocks == len(sums) and fp.block == max(sums)
        for g, n in zip(state.experts["transformer"].groups[1:], sums):
            assert n <= g.nbytes < n + ALIGN * len(g.entries)
