"""Loading reads a checkpoint one tensor at a time (host memory): the reader against
safetensors' own loader, on every dtype a checkpoint holds, and its errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanquant.artifacts.checkpoint import CheckpointError
from wanquant.loading import TensorFile


def test_tensor_file_reads_what_safetensors_reads(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "a.qweight": torch.randint(0, 256, (7, 5), dtype=torch.uint8, generator=g),
        "a.l1": torch.randn(3, 8, generator=g).to(torch.bfloat16),
        "a.smooth": torch.rand(8, generator=g) + 0.5,
        "b.half": torch.randn(2, 3, 4, generator=g).half(),
        "b.fp8": torch.randn(16, generator=g).to(torch.float8_e4m3fn),
        "b.int": torch.randint(-5, 5, (4,), dtype=torch.int64, generator=g),
        "b.flag": torch.rand(6, generator=g) > 0.5,
        "c.scalar": torch.tensor(3.25, dtype=torch.float64),
        "c.empty": torch.zeros(0, 4),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reference = load_file(str(path))
    with TensorFile(path) as tf:
        assert sorted(tf.keys()) == sorted(tensors)
        for k, ref in reference.items():
            got = tf.get(k)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))  # bit for bit
            assert got.numel() == 0 or got.data_ptr() != tf.get(k).data_ptr()  # a fresh allocation each time
            assert got.untyped_storage().nbytes() == got.numel() * got.element_size()  # nothing shared
        assert tf.get("missing") is None and tf.get("missing", 7) == 7


def test_tensor_file_errors_name_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.arange(1000, dtype=torch.float32)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with TensorFile(path) as tf, pytest.raises(CheckpointError, match="truncated"):
        tf.get("x")
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(CheckpointError, match="corrupt"):
        TensorFile(path)
