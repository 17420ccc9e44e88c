"""The trained testbed: a small Wan2.2-I2V-A14B-form two-expert pipeline and its data.

- ``dataset``: procedural clips with ground truth (splits ``train``/``calib``/``eval``),
  trajectory error and PSNR metrics.
- ``tokenizer``: the word-level tokenizer of the closed prompt vocabulary.
- ``build``: build (untrained) / load (trained, from ``weights/``) the pipeline; generate.
- ``train``: the training recipe (``python -m wanquant.testbed.train --out DIR``).

Names are imported lazily so that ``import wanquant.testbed`` does not import diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "get_sample": "dataset",
    "list_samples": "dataset",
    "trajectory_error": "dataset",
    "psnr": "dataset",
    "Sample": "dataset",
    "build_tokenizer": "tokenizer",
    "TestbedConfig": "build",
    "WEIGHTS_DIR": "build",
    "build_testbed_pipeline": "build",
    "load_testbed_pipeline": "build",
    "encode_prompts": "build",
    "generate": "build",
    "evaluate_prompt_following": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
