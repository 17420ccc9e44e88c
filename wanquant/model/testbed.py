"""The testbed's architecture: a small Wan2.2-I2V-A14B-form two-expert pipeline, built or loaded.

Every component is a real diffusers/transformers class in the A14B I2V layout, only
small: ``AutoencoderKLWan`` (z_dim 16), two ``WanTransformer3DModel`` experts (in 36 =
16 noisy latents + 4 mask + 16 condition latents, out 16, patch (1, 2, 2), no image
encoder), ``boundary_ratio`` 0.9, a UMT5 text encoder with a word-level tokenizer, and
the flow-matching ``UniPCMultistepScheduler`` of the Wan2.2 diffusers release.

The VAE compresses 4x in space (not 8x as Wan) so that a 64x64 clip still gives 16x16
latents, 8x8 tokens per latent frame: small shapes survive the compression.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from wanquant.model.pipeline import load_pipeline
from wanquant.testbed import WEIGHTS_DIR
from wanquant.testbed.dataset import DEFAULT_FRAMES, DEFAULT_SIZE
from wanquant.testbed.tokenizer import DEFAULT_MAX_LENGTH, build_tokenizer

# Wan2.2 I2V: the high-noise expert runs while t >= boundary_ratio * num_train_timesteps.
BOUNDARY_RATIO = 0.9
NUM_TRAIN_TIMESTEPS = 1000
# The diffusers conversion of Wan2.2-I2V-A14B samples with flow_shift 3.0.
FLOW_SHIFT = 3.0


@dataclass(frozen=True)
class TestbedConfig:
    """Sizes of the testbed's components (defaults: what the committed weights use)."""

    # Transformer experts.
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    ffn_dim: int = 1024
    freq_dim: int = 256
    # Text encoder (UMT5); its width is the transformers' text_dim.
    text_dim: int = 256
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 512
    # VAE.
    vae_base_dim: int = 32
    vae_dim_mult: tuple[int, ...] = (1, 2, 2)
    vae_res_blocks: int = 1
    z_dim: int = 16
    # Sampling defaults of the testbed (height/width must be multiples of 16).
    height: int = DEFAULT_SIZE
    width: int = DEFAULT_SIZE
    num_frames: int = DEFAULT_FRAMES
    max_sequence_length: int = DEFAULT_MAX_LENGTH

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# ------------------------------------------------------------------------- components


def build_text_encoder(cfg: TestbedConfig, vocab_size: int) -> UMT5EncoderModel:
    """A small randomly initialised UMT5 encoder (kept frozen in training)."""
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=cfg.text_dim,
        d_kv=cfg.text_dim // cfg.text_heads,
        d_ff=cfg.text_ff,
        num_layers=cfg.text_layers,
        num_heads=cfg.text_heads,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )
    return UMT5EncoderModel(config).eval()


def build_vae(cfg: TestbedConfig) -> AutoencoderKLWan:
    """Wan's causal video VAE: 4x temporal, 4x spatial compression, z_dim latents.

    ``latents_mean``/``latents_std`` start at 0/1; training replaces them with the
    statistics of the trained encoder, as Wan's release does.
    """
    n_down = len(cfg.vae_dim_mult) - 1
    return AutoencoderKLWan(
        base_dim=cfg.vae_base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.vae_dim_mult),
        num_res_blocks=cfg.vae_res_blocks,
        attn_scales=[],
        # Every downsample halves time too, so two of them give Wan's 4x temporal factor.
        temperal_downsample=[True] * n_down,
        latents_mean=[0.0] * cfg.z_dim,
        latents_std=[1.0] * cfg.z_dim,
        scale_factor_temporal=2**n_down,
        scale_factor_spatial=2**n_down,
    )


def build_expert(cfg: TestbedConfig) -> WanTransformer3DModel:
    """One expert in the A14B I2V layout: in 2*z+4 channels, out z, no image encoder."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=2 * cfg.z_dim + 4,
        out_channels=cfg.z_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
    )


def build_scheduler(flow_shift: float = FLOW_SHIFT) -> UniPCMultistepScheduler:
    """UniPC in flow-matching mode, configured as the Wan2.2 diffusers release."""
    return UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
    )


def build_testbed_pipeline(seed: int = 0, config: TestbedConfig | None = None) -> WanImageToVideoPipeline:
    """The testbed pipeline with freshly (randomly) initialised components."""
    cfg = config or TestbedConfig()
    tokenizer = build_tokenizer(cfg.max_sequence_length)
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(cfg, vocab_size=len(tokenizer))
    vae = build_vae(cfg)
    transformer = build_expert(cfg)
    transformer_2 = build_expert(cfg)
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=build_scheduler(),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=BOUNDARY_RATIO,
    )
    return pipe


# ----------------------------------------------------------------------------- loading


def load_testbed_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                          path: str | Path | None = None, vae_dtype: torch.dtype | None = torch.float32,
                          with_experts: bool = True) -> WanImageToVideoPipeline:
    """The trained testbed from ``wanquant/testbed/weights`` (no network), through the one
    pipeline loader. The VAE runs in ``vae_dtype`` (float32, as Wan's own examples run
    their VAE), or in ``dtype`` if None."""
    return load_pipeline(path or WEIGHTS_DIR, device, dtype, with_experts=with_experts, vae_dtype=vae_dtype)
