"""How far bf16-level changes to attention move the random-weight A14B's output, on ONE GPU.

``benchmarks.multi_gpu`` found Ulysses context parallelism bit-identical to one GPU but ring
attention 17.5 dB away (relative L2 0.67 of the final latent). Ulysses runs the same
attention kernel on whole sequences; ring attention splits the keys into one chunk per
rank and merges the partial results by their log-sum-exp. This script replays exactly
that arithmetic on one GPU, so a distributed bug can be told apart from the model's own
sensitivity:

* ``sdpa``: the default attention (the 1-GPU reference of ``benchmarks.multi_gpu``);
* ``flash``: the same through the flash kernel that ring attention uses, one chunk;
* ``chunks2``: the keys in 2 chunks, flash on each, merged by log-sum-exp in fp32 (ring
  attention over 2 ranks, without the ranks).

For each it reports the relative L2 of the first transformer output and of the final
latent against ``sdpa``. If ``chunks2`` lands where 2-GPU ring did, the difference is
rounding amplified by the random weights, not the parallel code.

    python -m benchmarks.cp_numerics --res 720x1280 --frames 81 --steps 2
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common.a14b import random_a14b_pipeline
from benchmarks.common.compare import tensor_difference
from benchmarks.common.inputs import random_image
from benchmarks.common.meta import run_metadata, write_results

_SDPA = torch.nn.functional.scaled_dot_product_attention


def flash_chunked(chunks: int):
    """An SDPA drop-in: flash attention over ``chunks`` key blocks, merged by log-sum-exp."""

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = query, key, value  # SDPA's keyword names: diffusers passes them by name
        # the VAE's fp32 attention and masked calls are not what ring attention splits
        if attn_mask is not None or is_causal or dropout_p or not q.is_cuda or q.dtype not in (torch.float16,
                                                                                                 torch.bfloat16):
            return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        outs, lses = [], []
        for kc, vc in zip(k.chunk(chunks, dim=2), v.chunk(chunks, dim=2)):
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, kc, vc, scale=scale)[:2]
            outs.append(o.float())
            lses.append(lse.float())
        lse = torch.logsumexp(torch.stack(lses), dim=0)
        out = sum(o * torch.exp(le - lse).unsqueeze(-1) for o, le in zip(outs, lses))
        return out.to(q.dtype)

    return attention


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", default="720x1280")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--preset", default="wanquant")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)

    from wanquant.method.config import preset
    from wanquant.model.pipeline import GenerationSettings, run_pipeline

    height, width = (int(v) for v in args.res.split("x"))
    settings = GenerationSettings(height=height, width=width, num_frames=args.frames, num_inference_steps=args.steps,
                                  guidance_scale=args.guidance, max_sequence_length=args.max_len)
    pipe = random_a14b_pipeline(torch.device("cuda"), None, True, preset(args.preset), args.max_len)
    image = random_image(height, width)  # the image of the multi_gpu generation rows
    first: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    variants = {"sdpa": _SDPA, "flash": flash_chunked(1), "chunks2": flash_chunked(2)}
    for name, fn in variants.items():
        def grab(mod, a, k, out, _n=name):
            if _n not in first:
                first[_n] = (out[0] if isinstance(out, tuple) else out.sample).float().cpu()

        h = pipe.transformer.register_forward_hook(grab, with_kwargs=True)
        torch.nn.functional.scaled_dot_product_attention = fn
        try:
            outputs[name] = torch.as_tensor(run_pipeline(pipe, image, "a red ball moves left", settings, 0,
                                                         output_type="latent")).float().cpu()
        finally:
            torch.nn.functional.scaled_dot_product_attention = _SDPA
            h.remove()
        print(name, "done", flush=True)
    rows = [{"variant": n, "first_forward_rel_l2": tensor_difference(first["sdpa"], first[n])["rel_l2"],
             "final_latent_rel_l2": tensor_difference(outputs["sdpa"], outputs[n])["rel_l2"]} for n in variants]
    payload = {**run_metadata(), "settings": vars(args), "rows": rows,
               "ring_2gpu_final_latent_rel_l2": "see multi_gpu.json (ring row, vs_1_gpu.rel_l2)"}
    md = "| variant | first forward rel L2 vs sdpa | final latent rel L2 vs sdpa |\n|---|---|---|\n" + "\n".join(
        f"| {r['variant']} | {r['first_forward_rel_l2']:.2e} | {r['final_latent_rel_l2']:.2e} |" for r in rows)
    write_results("cp_numerics", payload, md, args.results_dir)
    print(md)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
