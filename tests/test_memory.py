"""Token chunking and cache policies of ``wanquant.runtime.memory`` (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from wanquant.model.wan import BLOCK_TABLE, BLOCKS_ATTR, install_layer
from wanquant.formats import MXFP4
from wanquant.method.params import QuantizedLinearParams
from wanquant.runtime import memory
from wanquant.runtime.linear import W4A4Linear
from wanquant.model import block as chunking
from wanquant.model.wan import bind_expert, blocks_of, set_static_kv_cache
from wanquant.runtime.expert import quantized_layers, set_backend
from wanquant.runtime.state import TimestepBins

torch.set_num_threads(1)

DIM, HEADS, FFN, TEXT = 64, 2, 128, 32


def tiny_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=DIM // HEADS, in_channels=4,
        out_channels=4, text_dim=TEXT, freq_dim=32, ffn_dim=FFN, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, rope_max_seq_len=64,
    ).float().eval()
    with torch.no_grad():  # non-trivial modulation and norms so every term matters
        for name, p in model.named_parameters():
            if "scale_shift_table" in name or name.endswith("norm_q.weight") or name.endswith("norm_k.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def inputs(frames: int = 3, height: int = 6, width: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, frames, height, width, generator=g)
    ctx = torch.randn(1, 7, TEXT, generator=g)
    return x, torch.tensor([700.0]), ctx


def run(model, x, t, ctx):
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]


def random_params(n: int, k: int, rank: int, bins: int, g: torch.Generator) -> QuantizedLinearParams:
    return QuantizedLinearParams(
        qweight=torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
        wscales=torch.randint(120, 124, (n, k // 32), dtype=torch.uint8, generator=g),
        smooth=torch.rand(k, generator=g) + 0.5,
        l1=(torch.randn(rank, k, generator=g) * 0.05).bfloat16(),
        l2=(torch.randn(n, rank, generator=g) * 0.05).bfloat16(),
        bias=(torch.randn(n, generator=g) * 0.01).bfloat16(),
        clip_table=torch.tensor([[1.0, 0.0], [0.9, 0.0], [0.8, 1.0]][:bins]),
    )


def quantize_randomly(model, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    blocks = getattr(model, BLOCKS_ATTR)
    for i, block in enumerate(blocks):
        for group in BLOCK_TABLE:
            members = [block.get_submodule(m) for m in group.members]
            n, k = sum(m.out_features for m in members), members[0].in_features
            layer = W4A4Linear.from_params(random_params(n, k, 8, 3, g), MXFP4, MXFP4)
            install_layer(model, f"{BLOCKS_ATTR}.{i}.{group.name}", layer)
    set_backend(model, "reference")
    bind_expert(model, TimestepBins(1000.0, 0.0, (0.33, 0.66)))
    return model


@pytest.mark.parametrize("chunk", [16, 7, 45, 1000])
def test_block_chunking_matches_bf16_path(chunk):
    model = tiny_transformer()
    x, t, ctx = inputs()  # 3 x 3 x 5 = 45 tokens: 16 and 7 do not divide it
    ref = run(model, x, t, ctx)
    chunking.enable_token_chunking(model, chunk)
    assert chunking.token_chunking_of(model) == (chunk, "block")
    out = run(model, x, t, ctx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    chunking.disable_token_chunking(model)
    assert chunking.token_chunking_of(model) is None
    assert all("forward" not in b.__dict__ and "forward" not in b.ffn.__dict__ for b in model.blocks)
    torch.testing.assert_close(run(model, x, t, ctx), ref, rtol=0, atol=0)


def test_ffn_scope_matches():
    model = tiny_transformer()
    x, t, ctx = inputs()
    ref = run(model, x, t, ctx)
    chunking.enable_token_chunking(model, 16, scope="ffn")
    assert "forward" in model.blocks[0].ffn.__dict__ and "forward" not in model.blocks[0].__dict__
    torch.testing.assert_close(run(model, x, t, ctx), ref, rtol=1e-5, atol=1e-5)
    chunking.enable_token_chunking(model, 10)  # switching scope replaces the wrappers
    assert "forward" not in model.blocks[0].ffn.__dict__ and "forward" in model.blocks[0].__dict__
    torch.testing.assert_close(run(model, x, t, ctx), ref, rtol=1e-5, atol=1e-5)


def test_chunking_quantized_expert_and_cache_policy():
    model = quantize_randomly(tiny_transformer())
    assert len(quantized_layers(model)) == 2 * len(BLOCK_TABLE)
    x, t, ctx = inputs(frames=2, height=8, width=6)  # 2 x 4 x 3 = 24 tokens
    ref = run(model, x, t, ctx)
    assert memory.static_cache_bytes(model) > 0  # attn2.to_kv cached its output per context
    chunking.enable_token_chunking(model, 10)
    torch.testing.assert_close(run(model, x, t, ctx), ref, rtol=1e-5, atol=1e-5)
    assert set_static_kv_cache(model, False) == 2
    assert memory.static_cache_bytes(model) == 0
    torch.testing.assert_close(run(model, x, t, ctx), ref, rtol=1e-5, atol=1e-5)
    assert memory.static_cache_bytes(model) == 0
    set_static_kv_cache(model, True)
    run(model, x, t, ctx)
    held = memory.static_cache_bytes(model)
    assert held == 2 * 7 * 2 * DIM * 4  # two blocks, 7 context tokens, k and v, fp32 here
    assert memory.release_static_caches(model) == held and memory.static_cache_bytes(model) == 0
    parts = memory.expert_memory_breakdown(model, blocks_of(model))
    assert parts["quantized_layers"] > 0 and parts["rest_16bit"] > 0 and parts["static_kv_cache"] == 0


def test_cache_release_hooks():
    a, b = quantize_randomly(tiny_transformer(0), 3), quantize_randomly(tiny_transformer(1), 4)
    decoder = torch.nn.Identity()
    handles = memory.install_cache_release([a, b], before=[decoder])
    x, t, ctx = inputs(frames=1, height=4, width=4)
    run(a, x, t, ctx)
    assert memory.static_cache_bytes(a) > 0
    run(b, x, t, ctx)  # the low-noise expert starts: the high-noise one's cache goes
    assert memory.static_cache_bytes(a) == 0 and memory.static_cache_bytes(b) > 0
    decoder(torch.zeros(1))
    assert memory.static_cache_bytes(b) == 0
    for h in handles:
        h.remove()


def test_per_token_modulation_block():
    """Wan2.2 TI2V passes a per-token temb [B, S, 6, D]; the chunked block slices it."""
    model = tiny_transformer()
    block = model.blocks[0]
    g = torch.Generator().manual_seed(5)
    s = 37
    h = torch.randn(1, s, DIM, generator=g)
    ctx = torch.randn(1, 7, DIM, generator=g)
    temb = torch.randn(1, s, 6, DIM, generator=g) * 0.1
    cos, sin = (torch.randn(1, s, 1, DIM // HEADS, generator=g, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        ref = block(h, ctx, temb, (cos, sin))
        chunking.enable_token_chunking(model, 8)
        out = block(h, ctx, temb, (cos, sin))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_token_chunks():
    for n, c in [(45, 16), (32760, 8192), (75600, 8192), (5, 100), (129, 128)]:
        parts = chunking.token_chunks(n, c)
        assert parts[0].start == 0 and parts[-1].stop == n
        assert all(p.stop == q.start for p, q in zip(parts, parts[1:]))
        assert all(0 < p.stop - p.start <= c for p in parts)
        assert len(parts) == -(-n // c)
    assert [p.stop - p.start for p in chunking.token_chunks(32760, 8192)] == [8192, 8192, 8192, 8184]
    with pytest.raises(ValueError):
        chunking.token_chunks(10, 0)
    with pytest.raises(ValueError):
        chunking.enable_token_chunking(tiny_transformer(), 8, scope="attention")
