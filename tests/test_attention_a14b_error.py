"""benchmarks/attention_a14b_error.py on the CPU (toy expert, the 8-bit attention's PyTorch
reference): one recorded call per block, errors measured against fp32 attention."""

from __future__ import annotations

import json

import torch

from benchmarks import attention_a14b_error as E
from wanquant.kernels import attention as K


def test_recording_measures_against_fp32_and_restores_the_kernel():
    inner = K.attention_int8_reference
    calls: list[dict] = []
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, v = (torch.randn(1, 300, 2, 64, generator=g).bfloat16() for _ in range(3))
    with E.recording("attention_int8_reference", 50, calls):
        out = K.attention_int8_reference(q, k, v)
    assert K.attention_int8_reference is inner
    assert torch.equal(out, inner(q, k, v))  # the wrapper returns the kernel's output untouched
    idx = torch.linspace(0, 299, 50).round().long()
    want = K.relative_error(out[:, idx], K.attention_fp32(q[:, idx], k, v).transpose(1, 2))
    assert len(calls) == 1 and calls[0]["tokens"] == 300
    assert abs(calls[0]["int8"] - want) <= 1e-12
    assert 0 < calls[0]["sdpa"] < calls[0]["int8"] < 0.1  # 8-bit operands cost more than bf16 rounding


def test_tiny_run_reports_every_block(tmp_path):
    assert E.main(["--tiny", "--out", str(tmp_path), "--experts", "bf16"]) == 0
    payload = json.loads((tmp_path / "attention_a14b_error.json").read_text())
    assert [r["block"] for r in payload["rows"]] == list(range(E.TINY_EXPERT["num_layers"]))
    assert all(0 < r["rel_err_int8_vs_fp32"] < 0.1 for r in payload["rows"])
    assert (tmp_path / "attention_a14b_error.png").stat().st_size > 0
    assert "| block |" in (tmp_path / "attention_a14b_error.md").read_text()
