"""Memory policies on a CUDA GPU (skipped without one): pinned host copies, side-stream copies,
``low`` equal to ``resident`` bit for bit on the tiny W4A4 pipeline at a lower peak."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_SETTINGS, build_tiny_pipeline, tiny_sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_group_is_pinned_copied_on_a_side_stream_and_frees_on_eviction():
    from wanquant.runtime.offload import TensorGroup, Transfer, module_slots

    m = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024)).cuda()
    x = torch.randn(4, 1024, device="cuda")
    expected = m(x)
    group = TensorGroup("m", module_slots([m], "cuda"), "cuda")
    assert group.host.is_pinned() and m[0].weight.device.type == "cpu"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    transfer = Transfer("cuda")
    group.onload(transfer)
    assert group.ready is not None  # the copy runs on the side stream until waited on
    group.wait()
    assert m[0].weight.device.type == "cuda" and torch.equal(m(x), expected)
    assert torch.cuda.memory_allocated() - before >= group.nbytes
    group.evict()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before and m[0].weight.is_pinned()


@pytest.fixture(scope="module")
def gpu_pipe(tiny_ckpt):
    from wanquant.loading import load_quantized

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    load_quantized(pipe, tiny_ckpt, device="cpu")
    return pipe


def _scratch_bytes() -> int:
    """The fast path's FP8 scratch buffers: shared by every layer and kept across policies."""
    from wanquant.kernels import dispatch

    return sum(t.untyped_storage().nbytes() for t in dispatch._SCRATCH.values() if t.is_cuda)


def _generate_with_peak(pipe, memory):
    """Frames, peak allocated bytes while generating, bytes allocated before it started
    (less the shared FP8 scratch, which the first video of the process allocates)."""
    import wanquant.api as wq

    wq.set_memory_policy(pipe, memory, device="cuda", settings=TINY_SETTINGS, chunk_tokens=8192)
    ev = tiny_sample()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() - _scratch_bytes()
    frames = wq.generate(pipe, ev.first_frame(), ev.prompt, TINY_SETTINGS, seed=0)
    torch.cuda.synchronize()
    return frames, torch.cuda.max_memory_allocated(), base


def test_low_equals_resident_on_cuda_and_peaks_lower(gpu_pipe):
    from wanquant.model import offload as mo
    from wanquant.runtime.expert import quantized_layers

    resident, resident_peak, resident_base = _generate_with_peak(gpu_pipe, "resident")
    low, low_peak, low_base = _generate_with_peak(gpu_pipe, "low")
    assert np.array_equal(low, resident)
    expert = mo.measure_footprint(gpu_pipe, "cuda").expert
    # between videos the GPU holds the VAE only (and the scratch), against both experts, the VAE (and the encoder)
    assert resident_base - low_base >= 2 * expert * 0.9, (resident_base, low_base, expert)
    assert low_peak <= resident_peak - expert * 0.9
    state = mo.memory_state_of(gpu_pipe)
    assert not any(s.any_resident() for s in state.experts.values()) and not state.text_encoder.any_resident()
    # the fast path's repacked operands left with their expert
    assert all(m._fast is None for e in (gpu_pipe.transformer, gpu_pipe.transformer_2)
               for m in quantized_layers(e).values())


def test_diffusers_sees_the_execution_device_while_weights_are_in_host_memory(gpu_pipe):
    from diffusers.utils.torch_utils import get_module_execution_device

    import wanquant.api as wq

    wq.set_memory_policy(gpu_pipe, "low", device="cuda", settings=TINY_SETTINGS)
    assert gpu_pipe.transformer.device.type == "cpu"  # evicted
    assert gpu_pipe._execution_device.type == "cuda"
    assert get_module_execution_device(gpu_pipe.text_encoder).type == "cuda"
    assert get_module_execution_device(gpu_pipe.vae).type == "cuda"


def test_fast_path_layers_keep_l1_l2_in_host_memory(gpu_pipe):
    from wanquant.kernels.dispatch import fast_path_status
    from wanquant.runtime.expert import quantized_layers

    layer = next(iter(quantized_layers(gpu_pipe.transformer).values()))
    ok, _ = fast_path_status(torch.device("cuda"), layer.wfmt, layer.afmt)
    assert layer.host_resident_buffers("cuda") == (("l1", "l2") if ok else ())
