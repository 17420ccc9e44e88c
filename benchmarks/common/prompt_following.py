"""Does a testbed pipeline follow its prompts? Prompt encoding, paired generation, evaluation.

:func:`generate` renders several prompts from one sample's first frame with the same
initial noise (drawn on the CPU, so results do not depend on the device): prompt
comparisons are paired. :func:`evaluate_prompt_following` scores the right, a shuffled
and the empty prompt against the ground truth of the ``eval`` split. Used by the
testbed's training recipe (``python -m benchmarks.testbed_training``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import numpy as np
import torch

from wanquant.evaluation.metrics import psnr
from wanquant.model.testbed import TestbedConfig
from wanquant.testbed.dataset import Sample, list_samples, to_uint8_frames, trajectory_error
from wanquant.testbed.tokenizer import DEFAULT_MAX_LENGTH

log = logging.getLogger(__name__)


def testbed_config_of(pipe) -> TestbedConfig:
    """Recover the TestbedConfig sizes of a built or loaded pipeline."""
    t = pipe.transformer.config
    te = pipe.text_encoder.config
    v = pipe.vae.config
    return dataclasses.replace(
        TestbedConfig(),
        num_layers=t.num_layers,
        num_attention_heads=t.num_attention_heads,
        attention_head_dim=t.attention_head_dim,
        ffn_dim=t.ffn_dim,
        freq_dim=t.freq_dim,
        text_dim=te.d_model,
        text_layers=te.num_layers,
        text_heads=te.num_heads,
        text_ff=te.d_ff,
        vae_base_dim=v.base_dim,
        vae_dim_mult=tuple(v.dim_mult),
        vae_res_blocks=v.num_res_blocks,
        z_dim=v.z_dim,
    )


@torch.no_grad()
def encode_prompts(
    pipe,
    prompts: Sequence[str],
    max_sequence_length: int = DEFAULT_MAX_LENGTH,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Prompt embeddings ``[B, max_sequence_length, text_dim]`` exactly as the pipeline.

    Mirrors ``WanImageToVideoPipeline._get_t5_prompt_embeds`` (tokenize to
    ``max_sequence_length``, encode with the mask, zero every position past the prompt)
    without its ``ftfy`` text cleaning, which diffusers calls unconditionally although
    ``ftfy`` is an optional package (absent on the GPU machine, for one); the cleaning
    is the identity on our ASCII prompts.
    """
    device = device or pipe.text_encoder.device
    dtype = dtype or pipe.text_encoder.dtype
    tokens = pipe.tokenizer(
        [" ".join(p.split()) for p in prompts],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = tokens.input_ids.to(pipe.text_encoder.device), tokens.attention_mask.to(pipe.text_encoder.device)
    hidden = pipe.text_encoder(ids, mask).last_hidden_state
    keep = mask.gt(0).unsqueeze(-1)
    return torch.where(keep, hidden, torch.zeros_like(hidden)).to(device=device, dtype=dtype)


@torch.no_grad()
def generate(
    pipe,
    sample: Sample,
    seed: int = 0,
    steps: int = 40,
    prompts: Sequence[str] | None = None,
    guidance_scale: float = 4.0,
    negative_prompt: str = "",
) -> np.ndarray:
    """Generate videos from a sample's first frame; uint8 ``[P, F, H, W, 3]``.

    One video per prompt in ``prompts`` (default: the sample's own prompt), all from the
    same initial noise (drawn on the CPU from ``seed``, so results do not depend on the
    device), which makes prompt comparisons paired.
    """
    prompts = list(prompts) if prompts is not None else [sample.prompt]
    num_frames, height, width = sample.frames.shape[:3]
    device = pipe._execution_device
    tdtype = pipe.transformer.dtype
    embeds = encode_prompts(pipe, prompts, device=device, dtype=tdtype)
    negative = encode_prompts(pipe, [negative_prompt] * len(prompts), device=device, dtype=tdtype)
    cfg = testbed_config_of(pipe)
    lat_shape = (
        1,
        cfg.z_dim,
        (num_frames - 1) // pipe.vae_scale_factor_temporal + 1,
        height // pipe.vae_scale_factor_spatial,
        width // pipe.vae_scale_factor_spatial,
    )
    noise = torch.randn(lat_shape, generator=torch.Generator("cpu").manual_seed(seed))
    out = pipe(
        image=sample.first_frame(),
        prompt_embeds=embeds,
        negative_prompt_embeds=negative if guidance_scale > 1 else None,
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        latents=noise.repeat(len(prompts), 1, 1, 1, 1).to(device),
        output_type="np",
    ).frames
    return np.stack([to_uint8_frames(v) for v in out])


def shuffled(prompts: Sequence[str]) -> list[str]:
    """A derangement: every sample gets the next sample's prompt."""
    return [prompts[(i + 1) % len(prompts)] for i in range(len(prompts))]


def evaluate_prompt_following(
    pipe,
    num_samples: int = 32,
    steps: int = 40,
    guidance_scale: float = 4.0,
    seed: int = 0,
    seconds: float | None = None,
    **render_kwargs,
) -> dict:
    """Ground-truth accuracy on the ``eval`` split with right, shuffled and empty prompts.

    The three videos of a sample share their initial noise. Also reports two references:
    the first frame held still (what a model ignoring motion gets) and the VAE's own
    reconstruction of the true clip (the best the latent space allows).
    """
    cfg = pipe.vae.config
    samples = list_samples("eval", num_samples, **render_kwargs)
    wrong = shuffled([s.prompt for s in samples])
    rows: dict[str, list[dict]] = {"right": [], "shuffled": [], "empty": [], "static": [], "vae_recon": []}
    t0 = time.time()
    device = pipe._execution_device
    for i, sample in enumerate(samples):
        if seconds is not None and time.time() - t0 > seconds:
            log.warning("evaluation stopped at its time budget after %d samples", i)
            break
        videos = generate(pipe, sample, seed=seed + i, steps=steps, prompts=[sample.prompt, wrong[i], ""], guidance_scale=guidance_scale)
        for name, video in zip(("right", "shuffled", "empty"), videos):
            rows[name].append({**trajectory_error(video, sample), "psnr": gt_psnr(video, sample.frames)})
        still = np.repeat(sample.frames[:1], sample.num_frames, axis=0)
        rows["static"].append({**trajectory_error(still, sample), "psnr": gt_psnr(still, sample.frames)})
        with torch.no_grad():
            x = sample.video_tensor().permute(1, 0, 2, 3)[None].to(device, pipe.vae.dtype)
            rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample[0].permute(1, 0, 2, 3)
        rows["vae_recon"].append({**trajectory_error(rec, sample), "psnr": gt_psnr(rec, sample.frames)})
    summary = {
        name: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for name, rs in rows.items() if rs
    }
    summary["settings"] = {
        "num_samples": len(rows["right"]),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "frames": samples[0].num_frames,
        "size": list(samples[0].frames.shape[1:3]),
        "z_dim": cfg.z_dim,
    }
    return summary


def gt_psnr(video, reference) -> float:
    """PSNR (dB) of a video (as ``to_uint8_frames`` takes it) against the true clip, frame 0 left out."""
    return psnr(to_uint8_frames(video), reference, skip_first=True)


def format_eval(summary: dict) -> str:
    """A markdown table of an evaluation summary."""
    lines = ["| prompts | trajectory error (px) | missing frames | PSNR vs ground truth (dB) |", "|---|---|---|---|"]
    for name in ("right", "shuffled", "empty", "static", "vae_recon"):
        if name in summary:
            r = summary[name]
            lines.append(f"| {name} | {r['traj_err_px']:.2f} | {100 * r['missing_frac']:.1f} % | {r['psnr']:.2f} |")
    return "\n".join(lines)
