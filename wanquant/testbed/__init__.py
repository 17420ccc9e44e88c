"""The embedded testbed: a small trained Wan2.2-I2V-A14B-form two-expert model and its data.

- ``weights/``: the trained pipeline, a diffusers directory like any other model
  (``wanquant.api.load_base_pipeline("testbed")`` resolves the name to it);
- ``dataset``: procedural clips with ground truth (splits ``train``/``calib``/``eval``)
  and the trajectory error;
- ``tokenizer``: the word-level tokenizer of the closed prompt vocabulary.

Its architecture (built untrained, for tests) is :mod:`wanquant.model.testbed`; its
training recipe is ``benchmarks/testbed_training.py``.
"""

from __future__ import annotations

from pathlib import Path

from wanquant.testbed.dataset import DEFAULT_FRAMES, DEFAULT_SIZE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# What the testbed was trained to generate (GenerationSettings fields).
SAMPLING = {"height": DEFAULT_SIZE, "width": DEFAULT_SIZE, "num_frames": DEFAULT_FRAMES, "max_sequence_length": 512}
