"""The Wan2.2-I2V-A14B pipeline with RANDOM weights, built directly on the device.

Random values change neither memory nor kernel time (DESIGN.md section 7), so the real
A14B configuration (two ``WanTransformer3DModel`` experts, UMT5-XXL encoder, Wan VAE,
UniPC flow-matching scheduler with shift 5) measures the real thing without the
checkpoint. Nothing big is ever built on the CPU: modules are constructed on the meta
device and materialised in place on the target device; quantized layers are created
directly as ``W4A4Linear`` (random packed MXFP4 codes, E8M0 scales around 2^-8, rank-r
BF16 branch, bias, three-bin clip tables), so no BF16 copy of a quantized expert exists.

``TINY_*`` are the same builders at toy sizes (CPU dry runs); :func:`tiny_testbed_pipeline`
is the testbed at test size, what the multi-GPU dry run calibrates and generates with.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

HIGH, LOW = "high", "low"

A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
# google/umt5-xxl as transformers defines it (encoder only is used by the pipeline).
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
                num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                dropout_rate=0.1, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
VAE_FULL: dict = {}  # AutoencoderKLWan() defaults = the Wan2.1 VAE that A14B uses

TINY_EXPERT = dict(A14B, num_attention_heads=2, attention_head_dim=32, text_dim=32, freq_dim=32, ffn_dim=128,
                   num_layers=2, rope_max_seq_len=64)
TINY_UMT5 = dict(UMT5_XXL, vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                 num_heads=2)
TINY_VAE = dict(base_dim=16, num_res_blocks=1)
# The testbed architecture at test size (tests/conftest.py's TINY).
TINY_TESTBED = dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=64,
                    text_layers=1, text_heads=2, text_ff=128, vae_base_dim=16, height=32, width=32, num_frames=5,
                    max_sequence_length=32)

BOUNDARY_RATIO = 0.9
FLOW_SHIFT = 5.0
PROMPT = "a cat walks on the grass in the sunlight"
NEGATIVE = "blurry static low quality"
WORDS = sorted(set((PROMPT + " " + NEGATIVE).split()))


# ---------------------------------------------------------------------------------------
# building on the device without a CPU copy
def _init_(t: torch.Tensor, pname: str, module: nn.Module) -> None:
    """Random values of a realistic magnitude: norms 1, biases 0, weights ~ N(0, 1/fan_in)."""
    cls = type(module).__name__.lower()
    if pname in ("gamma",) or ("norm" in cls and pname == "weight"):
        t.fill_(1.0)
    elif pname in ("bias", "beta"):
        t.zero_()
    elif t.ndim >= 2 and "embedding" not in cls:
        t.normal_(0.0, 1.0 / math.sqrt(max(1, t.numel() // t.shape[0])))
    else:
        t.normal_(0.0, 0.02 if t.ndim < 2 else 1.0)


def materialize_(module: nn.Module, device: torch.device, dtype_of: Callable[[str], torch.dtype]) -> None:
    """Give every meta parameter real storage on ``device`` (random values), keep ties,
    and move real buffers (rotary tables, ...) there in their own dtype."""
    memo: dict[int, nn.Parameter] = {}
    for mname, mod in module.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in memo:
                full = f"{mname}.{pname}" if mname else pname
                t = torch.empty(p.shape, dtype=dtype_of(full), device=device)
                with torch.no_grad():
                    _init_(t, pname, mod)
                memo[id(p)] = nn.Parameter(t, requires_grad=False)
            mod._parameters[pname] = memo[id(p)]
        for bname, b in list(mod._buffers.items()):
            if b is not None and (b.is_meta or b.device.type != device.type):
                if b.is_meta:
                    raise RuntimeError(f"buffer {mname}.{bname} is on meta: build with include_buffers=False")
                mod._buffers[bname] = b.to(device)
    module.requires_grad_(False)


def build_text_encoder(cfg: dict, device: torch.device) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import UMT5Config, UMT5EncoderModel

    with init_empty_weights(include_buffers=False):
        model = UMT5EncoderModel(UMT5Config(**cfg))
    materialize_(model, device, lambda name: torch.bfloat16)
    emb = model.get_input_embeddings()
    if model.encoder.embed_tokens is not None and model.encoder.embed_tokens.weight is not emb.weight:
        model.encoder.embed_tokens.weight = emb.weight  # the tie the checkpoint would have
    return model.eval()


def build_vae(cfg: dict, device: torch.device) -> nn.Module:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKLWan(**cfg)
    materialize_(vae, device, lambda name: torch.float32)  # diffusers' Wan examples load the VAE in fp32
    return vae.eval()


def expert_dtype_rule(model_cls) -> Callable[[str], torch.dtype]:
    """bf16 except diffusers' ``_keep_in_fp32_modules`` (what from_pretrained(torch_dtype=bf16) gives)."""
    keep = tuple(getattr(model_cls, "_keep_in_fp32_modules", None) or ())

    def rule(name: str) -> torch.dtype:
        return torch.float32 if any(k in name.split(".") for k in keep) else torch.bfloat16

    return rule


def random_qparams(n: int, k: int, rank: int, bins: int, device: torch.device):
    from wanquant.method.params import QuantizedLinearParams

    return QuantizedLinearParams(
        qweight=torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device),
        wscales=torch.randint(118, 121, (n, k // 32), dtype=torch.uint8, device=device),  # 2^-9 .. 2^-7
        smooth=torch.rand(k, device=device) + 0.5,
        l1=(torch.randn(rank, k, device=device) / math.sqrt(k)).to(torch.bfloat16),
        l2=(torch.randn(n, rank, device=device) * 0.01).to(torch.bfloat16),
        bias=(torch.randn(n, device=device) * 0.01).to(torch.bfloat16),
        clip_table=torch.tensor([[1.0, 0.0], [0.9, 0.0], [0.8, 1.0]][:bins], device=device),
    )


def build_expert(cfg: dict, quantized: bool, device: torch.device, qcfg) -> nn.Module:
    """One Wan expert on ``device``; ``quantized``: block linears are W4A4Linear from the start."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from wanquant.model.wan import BLOCK_TABLE, BLOCKS_ATTR, install_layer
    from wanquant.runtime.linear import W4A4Linear

    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel.from_config(cfg)
    if quantized:
        bins = qcfg.bins_for(HIGH).num_bins
        for i, block in enumerate(getattr(model, BLOCKS_ATTR)):
            for group in BLOCK_TABLE:
                members = [block.get_submodule(m) for m in group.members]
                n, k = sum(m.out_features for m in members), members[0].in_features
                params = random_qparams(n, k, qcfg.lowrank.rank, bins, device)
                layer = W4A4Linear.from_params(params, qcfg.weight_format, qcfg.act_format)
                install_layer(model, f"{BLOCKS_ATTR}.{i}.{group.name}", layer)
                del params, layer
    materialize_(model, device, expert_dtype_rule(WanTransformer3DModel))
    return model.eval()


def build_tokenizer(max_length: int):
    """A word-level tokenizer of :data:`PROMPT` and :data:`NEGATIVE` (other words map to <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length, padding_side="right")


def build_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT,
                                   num_train_timesteps=1000)


# ---------------------------------------------------------------------------------------
# whole pipelines
def random_a14b_pipeline(device: torch.device, layers: int | None, quantized: bool, qcfg, max_len: int):
    """The whole A14B I2V pipeline with random weights on ``device``, VAE tiling on.

    ``layers`` keeps that many blocks per expert (None: all 40); ``quantized`` experts are
    bound to their timestep bins. Seeded: every rank and every run builds the same weights.
    """
    from diffusers import WanImageToVideoPipeline

    # Every rank (and every GPU count) must build the same weights: the calibration run id
    # checks it, and context parallelism only splits the 1-GPU model if they agree.
    torch.manual_seed(0)
    cfg = dict(A14B, num_layers=layers or A14B["num_layers"])
    experts = [build_expert(cfg, quantized, device, qcfg) for _ in range(2)]
    pipe = WanImageToVideoPipeline(tokenizer=build_tokenizer(max_len), text_encoder=build_text_encoder(UMT5_XXL, device),
                                   vae=build_vae(VAE_FULL, device), scheduler=build_scheduler(),
                                   transformer=experts[0], transformer_2=experts[1], boundary_ratio=BOUNDARY_RATIO)
    pipe.vae.enable_tiling()
    if quantized:
        bind_experts(pipe, qcfg)
    return pipe


def bind_experts(pipe, qcfg) -> None:
    """Bind each quantized expert of ``pipe`` to its timestep bins (what loading a checkpoint does)."""
    from wanquant.model.wan import experts_of
    from wanquant.model.wan import bind_expert

    for e in experts_of(pipe):
        bind_expert(e.module, e.timestep_bins(qcfg))


def tiny_testbed_pipeline(device, dtype):
    """The untrained testbed at :data:`TINY_TESTBED` size (seed 0) on ``device``."""
    from wanquant.model.testbed import TestbedConfig, build_testbed_pipeline

    torch.manual_seed(0)
    return build_testbed_pipeline(seed=0, config=TestbedConfig(**TINY_TESTBED)).to(device, dtype)
