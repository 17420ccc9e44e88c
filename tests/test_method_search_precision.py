"""The searches' TF32 switch: on for CUDA searches only, restored afterwards, and a config
field that round-trips (older configs without it read back with the default)."""

from __future__ import annotations

import torch

from wanquant.method.config import QuantConfig, preset
from wanquant.method.layer import tf32_matmul


def test_tf32_only_inside_cuda_searches_and_restored() -> None:
    m = torch.backends.cuda.matmul
    before = m.allow_tf32
    for dev, enabled, want in ((torch.device("cuda"), True, True), (torch.device("cuda"), False, before),
                               (torch.device("cpu"), True, before)):
        with tf32_matmul(dev, enabled):
            assert m.allow_tf32 == want
        assert m.allow_tf32 == before
    try:  # restored on an error too
        with tf32_matmul(torch.device("cuda")):
            raise KeyError("boom")
    except KeyError:
        pass
    assert m.allow_tf32 == before


def test_search_precision_fields_round_trip() -> None:
    cfg = preset("wanquant")
    assert cfg.clip.tf32 and cfg.smooth.tf32
    cfg.clip.tf32 = False
    d = cfg.to_dict()
    assert QuantConfig.from_dict(d) == cfg
    del d["clip"]["tf32"], d["smooth"]["tf32"]  # a manifest written before the field existed
    old = QuantConfig.from_dict(d)
    assert old.clip.tf32 and old.smooth.tf32
