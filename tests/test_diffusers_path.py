"""The diffusers way (``WanTransformer3DModel.from_pretrained`` on a checkpoint's expert
directory) and :func:`wanquant.api.load_quantized` give the same video, bit for bit, on
the trained testbed in bf16 (the CLI's dtype), without diffusers' "weights not used"
warning about the saved rotary tables."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

import wanquant.api as wq
from wanquant.testbed.dataset import list_samples

pytestmark = pytest.mark.slow
SETTINGS = dataclasses.replace(wq.default_settings("testbed"), height=32, width=32, num_frames=5,
                               num_inference_steps=4)
# The testbed's own size: at 6 steps a first-layer difference of 2.4e-7 (fp32 norms read
# through the file's memory map) had grown to 0.2 in the frames.
GENERATE = dataclasses.replace(wq.default_settings("testbed"), num_inference_steps=6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pipe = wq.load_base_pipeline("testbed", dtype=torch.bfloat16)
    samples = [dataclasses.replace(s, image=s.image.resize((32, 32))) for s in wq.load_calibration("testbed", 1)]
    qdir = tmp_path_factory.mktemp("diffusers_path") / "q"
    # The default preset: its tensor layout in the file is the one that exposed the
    # memory-map difference (offsets decide which tensors are unaligned).
    wq.quantize(pipe, samples, qdir, "wanquant", SETTINGS, reservoir_tokens=128, progress=False)
    return qdir


def test_from_pretrained_matches_load_quantized_bit_for_bit(checkpoint, caplog):
    from diffusers import WanTransformer3DModel

    import wanquant.model.diffusers_quantizer  # noqa: F401  (registers quant_method "wanquant")

    ev = list_samples("eval", 1)[0]
    ours = wq.load_quantized(wq.load_base_pipeline("testbed", with_experts=False), checkpoint)
    expected = wq.generate(ours, ev.first_frame(), ev.prompt, GENERATE, progress=False)

    caplog.set_level(logging.WARNING)
    experts = {a: WanTransformer3DModel.from_pretrained(str(checkpoint / a), torch_dtype=torch.bfloat16)
               for a in ("transformer", "transformer_2")}
    assert not [r for r in caplog.records if "not used" in r.getMessage()], caplog.text
    theirs = wq.load_base_pipeline("testbed", with_experts=False)
    theirs.register_modules(**experts)
    np.testing.assert_array_equal(wq.generate(theirs, ev.first_frame(), ev.prompt, GENERATE, progress=False),
                                  expected)
