"""GPU runs of the fused q/k RMS-norm + rotary (``wanquant.kernels.rope``), skipped without
CUDA: the compiled kernel against the PyTorch reference at Wan's head layout (40 x 128),
on strided views of a fused q/k/v buffer. The caching allocator is filled with NaN first,
so an output element the kernel fails to write shows. Speed: benchmarks/prepass_speed.py."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from test_rope import case, ulp_steps  # noqa: E402
from wanquant.kernels import rope as R  # noqa: E402

pytestmark = pytest.mark.gpu


def _poison_allocator(nbytes: int) -> None:
    torch.full((nbytes // 4,), float("nan"), device="cuda")  # freed at once: later empties reuse it


@pytest.mark.parametrize("kw", [dict(b=1, t=1000, heads=40, d=128), dict(b=2, t=333, heads=40, d=128),
                                dict(b=1, t=257, heads=40, d=128, table_dtype=torch.float64),
                                dict(b=1, t=100, heads=12, d=64, dtype=torch.float16)])
def test_kernel_matches_reference_on_gpu(kw):
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in case(**kw, seed=7)]
    want = R.qk_norm_rope_reference(*args, 1e-6)
    _poison_allocator(8 * want[0].numel() * 2)
    got = R.qk_norm_rope(*args, 1e-6)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        steps = ulp_steps(g, w)
        assert steps.max() <= 1 and (steps > 0).float().mean() <= 1e-3
