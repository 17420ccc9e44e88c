"""W4A4Linear's wiring to the fast path, run through Triton's interpreter on the CPU.

The kernels' own tests check their numerics; this checks what the layer does around
them: choosing the backend, handing the current bin's clip setting over, and keeping
its canonical L1/L2 usable (in host memory) after the fast path repacked them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = os.environ.get("WANQUANT_FAST_DISPATCH_CHILD") == "1"


def test_layer_uses_fast_path_and_keeps_reference_usable():
    if CHILD:
        pytest.skip("parent only")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "WANQUANT_FAST_DISPATCH_CHILD": "1",
           "WANQUANT_TEST_SEED": str(random.randrange(1 << 30))}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "child"],
                       env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "1 passed" in r.stdout, r.stdout[-2000:]  # the child really ran, not skipped


@pytest.mark.skipif(not CHILD, reason="runs in the interpreter child of the test above")
def test_child(monkeypatch):
    import torch

    from test_runtime import random_params
    from wanquant.kernels import dispatch
    from wanquant.kernels.gemm import GemmConfig
    from wanquant.formats import MXFP4
    from wanquant.runtime import linear
    from wanquant.runtime.linear import W4A4Linear

    seed = int(os.environ["WANQUANT_TEST_SEED"])
    gen = torch.Generator().manual_seed(seed)
    params = random_params(32, 64, 4, 3, gen)
    layer = W4A4Linear.from_params(params, MXFP4, MXFP4)
    monkeypatch.setattr(linear, "_fast_status", lambda device, w, a: (True, "interpreted fast path (test)"))
    small = dispatch.FastW4A4.prepare
    monkeypatch.setattr(dispatch.FastW4A4, "prepare", classmethod(
        lambda cls, p, afmt, dev: small.__func__(cls, p, afmt, dev, backend="triton",
                                                 gemm_config=GemmConfig(16, 16, 64, 2, 4, 2))))
    x = (torch.randn(5, 64, generator=gen) * 2).to(torch.bfloat16)
    for b in range(3):
        layer.state.bin_index = b
        c, o = params.clip_table[b].tolist()
        want = layer.forward_reference(x, c, int(o)).float()
        got = layer(x).float()
        assert layer.backend_reason == "interpreted fast path (test)"
        assert torch.isfinite(got).all()
        rel = (got - want).norm() / want.norm()
        assert rel < 2e-2, f"seed {seed} bin {b}: rel err {rel:.2e}"
    assert layer.l1.device.type == "cpu" and layer.l2.device.type == "cpu"
    sd = layer.state_dict()
    assert torch.equal(sd["l1"], params.l1) and torch.equal(sd["l2"], params.l2)
