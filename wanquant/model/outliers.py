"""Massive activation channels transplanted into a Wan expert without changing its 16-bit output.

Large diffusion transformers carry a few fixed "massive" channels, two to three orders of
magnitude above the median, tied to the AdaLN modulation and sized by the timestep
(arXiv 2505.18584, 2510.11538; for LLMs and ViTs arXiv 2402.17762, where 1-4 fixed feature
dimensions reach 100-10,000x the median). The trained testbed has none. This module puts
them in by an exact reparametrisation of each ``WanTransformerBlock``::

    u = norm(x) * (1 + scale(t)) + shift(t),  scale/shift = scale_shift_table + time_proj(temb)

For a channel ``j`` and a factor ``alpha``, ``shift_j -> alpha * shift_j`` and
``1 + scale_j -> alpha * (1 + scale_j)`` make ``u_j -> alpha * u_j``; dividing column ``j``
of every linear that reads ``u`` by ``alpha`` leaves its output, and so the model, unchanged.
In diffusers' block (0.42.1) the modulated inputs are::

    norm1 * (1 + scale_msa) + shift_msa        (chunks 1, 0)  -> attn1.to_q / to_k / to_v
    norm3 * (1 + c_scale_msa) + c_shift_msa    (chunks 4, 3)  -> ffn.net[0].proj
    norm2(x) (affine LayerNorm, no modulation)                -> attn2 (untouched)

The ``alpha`` enters through ``time_proj`` (rows of chunks 0, 1, 3, 4; shared by all blocks
of an expert) and each block's ``scale_shift_table`` (``alpha * s + alpha - 1`` for the
scale chunks): a channel's factor is shared by the expert's blocks, as in real DiTs, and its
size follows the timestep through ``1 + scale(t)`` and ``shift(t)``. Each expert has its own
time projection, so each expert gets its own profile.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Chunks of the 6 x dim modulation vector (diffusers' order): shift/scale of attn1's input,
# its gate, then shift/scale/gate of the FFN's input.
SHIFT_MSA, SCALE_MSA, GATE_MSA, C_SHIFT, C_SCALE, C_GATE = range(6)
SHIFT_CHUNKS = (SHIFT_MSA, C_SHIFT)
SCALE_CHUNKS = (SCALE_MSA, C_SCALE)
# Timesteps of each Wan2.2 expert (boundary 0.9 of 1000 training steps).
EXPERT_TIMESTEPS = {"transformer": (900.0, 999.0), "transformer_2": (1.0, 899.0)}
# Default factors per expert (largest first): a handful of channels at 100-1000x, a
# different profile per expert (the experts of the literature do not share top channels).
DEFAULT_ALPHAS = {"transformer": (1000.0, 300.0, 100.0), "transformer_2": (600.0, 150.0)}
OUTLIERS_FILE = "OUTLIERS.json"


@dataclass(frozen=True)
class OutlierProfile:
    """Channels of one expert's hidden state and the factor each is multiplied by."""

    channels: tuple[int, ...]
    alphas: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.alphas):
            raise ValueError(f"{len(self.channels)} channels but {len(self.alphas)} alphas: give one alpha per channel")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"channels must be distinct, got {self.channels}")
        if any(not a > 0 for a in self.alphas):
            raise ValueError(f"alphas must be positive, got {self.alphas}")


def _check_block(block, dim: int) -> None:
    attn = block.attn1
    if getattr(attn, "fused_projections", False) or not hasattr(attn, "to_q"):
        raise ValueError("attn1 has fused q/k/v projections: transplant before fusing (call unfuse_projections())")
    if tuple(block.scale_shift_table.shape) != (1, 6, dim):
        raise ValueError(f"unexpected scale_shift_table shape {tuple(block.scale_shift_table.shape)}; "
                         f"this transplant knows diffusers' WanTransformerBlock (1, 6, {dim})")


def modulation(expert, timesteps: torch.Tensor) -> torch.Tensor:
    """``scale_shift_table + time_proj(temb(t))`` of every block: ``[blocks, len(t), 6, dim]`` (fp32)."""
    ce = expert.condition_embedder
    dt = next(ce.time_embedder.parameters()).dtype
    with torch.no_grad():
        temb = ce.time_embedder(ce.timesteps_proj(timesteps.float()).to(dt))
        proj = ce.time_proj(ce.act_fn(temb)).float().unflatten(-1, (6, -1))
        return torch.stack([b.scale_shift_table.float()[0] + proj for b in expert.blocks])


def modulated_size(expert, timesteps: torch.Tensor) -> torch.Tensor:
    """Typical size of each channel of the modulated inputs, ``[len(t), dim]``: the mean
    over blocks and both consumers (attn1, FFN) of ``sqrt((1 + scale)^2 + shift^2)``, the
    RMS of ``norm(x) * (1 + scale) + shift`` for a unit-variance normalised ``x``."""
    m = modulation(expert, timesteps)
    sizes = [((1 + m[:, :, sc]) ** 2 + m[:, :, sh] ** 2).sqrt() for sc, sh in zip(SCALE_CHUNKS, SHIFT_CHUNKS)]
    return torch.stack(sizes).mean(dim=(0, 1))


def pick_channels(expert, count: int, t_range: tuple[float, float], exclude: tuple[int, ...] = (),
                  num_timesteps: int = 16) -> tuple[int, ...]:
    """The ``count`` channels whose modulated size varies most (max/min) over ``t_range``,
    so that the transplanted channels' size follows the timestep; ``exclude`` is skipped."""
    t = torch.linspace(t_range[0], t_range[1], num_timesteps)
    size = modulated_size(expert, t)
    ratio = size.amax(0) / size.amin(0).clamp_min(1e-6)
    if exclude:
        ratio[list(exclude)] = -1.0
    return tuple(int(i) for i in ratio.argsort(descending=True)[:count])


def transplant(expert, profile: OutlierProfile) -> None:
    """Scale ``profile.channels`` of every block's modulated inputs by ``profile.alphas`` and
    the consuming linears' columns by the inverse (in place; the 16-bit output is unchanged)."""
    dim = expert.blocks[0].scale_shift_table.shape[-1]
    bad = [c for c in profile.channels if not 0 <= c < dim]
    if bad:
        raise ValueError(f"channels {bad} outside the hidden size {dim}")
    for b in expert.blocks:
        _check_block(b, dim)
    tp = expert.condition_embedder.time_proj
    if tp.out_features != 6 * dim:
        raise ValueError(f"time_proj gives {tp.out_features} features, expected 6 x {dim}")
    with torch.no_grad():
        for j, a in zip(profile.channels, profile.alphas):
            rows = [k * dim + j for k in SHIFT_CHUNKS + SCALE_CHUNKS]
            tp.weight[rows] *= a
            if tp.bias is not None:
                tp.bias[rows] *= a
            for b in expert.blocks:
                table = b.scale_shift_table
                for k in SHIFT_CHUNKS:
                    table[0, k, j] *= a
                for k in SCALE_CHUNKS:  # 1 + s' = a (1 + s)
                    table[0, k, j] = a * table[0, k, j] + (a - 1.0)
                for lin in (b.attn1.to_q, b.attn1.to_k, b.attn1.to_v, b.ffn.net[0].proj):
                    lin.weight[:, j] /= a


def default_profiles(experts: dict) -> dict[str, OutlierProfile]:
    """Per expert (``{"transformer": ..., "transformer_2": ...}``): :data:`DEFAULT_ALPHAS`
    on the channels whose size follows that expert's timesteps most, disjoint between experts."""
    out: dict[str, OutlierProfile] = {}
    taken: tuple[int, ...] = ()
    for name, expert in experts.items():
        alphas = DEFAULT_ALPHAS[name]
        ch = pick_channels(expert, len(alphas), EXPERT_TIMESTEPS[name], exclude=taken)
        out[name] = OutlierProfile(ch, alphas)
        taken += ch
    return out


def write_outlier_testbed(src: str | Path, dst: str | Path, profiles: dict[str, OutlierProfile] | None = None,
                          overwrite: bool = False) -> dict[str, OutlierProfile]:
    """Copy the diffusers directory ``src`` to ``dst`` with the experts transplanted
    (``profiles``, default :func:`default_profiles`); writes ``dst/OUTLIERS.json``."""
    from diffusers import WanTransformer3DModel

    src, dst = Path(src), Path(dst)
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"{src} is not a diffusers pipeline directory (no model_index.json)")
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    experts = {n: WanTransformer3DModel.from_pretrained(src / n) for n in EXPERT_TIMESTEPS if (src / n).is_dir()}
    profiles = profiles or default_profiles(experts)
    for name, expert in experts.items():
        transplant(expert, profiles[name])
        shutil.rmtree(dst / name)
        expert.save_pretrained(dst / name)
    (dst / OUTLIERS_FILE).write_text(json.dumps(
        {"source": str(src), "method": "AdaLN channel transplant (wanquant.model.outliers)",
         "profiles": {n: asdict(p) for n, p in profiles.items()}}, indent=1))
    return profiles


def read_profiles(path: str | Path) -> dict[str, OutlierProfile]:
    """The profiles a transplanted directory was written with."""
    d = json.loads((Path(path) / OUTLIERS_FILE).read_text())["profiles"]
    return {n: OutlierProfile(tuple(p["channels"]), tuple(p["alphas"])) for n, p in d.items()}


__all__ = ["OutlierProfile", "modulation", "modulated_size", "pick_channels", "transplant", "default_profiles",
           "write_outlier_testbed", "read_profiles", "DEFAULT_ALPHAS", "EXPERT_TIMESTEPS"]
