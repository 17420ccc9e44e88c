"""The one module that knows Wan in diffusers: which linears are quantized, which share
inputs, what stays 16-bit, where the experts are and which timesteps each one runs.

Everything model-specific is the declarative :data:`BLOCK_TABLE`; the rest of wanquant
works on the generic :class:`QuantTarget` list this module derives from it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from wanquant.config import QuantConfig
from wanquant.runtime.state import ExpertState, TimestepBins

InputKind = Literal["hidden", "text"]


@dataclass(frozen=True)
class LinearGroup:
    """One quantized layer of a transformer block, made of one or more source linears.

    ``members`` read the same input and are concatenated along their outputs into
    ``name`` (one smoothing vector, one L1, one activation quantization, one GEMM).
    ``static_per_video``: the input is the text context, the same at every step, so the
    output is cached per context (cond / uncond) and expert.
    """

    name: str
    members: tuple[str, ...]
    input: InputKind = "hidden"
    static_per_video: bool = False


# Wan2.1 / Wan2.2 `WanTransformerBlock`. Fused names are the attributes diffusers'
# `WanAttention` reads when `fused_projections` is set (`to_qkv`, `to_kv`).
BLOCK_TABLE: tuple[LinearGroup, ...] = (
    LinearGroup("attn1.to_qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    LinearGroup("attn1.to_out.0", ("attn1.to_out.0",)),
    LinearGroup("attn2.to_q", ("attn2.to_q",)),
    LinearGroup("attn2.to_kv", ("attn2.to_k", "attn2.to_v"), input="text", static_per_video=True),
    LinearGroup("attn2.to_out.0", ("attn2.to_out.0",)),
    LinearGroup("ffn.net.0.proj", ("ffn.net.0.proj",)),
    LinearGroup("ffn.net.2", ("ffn.net.2",)),
)
# Outside the blocks everything stays 16-bit: embedders, the output projection, norms and
# modulation tables are small and sensitive. (Wan2.1 I2V's add_k/add_v image projections
# are not in the table either, so they stay 16-bit too.)
KEEP_16BIT = ("patch_embedding", "condition_embedder", "proj_out", "norm_out", "scale_shift_table", "rope")
BLOCKS_ATTR = "blocks"


@dataclass
class QuantTarget:
    """A concrete quantized layer in one expert: ``blocks.{block}.{group.name}``."""

    block: int
    group: LinearGroup
    members: list[nn.Linear]

    @property
    def name(self) -> str:
        return f"{BLOCKS_ATTR}.{self.block}.{self.group.name}"

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = torch.cat([m.weight.data for m in self.members], dim=0)
        has_bias = [m.bias is not None for m in self.members]
        if any(has_bias) and not all(has_bias):
            raise ValueError(f"{self.name}: fused members disagree on bias")
        b = torch.cat([m.bias.data for m in self.members], dim=0) if all(has_bias) else None
        return w, b

    @property
    def shape(self) -> tuple[int, int]:
        return sum(m.out_features for m in self.members), self.members[0].in_features


@dataclass
class ExpertSpec:
    """An expert of a pipeline: attribute name, role and the timesteps it runs."""

    attr: str  # "transformer" or "transformer_2"
    role: str  # "high", "low" or "single"
    module: nn.Module
    t_start: float
    t_end: float

    def timestep_bins(self, cfg: QuantConfig) -> TimestepBins:
        return TimestepBins(self.t_start, self.t_end, tuple(cfg.bins_for(self.role).edges))


def is_wan_transformer(module: nn.Module) -> bool:
    from diffusers import WanTransformer3DModel

    return isinstance(module, WanTransformer3DModel)


def experts_of(pipe) -> list[ExpertSpec]:
    """The experts of a Wan pipeline with the timestep range each one denoises."""
    t_max = float(pipe.scheduler.config.num_train_timesteps)
    t1, t2 = getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)
    boundary = getattr(pipe.config, "boundary_ratio", None)
    for m in (t1, t2):
        if m is not None and not is_wan_transformer(m):
            raise TypeError(f"expected a WanTransformer3DModel, got {type(m).__name__}")
    if t1 is None:
        raise ValueError("the pipeline has no `transformer`; wanquant needs a Wan pipeline")
    if t2 is None or boundary is None:
        return [ExpertSpec("transformer", "single", t1, t_max, 0.0)]
    b = float(boundary) * t_max
    return [ExpertSpec("transformer", "high", t1, t_max, b), ExpertSpec("transformer_2", "low", t2, b, 0.0)]


def _get(module: nn.Module, dotted: str) -> nn.Module:
    return module.get_submodule(dotted)


def quant_targets(transformer: nn.Module, cfg: QuantConfig) -> list[QuantTarget]:
    """Every quantized layer of one expert, after the precision policy."""
    blocks = getattr(transformer, BLOCKS_ATTR)
    policy = cfg.precision
    n = len(blocks)
    bad = [b for b in policy.skip_blocks if not -n <= b < n]
    if bad:
        raise ValueError(f"skip_blocks {bad} out of range: the model has {n} blocks (0..{n - 1})")
    skip_blocks = {b % n for b in policy.skip_blocks}
    targets = []
    for i, block in enumerate(blocks):
        if i in skip_blocks:
            continue
        for group in BLOCK_TABLE:
            members = [_get(block, m) for m in group.members]
            for m in members:
                if not isinstance(m, nn.Linear):
                    raise TypeError(f"{BLOCKS_ATTR}.{i}.{group.name}: expected nn.Linear members, found {type(m).__name__}")
            targets.append(QuantTarget(i, group, members))
    unmatched = [p for p in policy.skip_layers if not any(fnmatch.fnmatchcase(t.name, p) for t in targets)]
    if unmatched:
        names = ", ".join(t.name for t in targets[: len(BLOCK_TABLE)])
        raise ValueError(f"skip_layers patterns {unmatched} match no quantized layer; layer names look like: {names}")
    return [t for t in targets if not any(fnmatch.fnmatchcase(t.name, p) for p in policy.skip_layers)]


def install_layer(transformer: nn.Module, name: str, layer: nn.Module) -> None:
    """Put a quantized layer in place of its source linears (diffusers' fused attributes)."""
    group = _group_of(name)
    block = _get(transformer, name[: -len(group.name) - 1])
    if len(group.members) > 1:
        attn_path, fused_attr = group.name.rsplit(".", 1)
        attn = _get(block, attn_path)
        for member in group.members:
            attr = member.rsplit(".", 1)[1]
            if hasattr(attn, attr):
                setattr(attn, attr, None)  # free the 16-bit weights
        setattr(attn, fused_attr, layer)
        attn.fused_projections = True
    else:
        parent_path, attr = group.name.rsplit(".", 1)
        parent = _get(block, parent_path)
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            parent[int(attr)] = layer
        else:
            setattr(parent, attr, layer)
    layer.cache_static_input = group.static_per_video


def _group_of(name: str) -> LinearGroup:
    for g in BLOCK_TABLE:
        if name.endswith("." + g.name) and name.startswith(BLOCKS_ATTR + "."):
            return g
    raise KeyError(f"unknown quantized layer name {name!r}; expected blocks.<i>.<one of {[g.name for g in BLOCK_TABLE]}>")


def attach_runtime(transformer: nn.Module, state: ExpertState) -> torch.utils.hooks.RemovableHandle:
    """Set the expert's timestep bin and text context once per forward."""

    def pre_hook(module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        ctx = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        state.set_timestep(t)
        state.set_context(ctx)

    old = getattr(transformer, "_wanquant_runtime_hook", None)
    if old is not None:
        old.remove()
    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    transformer._wanquant_runtime_hook = handle
    return handle


def layer_input_kind(name: str) -> InputKind:
    return _group_of(name).input
