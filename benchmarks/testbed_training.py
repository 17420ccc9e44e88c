"""Train the testbed pipeline on procedural clips, save it, and measure prompt following.

Phases:
1. Render a pool of ``train``-split clips (in worker processes).
2. Train the VAE as a deterministic autoencoder on the posterior mean (object-weighted
   L1 + MSE, a tiny mean-square latent penalty, 9-frame windows), then set its
   ``latents_mean``/``latents_std`` to the statistics of the trained encoder.
3. Encode every clip once: target latents (posterior mode), I2V condition latents
   (built exactly as ``WanImageToVideoPipeline.prepare_latents`` builds them) and prompt
   embeddings (exactly as the pipeline encodes prompts; the UMT5 encoder stays frozen at
   its random initialisation: it still maps each prompt to distinct embeddings).
4. Train both experts by rectified flow: ``x_s = (1 - s) x0 + s noise``, target
   ``noise - x0``, each expert on the timesteps the pipeline gives it
   (``t >= boundary_ratio * 1000``: high-noise ``transformer``, else ``transformer_2``),
   with ``s`` distributed like the shifted inference schedule. 10 % empty prompts for
   classifier-free guidance; EMA weights are the ones saved.
5. Save the pipeline (bf16 safetensors), reload it with ``from_pretrained`` and measure
   ground-truth accuracy with the right, shuffled and empty prompts on the ``eval`` split.

Components are rounded to their bf16 storage precision before their outputs are used
downstream, so the experts train on exactly the latents and embeddings the saved VAE
and text encoder produce.

Usage, from the repository root: ``python -m benchmarks.testbed_training --out DIR [--steps N --seed S ...]``;
``benchmarks/train_testbed.sh`` holds the exact recipe of the committed weights.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import os
import platform
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common.prompt_following import encode_prompts, evaluate_prompt_following, format_eval
from wanquant.model.testbed import (
    BOUNDARY_RATIO,
    FLOW_SHIFT,
    NUM_TRAIN_TIMESTEPS,
    TestbedConfig,
    build_testbed_pipeline,
    load_testbed_pipeline,
)
from wanquant.testbed.dataset import OBJECT_COLOURS, render_clip, sample_spec, split_seed

log = logging.getLogger("benchmarks.testbed_training")
STORAGE_DTYPE = torch.bfloat16

# ------------------------------------------------------------------------------ data


def _render_chunk(args: tuple[int, int, int, int, int]) -> tuple[np.ndarray, list[str]]:
    """Worker: render train clips ``start..stop-1`` (uint8 [n,F,H,W,3]) and prompts."""
    start, stop, frames, height, width = args
    clips, prompts = [], []
    for index in range(start, stop):
        spec = sample_spec(np.random.default_rng(split_seed("train", index)))
        clips.append(render_clip(spec, frames, height, width)[0])
        prompts.append(spec.prompt())
    return np.stack(clips), prompts


def make_pool(num_clips: int, frames: int, height: int, width: int, workers: int) -> tuple[torch.Tensor, list[str]]:
    """Render ``num_clips`` train clips in parallel; uint8 tensor [N, F, H, W, 3] + prompts."""
    chunk = max(1, min(256, math.ceil(num_clips / max(workers, 1))))
    jobs = [(s, min(s + chunk, num_clips), frames, height, width) for s in range(0, num_clips, chunk)]
    if workers <= 1:
        results = [_render_chunk(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(_render_chunk, jobs))
    clips = torch.from_numpy(np.concatenate([r[0] for r in results]))
    prompts = [p for r in results for p in r[1]]
    return clips, prompts


def to_video(clips_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> float [B, 3, F, H, W] in [-1, 1] (the pipeline's range)."""
    x = clips_uint8.to(device, non_blocking=True).permute(0, 4, 1, 2, 3).float()
    return x / 127.5 - 1.0


# ---------------------------------------------------------------------------- helpers


def cosine_lr(base: float, progress: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Warm-up then cosine decay to ``floor * base``; ``progress`` in [0, 1]."""
    if progress < warmup:
        return base * max(progress / warmup, 0.01)
    p = min((progress - warmup) / (1 - warmup), 1.0)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def round_to_storage(module: torch.nn.Module) -> None:
    """Round parameters to the storage dtype's precision (kept in fp32 for compute)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(STORAGE_DTYPE).float())


class EMA:
    """Exponential moving average of a module's parameters (with a short warm-up)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in module.parameters()]
        self.steps = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in module.parameters()], 1 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, module.parameters()):
            p.copy_(s)


class Budget:
    """Stops a loop at ``steps`` or after ``seconds``; reports progress in [0, 1]."""

    def __init__(self, steps: int, seconds: float | None):
        self.steps, self.seconds, self.t0 = steps, seconds, time.time()

    def progress(self, step: int) -> float:
        p = step / max(self.steps, 1)
        if self.seconds:
            p = max(p, (time.time() - self.t0) / self.seconds)
        return min(p, 1.0)

    def done(self, step: int) -> bool:
        return step >= self.steps or (self.seconds is not None and time.time() - self.t0 >= self.seconds)


def log_line(path: Path | None, record: dict) -> None:
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


# -------------------------------------------------------------------------------- VAE


def object_mask(video: torch.Tensor, threshold: float = 70.0) -> torch.Tensor:
    """1 where a pixel of ``video`` ([B, 3, F, H, W] in [-1, 1]) has an object colour.

    Objects are small (a few % of the pixels); without extra weight the VAE spends its
    capacity on the textured backgrounds first and washes the objects out.
    """
    rgb = (video + 1.0) * 127.5
    palette = torch.tensor(list(OBJECT_COLOURS.values()), dtype=rgb.dtype, device=rgb.device)
    dist = (rgb.unsqueeze(1) - palette.view(1, -1, 3, 1, 1, 1)).pow(2).sum(2).sqrt()
    return (dist.min(dim=1).values < threshold).unsqueeze(1).to(video.dtype)


def vae_loss(
    vae, video: torch.Tensor, kl_weight: float, object_weight: float = 4.0, latent_noise: float = 0.05
) -> tuple[torch.Tensor, dict[str, float]]:
    """Object-weighted L1 + MSE reconstruction, plus ``kl_weight`` x mean(mu^2).

    The VAE is trained as a deterministic autoencoder on the posterior mean, the only
    part the I2V pipeline and our training use (``sample_mode="argmax"``); sampling
    the untrained posterior variance would only slow learning. A little latent noise
    keeps the decoder tolerant of the experts' imperfect latents.
    """
    mu = vae.encode(video).latent_dist.mode()
    z = mu + latent_noise * mu.detach().float().std() * torch.randn_like(mu)
    recon = vae.decode(z).sample.float()
    weight = 1.0 + object_weight * object_mask(video)
    err = recon - video
    l1 = (weight * err.abs()).mean() / weight.mean()
    mse = (weight * err.pow(2)).mean() / weight.mean()
    reg = mu.float().pow(2).mean()
    loss = l1 + mse + kl_weight * reg
    return loss, {"l1": l1.item(), "mse": mse.item(), "mu2": reg.item()}


def random_windows(clips: torch.Tensor, frames: int, gen: torch.Generator) -> torch.Tensor:
    """A random ``frames``-long window of each clip ([B, F, H, W, 3] uint8).

    The causal VAE encodes frame 0 alone, then chunks of 4 frames: 1 + 4k frames (9 by
    default) cover both cases and the chunk-to-chunk cache at about half the cost of
    the whole 17-frame clip.
    """
    total = clips.shape[1]
    if frames >= total:
        return clips
    start = torch.randint(total - frames + 1, (clips.shape[0],), generator=gen)
    offsets = start[:, None] + torch.arange(frames)[None]
    return torch.stack([c[o.to(c.device)] for c, o in zip(clips, offsets)])


def train_vae(vae, pool: torch.Tensor, args, device: torch.device, log_path: Path | None) -> list[dict]:
    """Train the VAE on random pool clips; returns the logged records."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    budget = Budget(args.vae_steps, args.vae_seconds)
    records, step, window = [], 0, []
    bar = tqdm(total=args.vae_steps, desc="vae", mininterval=args.bar_interval, disable=args.no_bar)
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(args.vae_lr, budget.progress(step))
        idx = torch.randint(len(pool), (args.vae_batch,), generator=gen)
        video = to_video(random_windows(pool[idx], args.vae_frames, gen), device)
        with autocast(device):
            loss, parts = vae_loss(vae, video, args.kl_weight, args.object_weight, args.latent_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        window.append(parts)
        if step % args.log_every == 0 or budget.done(step):
            rec = {"phase": "vae", "step": step, "time": round(time.time() - budget.t0, 1)}
            rec.update({k: float(np.mean([w[k] for w in window])) for k in window[0]})
            records.append(rec)
            log_line(log_path, rec)
            log.info("vae step %d  l1 %.4f  mse %.5f  mu2 %.3f", step, rec["l1"], rec["mse"], rec["mu2"])
            window = []
    bar.close()
    vae.eval()
    return records


@torch.no_grad()
def encode_latents(vae, videos: Callable[[int, int], torch.Tensor], n: int, batch: int) -> torch.Tensor:
    """Posterior modes (raw, unnormalised) of ``n`` videos given by ``videos(start, stop)``."""
    out = [vae.encode(videos(s, min(s + batch, n))).latent_dist.mode().float() for s in range(0, n, batch)]
    return torch.cat(out)


def set_latent_stats(vae, raw_latents: torch.Tensor) -> tuple[list[float], list[float]]:
    """Store per-channel mean/std of the encoder's latents in the VAE config (as Wan)."""
    mean = raw_latents.mean(dim=(0, 2, 3, 4))
    std = raw_latents.std(dim=(0, 2, 3, 4))
    # A nearly unused channel would be blown up to unit variance (amplifying encoder
    # noise the decoder ignores); keep its std at least a tenth of the median.
    std = std.clamp_min(0.1 * float(std.median()) + 1e-8)
    mean_l, std_l = [round(float(m), 5) for m in mean], [round(float(s), 5) for s in std]
    vae.register_to_config(latents_mean=mean_l, latents_std=std_l)
    return mean_l, std_l


def normalize_latents(vae, raw: torch.Tensor) -> torch.Tensor:
    """The pipeline's normalisation: ``(z - latents_mean) * (1 / latents_std)``."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=raw.device, dtype=raw.dtype).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=raw.device, dtype=raw.dtype).view(1, z, 1, 1, 1)
    return (raw - mean) * inv_std


@torch.no_grad()
def build_condition(vae, images: torch.Tensor, num_frames: int, temporal: int) -> torch.Tensor:
    """I2V condition ``[B, 4 + z, T, h, w]`` for a batch of first frames in [-1, 1].

    The batched twin of ``WanImageToVideoPipeline.prepare_latents`` (which handles one
    image): the first frame followed by ``num_frames - 1`` zero frames is VAE-encoded
    (posterior mode) and normalised; the 4 mask channels are 1 on latent frame 0 (the
    first pixel frame repeated ``temporal`` times, folded into channels) and 0 after.
    """
    b, c, h, w = images.shape
    video = torch.cat([images.unsqueeze(2), images.new_zeros(b, c, num_frames - 1, h, w)], dim=2)
    video = video.to(dtype=vae.dtype)
    lat = normalize_latents(vae, vae.encode(video).latent_dist.mode().float())
    lh, lw = lat.shape[-2:]
    mask = torch.ones(b, 1, num_frames, lh, lw, device=lat.device)
    mask[:, :, 1:] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)
    mask = torch.cat([first, mask[:, :, 1:]], dim=2)
    mask = mask.view(b, -1, temporal, lh, lw).transpose(1, 2)
    return torch.cat([mask, lat], dim=1)


# ---------------------------------------------------------------------------- experts


def boundary_u(shift: float, boundary: float) -> float:
    """Uniform time u where the shifted sigma ``shift*u / (1 + (shift-1)*u)`` hits ``boundary``."""
    return boundary / (shift - (shift - 1) * boundary)


def sample_sigmas(n: int, high: bool, gen: torch.Generator, shift: float = FLOW_SHIFT) -> torch.Tensor:
    """Sigmas of one expert, distributed like the shifted inference schedule.

    u ~ U(0, 1) restricted to the expert's part, mapped through Wan's shift; the high
    expert gets sigma >= boundary_ratio, the low one the rest.
    """
    ub = boundary_u(shift, BOUNDARY_RATIO)
    lo, hi = (ub, 1.0) if high else (0.0, ub)
    u = lo + (hi - lo) * torch.rand(n, generator=gen)
    return shift * u / (1 + (shift - 1) * u)


def sigma_to_timestep(sigma: torch.Tensor, high: bool) -> torch.Tensor:
    """The integer timestep the pipeline passes (``int(sigma * 1000)``), kept in range."""
    t = torch.floor(sigma * NUM_TRAIN_TIMESTEPS)
    boundary = BOUNDARY_RATIO * NUM_TRAIN_TIMESTEPS
    return t.clamp(min=boundary) if high else t.clamp(max=boundary - 1)


def flow_loss(model, x0: torch.Tensor, cond: torch.Tensor, text: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow loss: predict ``noise - x0`` from ``(1-s) x0 + s noise`` (+ condition)."""
    s = sigma.view(-1, 1, 1, 1, 1).to(x0.dtype)
    x_t = (1 - s) * x0 + s * noise
    pred = model(hidden_states=torch.cat([x_t, cond], dim=1), timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    return F.mse_loss(pred.float(), (noise - x0).float())


@torch.no_grad()
def encode_pool_text(pipe, prompts: Sequence[str], max_len: int, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings of the pool's distinct prompts, trimmed to their longest prompt.

    Returns (embeddings [U, L, D], per-clip index into them [N], empty-prompt
    embedding [1, L, D]); positions past each prompt are zero, as in the pipeline, so
    zero-padding back to ``max_len`` reproduces the pipeline's embeddings exactly.
    """
    unique = sorted(set(prompts) | {""})
    where = {p: i for i, p in enumerate(unique)}
    lengths = [len(pipe.tokenizer(p).input_ids) for p in unique]
    trim = max(lengths)
    embeds = torch.cat([encode_prompts(pipe, unique[s : s + batch], max_len)[:, :trim] for s in range(0, len(unique), batch)])
    index = torch.tensor([where[p] for p in prompts])
    return embeds.float(), index, embeds[where[""]][None].float()


def pad_text(embeds: torch.Tensor, max_len: int) -> torch.Tensor:
    """Zero-pad trimmed embeddings [B, L, D] back to [B, max_len, D]."""
    return F.pad(embeds, (0, 0, 0, max_len - embeds.shape[1]))


def train_experts(pipe, data: dict, args, device: torch.device, log_path: Path | None) -> list[dict]:
    """Train ``transformer`` (high noise) and ``transformer_2`` (low noise) together."""
    experts = {"high": pipe.transformer, "low": pipe.transformer_2}
    opts, emas = {}, {}
    for name, model in experts.items():
        model.train()
        opts[name] = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
        emas[name] = EMA(model, args.ema)
    gen = torch.Generator().manual_seed(args.seed + 2)
    # Noise is drawn where it is used: a CPU draw of the whole batch costs more than a step.
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 3)
    n = data["latents"].shape[0]
    budget = Budget(args.steps, args.expert_seconds)
    records, step, window = [], 0, []
    bar = tqdm(total=args.steps, desc="experts", mininterval=args.bar_interval, disable=args.no_bar)
    while not budget.done(step):
        lr = cosine_lr(args.lr, budget.progress(step))
        idx = torch.randint(n, (args.batch,), generator=gen)
        x0 = data["latents"][idx.to(data["latents"].device)].to(device)
        cond = data["cond"][idx.to(data["cond"].device)].to(device)
        text = data["text"][data["text_index"][idx].to(data["text"].device)].to(device)
        drop = torch.rand(args.batch, generator=gen) < args.uncond_prob
        text[drop.to(device)] = data["empty"].to(device)
        text = pad_text(text, args.max_sequence_length)
        parts = {}
        for name, model in experts.items():
            high = name == "high"
            sigma = sample_sigmas(args.batch, high, gen).to(device)
            t = sigma_to_timestep(sigma, high).to(device)
            noise = torch.randn(x0.shape, generator=noise_gen, device=device)
            for group in opts[name].param_groups:
                group["lr"] = lr
            with autocast(device):
                loss = flow_loss(model, x0, cond, text, sigma, t, noise)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[name].step()
            emas[name].update(model)
            parts[name] = loss.item()
        step += 1
        bar.update(1)
        window.append(parts)
        if step % args.log_every == 0 or budget.done(step):
            rec = {"phase": "experts", "step": step, "time": round(time.time() - budget.t0, 1), "lr": lr}
            rec.update({f"loss_{k}": float(np.mean([w[k] for w in window])) for k in window[0]})
            records.append(rec)
            log_line(log_path, rec)
            log.info("experts step %d  loss high %.4f  low %.4f  lr %.2e", step, rec["loss_high"], rec["loss_low"], lr)
            window = []
    bar.close()
    for name, model in experts.items():
        emas[name].copy_to(model)
        model.eval()
    return records


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (pipeline/, logs, eval.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--num-clips", type=int, default=16384, help="train clips rendered for the pool")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-seconds", type=float, default=None, help="time budget of the VAE phase")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-frames", type=int, default=9, help="clip window length for VAE training (1 + 4k)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6, help="weight of mean(mu^2), the KL's mean part")
    p.add_argument("--object-weight", type=float, default=4.0, help="extra loss weight of object pixels")
    p.add_argument("--latent-noise", type=float, default=0.05, help="latent noise (x latent std) in VAE training")
    p.add_argument("--steps", type=int, default=8000, help="expert training steps (both experts each step)")
    p.add_argument("--expert-seconds", type=float, default=None, help="time budget of the expert phase")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--uncond-prob", type=float, default=0.1, help="empty-prompt rate, for guidance")
    p.add_argument("--max-sequence-length", type=int, default=512)
    p.add_argument("--encode-batch", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--eval-steps", type=int, default=40)
    p.add_argument("--eval-guidance", type=float, default=4.0)
    p.add_argument("--eval-seconds", type=float, default=None)
    p.add_argument("--tar", type=Path, default=None, help="also write the saved pipeline as this .tar")
    p.add_argument("--tar-part-mib", type=float, default=0, help="split the tar into parts of this size (0: whole)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--bar-interval", type=float, default=10.0, help="seconds between progress-bar updates")
    p.add_argument("--no-bar", action="store_true")
    return p.parse_args(argv)


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def prepare_expert_data(pipe, pool: torch.Tensor, prompts: list[str], args, device: torch.device, store: torch.device) -> dict:
    """Latents, condition latents and prompt embeddings of every pool clip."""
    vae = pipe.vae
    n = len(pool)

    def videos(s: int, e: int) -> torch.Tensor:
        return to_video(pool[s:e], device)

    raw = encode_latents(vae, videos, n, args.encode_batch)
    mean, std = set_latent_stats(vae, raw)
    log.info("latent mean %s\nlatent std %s", np.round(mean, 3).tolist(), np.round(std, 3).tolist())
    latents = normalize_latents(vae, raw).to(store)
    del raw
    temporal = pipe.vae_scale_factor_temporal
    cond = torch.cat(
        [
            build_condition(vae, videos(s, min(s + args.encode_batch, n))[:, :, 0], args.frames, temporal).to(store)
            for s in range(0, n, args.encode_batch)
        ]
    )
    text, text_index, empty = encode_pool_text(pipe, prompts, args.max_sequence_length)
    log.info("pool: latents %s, condition %s, %d distinct prompts", tuple(latents.shape), tuple(cond.shape), len(text))
    return {"latents": latents, "cond": cond, "text": text.to(store), "text_index": text_index, "empty": empty}


def save_pipeline(pipe, out: Path) -> Path:
    """Save a bf16 copy of the pipeline (safetensors) to ``out/pipeline``."""
    target = out / "pipeline"
    saved = copy.deepcopy(pipe).to("cpu", STORAGE_DTYPE)
    saved.save_pretrained(str(target), safe_serialization=True)
    return target


def write_tar_parts(src: Path, tar_path: Path, part_mib: float) -> list[Path]:
    """Tar ``src`` as ``pipeline/``; split into ``.partNN`` files of at most ``part_mib``.

    Reassemble with ``cat NAME.part* > NAME`` (the GPU machine returns only small files).
    """
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src, arcname="pipeline")
    if part_mib <= 0 or tar_path.stat().st_size <= part_mib * 2**20:
        return [tar_path]
    parts, size = [], int(part_mib * 2**20)
    with open(tar_path, "rb") as f:
        while chunk := f.read(size):
            part = tar_path.with_name(f"{tar_path.name}.part{len(parts):02d}")
            part.write_bytes(chunk)
            parts.append(part)
    tar_path.unlink()
    return parts


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.jsonl"
    log_path.unlink(missing_ok=True)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    times: dict[str, float] = {}

    # Render first: the worker processes fork, which is safest before CUDA starts.
    t = time.time()
    pool, prompts = make_pool(args.num_clips, args.frames, args.height, args.width, args.workers)
    times["render"] = time.time() - t
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # the VAE's Conv3d shapes repeat every step
    env = environment(device)
    log.info("environment %s", env)
    log.info("rendered %d clips in %.1f s", len(pool), times["render"])
    store = device  # the pool fits on the GPU; keeping it there avoids host->device copies
    pool = pool.to(store)

    config = TestbedConfig(height=args.height, width=args.width, num_frames=args.frames, max_sequence_length=args.max_sequence_length)
    pipe = build_testbed_pipeline(args.seed, config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for name in ("vae", "transformer", "transformer_2", "text_encoder"):
        log.info("%s: %.2f M parameters", name, sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6)

    t = time.time()
    vae_records = train_vae(pipe.vae, pool, args, device, log_path)
    times["vae"] = time.time() - t
    # The saved components are bf16: use exactly those weights from here on.
    round_to_storage(pipe.vae)
    round_to_storage(pipe.text_encoder)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)

    t = time.time()
    data = prepare_expert_data(pipe, pool, prompts, args, device, store)
    times["encode"] = time.time() - t
    del pool

    t = time.time()
    expert_records = train_experts(pipe, data, args, device, log_path)
    times["experts"] = time.time() - t
    del data

    t = time.time()
    target = save_pipeline(pipe, args.out)
    if args.tar is not None:
        write_tar_parts(target, args.tar, args.tar_part_mib)
    times["save"] = time.time() - t
    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": env,
        "seconds": times,
        "vae_steps": vae_records[-1]["step"] if vae_records else 0,
        "expert_steps": expert_records[-1]["step"] if expert_records else 0,
        "vae_log": vae_records,
        "expert_log": expert_records,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))

    if args.eval_samples > 0:
        t = time.time()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        reloaded = load_testbed_pipeline(device, dtype=dtype, path=target)
        reloaded.set_progress_bar_config(disable=True)
        result = evaluate_prompt_following(
            reloaded, args.eval_samples, args.eval_steps, args.eval_guidance, args.seed, args.eval_seconds,
            num_frames=args.frames, height=args.height, width=args.width,
        )
        result["settings"]["dtype"] = str(dtype)
        times["eval"] = time.time() - t
        summary["eval"] = result
        (args.out / "eval.json").write_text(json.dumps(result, indent=1))
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info("prompt following on the eval split:\n%s", format_eval(result))
    log.info("phase seconds %s", {k: round(v, 1) for k, v in times.items()})
    return summary


if __name__ == "__main__":
    main()
