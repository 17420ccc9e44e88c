"""Host memory of the memory policies (CPU): weights a loader mapped from their file leave
the resident set once copied into a group, the host census sorts each part's bytes by kind,
and an arriving expert has its kept blocks in and their layers prepared before it computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SETTINGS, tiny_sample
from torch import nn

from wanquant.model import offload as mo
from wanquant.model.pipeline import run_pipeline
from wanquant.runtime.memory import host_census
from wanquant.runtime.offload import PAGE, TensorGroup, file_ranges, in_file, module_slots

MB = 1 << 20


def _mapped(path: Path, nbytes: int, seed: int) -> torch.Tensor:
    """A float32 tensor backed by a private (copy-on-write) map of ``path``, as transformers
    maps safetensors files: its pages enter the resident set when read."""
    g = np.random.default_rng(seed)
    g.standard_normal(nbytes // 4, dtype=np.float32).tofile(path)
    return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))


def _mapping_rss(path: Path) -> int:
    """Resident bytes of ``path``'s maps in this process (``/proc/self/smaps``), by hand."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_group_hands_back_the_file_pages_it_copied(tmp_path, seed):
    path = tmp_path / "weights.bin"
    m = nn.Module()
    m.register_buffer("w", _mapped(path, 16 * MB, seed))
    m.register_buffer("b", torch.randn(5))
    expected = m.w.clone()
    assert in_file(m.w, file_ranges()) and not in_file(m.b, file_ranges())
    kinds = host_census({"m": m})["m"]
    assert kinds["file"] == 16 * MB and kinds["pageable"] == m.b.untyped_storage().nbytes() and kinds["pinned"] == 0
    source = m.w  # a reference outside the module keeps the map open, as an embedding table does
    group = TensorGroup("g", module_slots([m], "cpu"), "cpu")
    assert torch.equal(m.w, expected) and not in_file(m.w, file_ranges())  # the group's copy
    if group.pages_released == 0:
        pytest.skip("this kernel refuses MADV_PAGEOUT (Linux < 5.4)")
    assert 16 * MB - 2 * PAGE <= group.pages_released <= 16 * MB
    assert _mapping_rss(path) <= 2 * PAGE  # without the hand-back: all 16 MB, read by the copy
    assert torch.equal(source, expected)  # the mapped bytes stay readable (from the file)
    assert host_census({"m": m})["m"]["file"] == 0


def test_host_census_counts_each_storage_once_by_kind(tmp_path, seed):
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    b.weight = a.weight  # tied: counted for the first part only
    a.register_buffer("mapped", _mapped(tmp_path / "x.bin", 64 * 1024, seed))
    c = host_census({"a": a, "b": b}, {"extra": [torch.zeros(3), a.bias]})
    nbytes = lambda *ts: sum(t.untyped_storage().nbytes() for t in ts)  # noqa: E731
    assert c["a"] == {"pinned": 0, "pageable": nbytes(a.weight, a.bias), "file": 64 * 1024}
    assert c["b"] == {"pinned": 0, "pageable": nbytes(b.bias), "file": 0}
    assert c["extra"] == {"pinned": 0, "pageable": 12, "file": 0}  # a.bias already counted


@pytest.fixture(scope="module")
def q_pipe(tiny_quantized_pipe):
    return tiny_quantized_pipe


@pytest.mark.parametrize("kept", [None, 1])
def test_arriving_expert_has_its_kept_blocks_in_and_prepared_before_computing(q_pipe, kept):
    s = TINY_SETTINGS
    plan = mo.plan_for(q_pipe, "low", "cpu", s.height, s.width, s.num_frames)
    plan.kept_blocks = kept
    mo.apply_memory_policy(q_pipe, plan)
    state = mo.memory_state_of(q_pipe)
    seen = []

    def probe(attr):
        def hook(module, args):
            groups = state.experts[attr].groups
            blocks = mo.blocks_of(getattr(q_pipe, attr))
            ready = [all(m._resolved is not None for m in mo.quantized_layers(b).values()) for b in blocks]
            seen.append((attr, [g.resident for g in groups], ready))
        return hook

    handles = [getattr(q_pipe, a).condition_embedder.register_forward_pre_hook(probe(a))
               for a in ("transformer", "transformer_2")]
    try:
        ev = tiny_sample()
        run_pipeline(q_pipe, ev.first_frame(), ev.prompt, s, seed=0)
    finally:
        for h in handles:
            h.remove()
    assert {a for a, *_ in seen} == {"transformer", "transformer_2"}
    # before any block runs, at every forward (the first included): the rest and every kept
    # block in, their layers prepared; a streamed block not yet (it comes one ahead of use)
    kept_flags = [True, True] if kept is None else [True, False]
    assert len(seen) == 2 * s.num_inference_steps
    assert all(res == [True, *kept_flags] and ready == kept_flags for _, res, ready in seen), seen
