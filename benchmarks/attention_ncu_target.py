"""The launch Nsight Compute profiles in ``benchmarks/attention_ncu.sh``: the 8-bit
attention (:data:`~wanquant.kernels.attention.DEFAULT_CONFIG`, or ``WANQUANT_ATTN_CONFIG``)
on Gaussian q, k, v of ``--tokens`` tokens and Wan's 40 heads x 128, run twice: the first
call compiles, the profiler skips it and records the second."""

from __future__ import annotations

import argparse

import torch

from wanquant.kernels import attention as K


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--heads", type=int, default=40)
    a = p.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, a.tokens, a.heads, 128, generator=g, device="cuda").bfloat16() for _ in range(3))
    cfg = K.env_config()
    for _ in range(2):
        K.attention_int8(q, k, v, config=cfg)
    torch.cuda.synchronize()
    print(f"ran {cfg.describe()} twice at {a.tokens} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
