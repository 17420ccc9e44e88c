"""Wan in diffusers: which linears are quantized, which share inputs, what stays 16-bit,
where the experts are, which timesteps each one runs, and how a quantized expert is put
together (layers installed, runtime hook, skeleton built from a config).

The model adapter is the package :mod:`wanquant.model`; this module is its core, and
everything model-specific in it is the declarative :data:`BLOCK_TABLE` plus a few named
attributes. The rest of wanquant works on the generic :class:`QuantTarget` list derived
from it. Sibling modules: ``block`` (token-chunked block forward), ``parallel``
(context parallelism), ``pipeline`` (loading and running pipelines),
``diffusers_quantizer`` (the ``"wanquant"`` quantization method), ``testbed`` (the small
Wan2.2-form model).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from wanquant.method.config import QuantConfig
from wanquant.runtime.expert import quantized_layers, share_state
from wanquant.runtime.linear import W4A4Linear
from wanquant.runtime.memory import release_static_caches
from wanquant.runtime.state import ExpertState, TimestepBins

InputKind = Literal["hidden", "text"]


@dataclass(frozen=True)
class LinearGroup:
    """One quantized layer of a transformer block, made of one or more source linears.

    ``members`` read the same input and are concatenated along their outputs into
    ``name`` (one smoothing vector, one L1, one activation quantization, one GEMM).
    ``static_per_video``: the input is the text context, the same at every step, so the
    output is cached per context (cond / uncond) and expert.
    ``after_attention``: the input is an attention output, written by an attention kernel
    rather than by elementwise work Inductor fuses; in compiled blocks the activation kernel
    then finds its row maxima itself (a separate reduction would read it once more).
    """

    name: str
    members: tuple[str, ...]
    input: InputKind = "hidden"
    static_per_video: bool = False
    after_attention: bool = False


# Wan2.1 / Wan2.2 `WanTransformerBlock`. Fused names are the attributes diffusers'
# `WanAttention` reads when `fused_projections` is set (`to_qkv`, `to_kv`).
BLOCK_TABLE: tuple[LinearGroup, ...] = (
    LinearGroup("attn1.to_qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    LinearGroup("attn1.to_out.0", ("attn1.to_out.0",), after_attention=True),
    LinearGroup("attn2.to_q", ("attn2.to_q",)),
    LinearGroup("attn2.to_kv", ("attn2.to_k", "attn2.to_v"), input="text", static_per_video=True),
    LinearGroup("attn2.to_out.0", ("attn2.to_out.0",), after_attention=True),
    LinearGroup("ffn.net.0.proj", ("ffn.net.0.proj",)),
    LinearGroup("ffn.net.2", ("ffn.net.2",)),
)
# Outside the blocks everything stays 16-bit: embedders, the output projection, norms and
# modulation tables are small and sensitive. (Wan2.1 I2V's add_k/add_v image projections
# are not in the table either, so they stay 16-bit too.)
KEEP_16BIT = ("patch_embedding", "condition_embedder", "proj_out", "norm_out", "scale_shift_table", "rope")
BLOCKS_ATTR = "blocks"
# Config keys that must agree between a checkpoint's expert and the pipeline's.
ARCH_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "in_channels",
             "out_channels", "text_dim", "patch_size", "image_dim")
# Non-persistent buffers (rotary tables) are saved too, under this prefix, so a reloaded
# expert computes exactly what the in-memory one did, whatever dtype the user cast them to.
BUFFER_PREFIX = "__buffer__."


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


def group_of(layer_name: str) -> LinearGroup:
    """The :data:`BLOCK_TABLE` entry of a quantized layer named ``blocks.{i}.{group}``."""
    parts = layer_name.split(".", 2)
    if len(parts) == 3 and parts[0] == BLOCKS_ATTR and parts[1].isdigit():
        for group in BLOCK_TABLE:
            if group.name == parts[2]:
                return group
    raise KeyError(f"{layer_name!r} is not a quantized layer of a Wan block (blocks.<i>.<one of "
                   f"{[g.name for g in BLOCK_TABLE]}>)")


def input_key(target: QuantTarget) -> str:
    """Targets of one expert with equal keys read the same tensor in every forward.

    Members of a group already share theirs; a ``text`` input is the expert's embedded
    context, which every block's cross-attention reads unchanged, so calibration keeps
    one set of statistics for all of them.
    """
    return f"{BLOCKS_ATTR}.*.{target.group.name}" if target.group.input == "text" else target.name


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

    def covers(self, t: float) -> bool:
        """Whether the pipeline runs this expert at timestep ``t``: the high-noise (or only)
        expert from the boundary up, the low-noise one below it (diffusers' Wan pipelines)."""
        return t >= self.t_end and (self.role != "low" or t < self.t_start)


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


def blocks_of(transformer: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an expert (what calibration passes and chunking walk)."""
    blocks = getattr(transformer, BLOCKS_ATTR, None)
    if blocks is None:
        raise TypeError(f"{type(transformer).__name__} has no `{BLOCKS_ATTR}`: not a Wan transformer")
    return blocks


def quant_targets(transformer: nn.Module, cfg: QuantConfig) -> list[QuantTarget]:
    """Every quantized layer of one expert, after the precision policy."""
    blocks = blocks_of(transformer)
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


def forward_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor | float, torch.Tensor]:
    """``(timestep, encoder_hidden_states)`` of a ``WanTransformer3DModel.forward`` call."""
    t = kwargs["timestep"] if "timestep" in kwargs else args[1]
    ctx = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
    return t, ctx


def attach_runtime(transformer: nn.Module, state: ExpertState) -> torch.utils.hooks.RemovableHandle:
    """Set the expert's timestep bin and text context once per forward."""

    def pre_hook(module, args, kwargs):
        t, ctx = forward_inputs(args, kwargs)
        state.set_timestep(t)
        state.set_context(ctx)

    old = getattr(transformer, "_wanquant_runtime_hook", None)
    if old is not None:
        old.remove()
    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    transformer._wanquant_runtime_hook = handle
    return handle


def bind_expert(model: nn.Module, bins: TimestepBins) -> ExpertState:
    """Give every quantized layer of an expert one shared state and hook the forward."""
    state = share_state(model, bins)
    attach_runtime(model, state)
    model._wanquant_state = state
    return state


def runtime_state(model: nn.Module) -> ExpertState | None:
    """The state :func:`bind_expert` attached, if its hook is still in place."""
    if getattr(model, "_wanquant_runtime_hook", None) is None:
        return None
    return getattr(model, "_wanquant_state", None)


def set_static_kv_cache(transformer: nn.Module, enabled: bool) -> int:
    """Turn the per-context cache of the text-input layers on or off; returns how many layers.

    Only layers the table marks static (``attn2.to_kv``) are turned on again. The cache
    holds 0.42 GB per expert and context at A14B size, to save about 2 TFLOP per forward.
    """
    n = 0
    for name, m in quantized_layers(transformer).items():
        try:
            static = layer_input_kind(name) == "text"
        except KeyError:
            static = False
        if static:
            m.cache_static_input = bool(enabled)
            n += 1
    if not enabled:
        release_static_caches(transformer)
    return n


# ---------------------------------------------------------------------------------------
# an expert as files: everything that is not a quantized layer, and a skeleton to load into
def export_rest(model: nn.Module, layer_names) -> dict[str, torch.Tensor]:
    """Everything of an expert that is not a quantized layer: parameters and buffers."""
    names = tuple(n + "." for n in layer_names)
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(names)}
    persistent = set(rest)
    for k, v in model.named_buffers():
        if k not in persistent and not k.startswith(names) and v is not None:
            rest[BUFFER_PREFIX + k] = v
    return rest


def split_saved_buffers(rest: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(state_dict entries, non-persistent buffers by module path)`` of an exported rest."""
    plain, buffers = {}, {}
    for k, v in rest.items():
        if k.startswith(BUFFER_PREFIX):
            buffers[k[len(BUFFER_PREFIX):]] = v
        else:
            plain[k] = v
    return plain, buffers


def restore_buffers(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Put saved non-persistent buffers back in place (on each buffer's current device)."""
    for path, value in buffers.items():
        mod_path, _, attr = path.rpartition(".")
        owner = model.get_submodule(mod_path) if mod_path else model
        old = owner._buffers.get(attr)
        owner._buffers[attr] = value if old is None or old.device.type == "meta" else value.to(old.device)


def empty_expert(config: dict) -> nn.Module:
    """A ``WanTransformer3DModel`` skeleton from its config, parameters on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights(include_buffers=False):
        return WanTransformer3DModel.from_config(config)


def architecture_differences(a: dict, b: dict) -> dict[str, tuple]:
    """The :data:`ARCH_KEYS` on which two expert configs disagree: ``{key: (a, b)}``."""
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    return {k: (a.get(k), b.get(k)) for k in ARCH_KEYS if norm(a.get(k)) != norm(b.get(k))}


def component_mismatch(pipe, expert_config: dict) -> str | None:
    """Why the pipeline's text encoder or VAE cannot feed an expert with this config, or None."""
    te, vae = getattr(pipe, "text_encoder", None), getattr(pipe, "vae", None)
    d_model = getattr(getattr(te, "config", None), "d_model", None)
    if d_model is not None and d_model != expert_config.get("text_dim"):
        return (f"its experts read text_dim {expert_config.get('text_dim')} but the pipeline's text encoder "
                f"gives {d_model}")
    z = getattr(getattr(vae, "config", None), "z_dim", None)
    if z is not None and expert_config.get("out_channels") not in (None, z):
        return (f"its experts predict {expert_config.get('out_channels')} latent channels but the pipeline's "
                f"VAE has {z}")
    return None


def layer_input_kind(name: str) -> InputKind:
    return _group_of(name).input


# ---------------------------------------------------------------------------------------
# LoRAs: which layer of an expert a LoRA on a diffusers module lands in
@dataclass(frozen=True)
class LoraSite:
    """Where a LoRA on the diffusers module ``module`` (``blocks.3.attn1.to_k``) acts.

    ``layer`` is the W4A4 layer holding it (``blocks.3.attn1.to_qkv``: the member's output
    rows are ``row0 .. row0 + rows``) or the module itself when it stayed 16-bit.
    """

    module: str
    layer_name: str
    layer: nn.Module
    row0: int
    rows: int
    in_features: int

    @property
    def quantized(self) -> bool:
        return isinstance(self.layer, W4A4Linear)


def _module_or_none(model: nn.Module, dotted: str) -> nn.Module | None:
    try:
        return model.get_submodule(dotted)
    except AttributeError:  # missing, or a fused member diffusers' attention set to None
        return None


def lora_site(transformer: nn.Module, module: str) -> LoraSite:
    """The :class:`LoraSite` of ``module`` in this expert; KeyError when the expert has no such
    module, TypeError when it is not a linear layer.

    A member of a quantized group maps into the fused layer (:data:`BLOCK_TABLE`). Wan's
    fused members (q|k|v, k|v) all have ``inner_dim`` outputs, so member ``j`` of ``m``
    holds rows ``j * N/m .. (j+1) * N/m``. Any other linear (embedders, ``proj_out``,
    the layers of blocks kept 16-bit) takes the LoRA as it is.
    """
    head, _, rest = module.partition(".")
    block, _, member = rest.partition(".")
    if head == BLOCKS_ATTR and block.isdigit():
        for group in BLOCK_TABLE:
            if member not in group.members:
                continue
            holder = f"{BLOCKS_ATTR}.{block}.{group.name}"
            layer = _module_or_none(transformer, holder)
            if isinstance(layer, W4A4Linear):
                m = len(group.members)
                if layer.out_features % m:
                    raise ValueError(f"{holder}: {layer.out_features} outputs do not split into {m} equal members")
                rows = layer.out_features // m
                return LoraSite(module, holder, layer, group.members.index(member) * rows, rows, layer.in_features)
    target = _module_or_none(transformer, module)
    if isinstance(target, nn.Linear):
        return LoraSite(module, module, target, 0, target.out_features, target.in_features)
    if target is not None:
        raise TypeError(f"{module} is a {type(target).__name__}, not a linear layer")
    raise KeyError(f"this {type(transformer).__name__} has no module {module}")

