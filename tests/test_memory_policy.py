"""Memory policies on the CPU: the auto table, the offload mechanics, and a tiny W4A4 pipeline
whose ``low`` generation equals ``resident`` bit for bit with only the running expert resident.

With ``device="cpu"`` the moves are real copies between two CPU buffers (the host copy and
a "device" buffer), so residency is observable: a resident group's modules point into its
device buffer, an evicted one's into the host copy.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import TINY_SETTINGS, tiny_sample
from torch import nn

from wanquant.model import offload as mo
from wanquant.model.pipeline import encode_prompts, run_pipeline
from wanquant.runtime.offload import (
    ALIGN,
    GroupSequence,
    TensorGroup,
    Transfer,
    module_slots,
    run_on_host,
)

GB = 1e9


# ---------------------------------------------------------------------------------------
# the plan (pure)
# A14B W4A4 as measured (benchmarks/results/full_scale.json): an expert on the device with the
# fast path's operands and the canonical L1/L2 in host memory, UMT5-XXL, the fp32 VAE.
A14B = mo.Footprint(expert=int(8.56 * GB), experts=2, text_encoder=int(11.36 * GB),
                    text_encoder_streamed=int(0.8 * GB), vae=int(0.51 * GB), scratch=int(0.07 * GB), dim=5120,
                    kv_cache=int(1.68 * GB), per_forward=int(0.52 * GB), blocks=40, block=int(0.2 * GB))
P480 = mo.VideoSize(32_760, 480 * 832 * 81, "480x832x81")
P720 = mo.VideoSize(75_600, 720 * 1280 * 81, "720x1280x81")


def test_decode_model_matches_the_measured_peaks():
    assert mo.decode_bytes(P480.pixels) / GB == pytest.approx(2.05, rel=0.03)
    assert mo.decode_bytes(P720.pixels) / GB == pytest.approx(4.18, rel=0.03)


def test_activation_model_matches_the_measured_peaks():
    # full_scale.json, W4A4 chunked blocks: 2.09 GB (480p, 8192), 4.01 (720p, 8192), 4.44 (720p, 16384)
    for video, chunk, measured in ((P480, 8192, 2.09), (P720, 8192, 4.01), (P720, 16384, 4.44)):
        assert mo.activation_bytes(video.tokens, chunk, 5120) / GB == pytest.approx(measured, rel=0.03)
    # unchunked is the stock block: 3.73 / 8.60 GB measured; the model errs on the safe side
    for video, measured in ((P480, 3.73), (P720, 8.60)):
        est = mo.activation_bytes(video.tokens, None, 5120) / GB
        assert measured <= est <= measured * 1.1
    assert mo.activation_bytes(100, 8192, 5120) == mo.activation_bytes(100, None, 5120)  # fits one chunk


@pytest.mark.parametrize("budget_gb, video, policy, te, chunk", [
    (78.0, P480, "resident", "device", None),     # an 80 GB H100: everything, unchunked
    (23.0, P480, "resident", "stream", None),     # a 24 GB card at 480p: experts resident, encoder streams
    (23.0, P720, "resident", "stream", 16384),    # at 720p too, with larger chunks (the full_scale setting)
    (21.0, P720, "low", "stream", 16384),         # a little less: one expert (unchunked leaves too many holes)
    (15.0, P720, "low", "stream", 8192),          # 16 GB card (less the CUDA context): 16384 measured 15.4 GB
    (11.0, P480, "low", "stream", 8192),          # 12 GB card
])
def test_auto_table(budget_gb, video, policy, te, chunk):
    plan = mo.plan_memory("auto", A14B, video, "cuda:0", budget_gb * GB)
    assert (plan.policy, plan.text_encoder, plan.chunk_tokens, plan.fits) == (policy, te, chunk, True)
    assert mo.reserved_for(plan.need_bytes) <= budget_gb * GB
    assert video.label in plan.reason and f"{budget_gb:.1f} GB" in plan.reason
    assert plan.describe().startswith(f"memory=auto: {policy}")


def test_auto_takes_the_fastest_arrangement_that_fits():
    fits = [mo.plan_memory("auto", A14B, P480, "cuda", b * GB) for b in (78, 23, 11)]
    assert [p.policy for p in fits] == ["resident", "resident", "low"]
    assert [p.kv_cache for p in fits] == [True, False, False]  # the text k/v cache only with room to spare
    # a smaller budget never gets a larger chunk for the same policy
    lows = [mo.plan_memory("low", A14B, P720, "cuda", b * GB).chunk_tokens for b in (30, 15, 12.5, 12)]
    sizes = [1 << 30 if c is None else c for c in lows]
    assert sizes == sorted(sizes, reverse=True) and lows[0] is None


def test_too_small_a_budget_warns_instead_of_failing():
    plan = mo.plan_memory("auto", A14B, P720, "cuda", 4 * GB)
    assert plan.policy == "low" and not plan.fits and plan.chunk_tokens == mo.CHUNK_CHOICES[-1]
    assert plan.kept_blocks == 0  # the least it can do: every block streamed
    assert "may run out of memory" in plan.reason
    forced = mo.plan_memory("resident", A14B, P480, "cuda", 11 * GB)
    assert forced.policy == "resident" and not forced.fits


def test_low_streams_the_blocks_that_do_not_fit():
    # one expert whole fits 15 GB at 720p; under 11 GB some blocks stream, fewer as the budget shrinks
    assert mo.plan_memory("low", A14B, P720, "cuda", 15 * GB).kept_blocks is None
    kept = []
    for budget_gb in (11.0, 10.0, 9.0, 8.0, 7.0):
        plan = mo.plan_memory("low", A14B, P480, "cuda", budget_gb * GB)
        assert plan.fits and plan.chunk_tokens == mo.DEFAULT_CHUNK and 0 <= plan.kept_blocks < A14B.blocks
        assert mo.reserved_for(plan.need_bytes) <= budget_gb * GB
        # one more kept block would not fit: the plan keeps as many as the budget allows
        more = mo.low_bytes(A14B, P480, plan.chunk_tokens, plan.kept_blocks + 1)
        assert mo.reserved_for(more) > budget_gb * GB
        assert f"{plan.kept_blocks} blocks kept" in plan.describe()
        kept.append(plan.kept_blocks)
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    # brute force: the denoising peak of `low` is what stays plus the streaming window plus activations
    k = kept[0]
    act = mo.activation_bytes(P480.tokens, mo.DEFAULT_CHUNK, A14B.dim)
    largest = max(s.stop - s.start for s in mo.token_chunks(P480.tokens, mo.DEFAULT_CHUNK))
    holes = mo.LOW_FRAGMENT_CHUNKS * mo.CHUNK_BYTES_PER_TOKEN_DIM * A14B.dim * largest  # the allocator's holes
    by_hand = (A14B.rest + k * A14B.block + mo.STREAM_WINDOW * A14B.block + A14B.scratch + act + holes
               + mo.LOW_SLACK)
    assert mo.low_bytes(A14B, P480, mo.DEFAULT_CHUNK, k) == int(by_hand)


def test_low_plans_reserved_memory_as_measured_at_720p():
    """The 9003b3d H100 run: low at 720p with chunks of 16384 reserved 15.40 GB (allocated
    12.76) under a 15 GB budget. The plan must not pick that chunk again, and what it picks
    must leave room for the measured holes (2.64 GB at 16384, scaled to its chunk)."""
    plan = mo.plan_memory("low", A14B, P720, "cuda", 15 * GB)
    assert plan.chunk_tokens is not None and plan.chunk_tokens < 16384 and plan.kept_blocks is None
    need_16384 = mo.low_bytes(A14B, P720, 16384)
    assert mo.reserved_for(need_16384) > 15 * GB
    largest = max(s.stop - s.start for s in mo.token_chunks(P720.tokens, plan.chunk_tokens))
    measured_holes = 2.64 * GB * largest / 15232  # 75,600 tokens in chunks of 16384: 15,232 each
    assert mo.reserved_for(plan.need_bytes) <= 15 * GB
    assert mo.low_bytes(A14B, P720, plan.chunk_tokens) - mo.fragment_bytes(P720.tokens, plan.chunk_tokens, A14B.dim) \
        + measured_holes <= 15 * GB


def test_explicit_policy_and_chunk():
    plan = mo.plan_memory("resident", A14B, P480, "cuda", 23 * GB, chunk_tokens=8192)
    assert (plan.policy, plan.text_encoder, plan.chunk_tokens) == ("resident", "stream", 8192)
    low = mo.plan_memory("low", A14B, P480, "cuda", 78 * GB)
    assert (low.policy, low.text_encoder, low.chunk_tokens) == ("low", "stream", None)
    with pytest.raises(ValueError, match="memory policy"):
        mo.plan_memory("lowest", A14B, P480, "cuda", 1.0)


def test_without_a_budget_auto_is_resident():
    plan = mo.plan_memory("auto", A14B, P480, "cpu", None)
    assert (plan.policy, plan.text_encoder, plan.chunk_tokens, plan.budget_bytes) == (
        "resident", "device", mo.DEFAULT_CHUNK, None)
    assert mo.device_budget("cpu")[0] is None


# ---------------------------------------------------------------------------------------
# mechanics (wanquant.runtime.offload)
class Probe(nn.Module):
    """A module taking part in offloading: a buffer it keeps in host memory, device state it drops."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))
        self.register_buffer("host_only", torch.arange(8.0))
        self.released = 0

    def host_resident_buffers(self, device):
        return ("host_only",)

    def release_device_state(self):
        self.released += 1

    def forward(self, x):
        return self.lin(x) * self.scale + self.host_only


def _inside(t: torch.Tensor, buf: torch.Tensor) -> bool:
    return buf.data_ptr() <= t.data_ptr() < buf.data_ptr() + buf.numel()


def test_group_moves_in_and_out_without_changing_results(seed):
    m = Probe()
    x = torch.randn(3, 8)
    expected = m(x)
    weight = m.lin.weight
    group = TensorGroup("probe", module_slots([m], "cpu"), "cpu")
    assert len(group.entries) == 3  # lin.weight, lin.bias, scale; host_only stays out
    assert all(e.offset % ALIGN == 0 for e in group.entries)
    assert _inside(m.lin.weight, group.host) and not _inside(m.host_only, group.host)
    assert not group.resident and torch.equal(m(x), expected)
    group.onload(Transfer("cpu"))
    group.wait()
    assert group.resident and all(group.holds(t) for t in (m.lin.weight, m.lin.bias, m.scale))
    assert not _inside(m.lin.weight, group.host)
    assert torch.equal(m(x), expected)
    group.evict()
    assert not group.resident and _inside(m.lin.weight, group.host) and torch.equal(m(x), expected)
    assert m.lin.weight is weight  # the Parameter object stays (ties, hooks)
    assert m.released == 3  # built, moved in, moved out


def test_tied_weights_stay_tied():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    group = TensorGroup("tied", module_slots([nn.ModuleList([a, b])], "cpu"), "cpu")
    assert len(group.entries) == 3  # one weight, two biases
    group.onload(Transfer("cpu"))
    assert a.weight is b.weight and group.holds(b.weight)
    group.evict()
    assert a.weight is b.weight and _inside(a.weight, group.host)


@pytest.mark.parametrize("keep", [False, True])
def test_sequence_moves_one_ahead_and_evicts_behind(seed, keep):
    layers = nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)])
    x = torch.randn(2, 6)
    expected = layers(x)
    groups = [TensorGroup(f"l{i}", module_slots([m], "cpu"), "cpu") for i, m in enumerate(layers)]
    seq = GroupSequence("seq", groups, Transfer("cpu"), keep=keep, lookahead=1)
    seq.hook(list(layers))
    seen = []
    for i, m in enumerate(layers):  # registered after the sequence's hooks: runs after them
        m.register_forward_pre_hook(lambda mod, args, i=i: seen.append([g.resident for g in groups]))
    assert torch.equal(layers(x), expected)
    for i, resident in enumerate(seen):
        assert resident[i] and resident[i + 1:i + 2] == [True] * len(resident[i + 1:i + 2])  # this one, the next
        assert not any(resident[i + 2:])  # nothing further ahead
        assert all(resident[:i]) if keep else not any(resident[:i])  # behind: kept or gone
    assert seq.resident if keep else not seq.any_resident()


def test_sequence_keeps_some_groups_and_streams_the_others(seed):
    layers = nn.Sequential(*[nn.Linear(6, 6) for _ in range(5)])
    x = torch.randn(2, 6)
    expected = layers(x)
    keep = [True, False, True, False, False]
    groups = [TensorGroup(f"l{i}", module_slots([m], "cpu"), "cpu") for i, m in enumerate(layers)]
    seq = GroupSequence("seq", groups, Transfer("cpu"), keep=keep, lookahead=1)
    seq.hook(list(layers))
    assert seq.kept_nbytes == groups[0].nbytes + groups[2].nbytes
    for _ in range(2):  # the second pass finds the kept groups in and streams the others again
        seen = []
        hooks = [m.register_forward_pre_hook(lambda mod, args, seen=seen: seen.append([g.resident for g in groups]))
                 for m in layers]
        assert torch.equal(layers(x), expected)
        for h in hooks:
            h.remove()
        for i, resident in enumerate(seen):
            assert resident[i] and all(resident[j] == keep[j] for j in range(i))  # behind: only the kept
            assert not any(resident[j] for j in range(i + 2, len(groups)) if not keep[j])  # one ahead at most
        assert [g.resident for g in groups] == keep
    with pytest.raises(ValueError, match="keep flags"):
        GroupSequence("bad", groups, Transfer("cpu"), keep=[True])


def test_run_on_host_keeps_the_module_in_host_memory():
    emb = nn.Embedding(10, 4)
    run_on_host(emb, "meta")  # a "device" that holds no data: only the output goes there
    out = emb(torch.tensor([[1, 2, 3]]))
    assert out.device.type == "meta" and out.shape == (1, 3, 4)
    assert emb.weight.device.type == "cpu"


def test_w4a4_layer_offload_protocol(seed):
    from benchmarks.common.a14b import random_qparams
    from wanquant.method.config import wanquant_preset
    from wanquant.runtime.linear import W4A4Linear

    cfg = wanquant_preset()
    layer = W4A4Linear.from_params(random_qparams(64, 64, 8, 3, torch.device("cpu")), cfg.weight_format,
                                   cfg.act_format)
    assert layer.host_resident_buffers("cpu") == ()  # no fast path on a CPU: every buffer moves
    x = torch.randn(5, 64)
    y = layer(x)
    assert layer._resolved == "reference"
    layer.release_device_state()
    assert layer._resolved is None and layer._fast is None
    assert torch.equal(layer(x), y)


# ---------------------------------------------------------------------------------------
# the tiny W4A4 pipeline
@pytest.fixture(scope="module")
def q_pipe(tiny_quantized_pipe):
    return tiny_quantized_pipe


def _generate(pipe):
    ev = tiny_sample()
    return run_pipeline(pipe, ev.first_frame(), ev.prompt, TINY_SETTINGS, seed=0)


def _apply(pipe, memory):
    s = TINY_SETTINGS
    return mo.apply_memory_policy(pipe, mo.plan_for(pipe, memory, "cpu", s.height, s.width, s.num_frames))


def test_low_equals_resident_bit_for_bit_and_runs_only_the_resident_expert(q_pipe):
    _apply(q_pipe, "resident")
    expected = _generate(q_pipe)
    _apply(q_pipe, "low")
    state = mo.memory_state_of(q_pipe)
    assert set(state.experts) == {"transformer", "transformer_2"}
    text_layers = [m for n, m in mo.quantized_layers(q_pipe.transformer).items() if n.endswith("attn2.to_kv")]
    assert text_layers and not any(m.cache_static_input for m in text_layers)  # off in low
    checks = []

    def probe(attr, other, index):
        def hook(module, args, output):
            own = state.experts[attr].groups[index + 1]  # group 0 is the expert's rest
            tensors = [t for t in (*module.parameters(), *module.buffers()) if t.numel()]
            checks.append((attr, own.resident and all(own.holds(t) for t in tensors),
                           state.experts[other].any_resident() or state.per_forward[other].any_resident()
                           or state.per_forward[attr].any_resident(),  # embedders only while they run
                           state.vae.resident))
        return hook

    handles, embedders_in = [], []
    for attr, other in (("transformer", "transformer_2"), ("transformer_2", "transformer")):
        blocks = mo.blocks_of(getattr(q_pipe, attr))
        handles += [b.register_forward_hook(probe(attr, other, i)) for i, b in enumerate(blocks)]
        handles.append(getattr(q_pipe, attr).condition_embedder.register_forward_pre_hook(
            lambda m, args, attr=attr: embedders_in.append(state.per_forward[attr].resident)))
    try:
        out = _generate(q_pipe)
    finally:
        for h in handles:
            h.remove()
    assert np.array_equal(out, expected)
    assert {c[0] for c in checks} == {"transformer", "transformer_2"}
    assert all(own and not others and not vae for _, own, others, vae in checks), checks
    assert len(embedders_in) == 2 * TINY_SETTINGS.num_inference_steps and all(embedders_in)  # every forward
    # The last expert left before decoding; the VAE stays for the next video's encoding.
    assert not any(seq.any_resident() for seq in state.experts.values()) and state.vae.resident
    # A second video (the high-noise expert comes back) is the same video.
    assert np.array_equal(_generate(q_pipe), expected)


def test_low_streams_the_blocks_it_does_not_keep(q_pipe):
    """One block kept, the other streamed: the same video, bit for bit; while an expert runs,
    its kept block stays, its streamed block is in only around its own forward (with its
    canonical L1/L2, which a streamed fast-path layer rebuilds from), the other expert and
    the VAE are out; resident keeps both experts but not the VAE while denoising."""
    _apply(q_pipe, "resident")
    expected = _generate(q_pipe)
    state = mo.memory_state_of(q_pipe)
    vae_in = []
    handle = q_pipe.transformer.blocks[0].register_forward_pre_hook(lambda m, a: vae_in.append(state.vae.resident))
    try:
        assert np.array_equal(_generate(q_pipe), expected)
    finally:
        handle.remove()
    assert vae_in and not any(vae_in) and state.vae.resident  # out while denoising, back for decoding

    s = TINY_SETTINGS
    plan = mo.plan_for(q_pipe, "low", "cpu", s.height, s.width, s.num_frames)
    plan.kept_blocks = 1
    mo.apply_memory_policy(q_pipe, plan)
    state = mo.memory_state_of(q_pipe)
    assert "1 blocks kept" in plan.describe()
    for attr in ("transformer", "transformer_2"):
        seq = state.experts[attr]
        assert seq.keep == [True, True, False]  # rest, block 0, block 1
        streamed = mo.quantized_layers(mo.blocks_of(getattr(q_pipe, attr))[1]).values()
        assert all(_inside(m.l1, seq.groups[2].host) for m in streamed)  # L1/L2 travel with the block
    seen = []

    def probe(attr, other, index):
        def hook(module, args):
            groups = state.experts[attr].groups
            seen.append((index, groups[1].resident, groups[2].resident,
                         state.experts[other].any_resident(), state.vae.resident))
        return hook

    handles = []
    for attr, other in (("transformer", "transformer_2"), ("transformer_2", "transformer")):
        blocks = mo.blocks_of(getattr(q_pipe, attr))
        handles += [b.register_forward_pre_hook(probe(attr, other, i)) for i, b in enumerate(blocks)]
        handles.append(getattr(q_pipe, attr).register_forward_hook(
            lambda m, a, o, attr=attr: seen.append(("after", [g.resident for g in state.experts[attr].groups]))))
    try:
        assert np.array_equal(_generate(q_pipe), expected)
    finally:
        for h in handles:
            h.remove()
    during = [c for c in seen if c[0] != "after"]
    assert len(during) == 2 * 2 * s.num_inference_steps  # two blocks, cond + uncond per step
    # block 0 computing: itself in, block 1 being copied in; block 1 computing: both in; never the others
    assert all(kept and streamed and not other and not vae for _, kept, streamed, other, vae in during)
    after = [c[1] for c in seen if c[0] == "after"]
    assert after and all(r == [True, True, False] for r in after)  # the streamed block left after use


def test_low_leaves_no_text_encoder_on_the_device_after_encoding(q_pipe):
    _apply(q_pipe, "low")
    state = mo.memory_state_of(q_pipe)
    seq = state.text_encoder
    during = []
    for g, m in zip(seq.groups[1:], q_pipe.text_encoder.encoder.block):
        m.register_forward_pre_hook(lambda mod, args, g=g: during.append(g.resident))
    pos, neg = encode_prompts(q_pipe, "a cat", "", TINY_SETTINGS, torch.device("cpu"))
    assert during and all(during)
    assert not seq.any_resident()
    te_tensors = [*q_pipe.text_encoder.parameters(), *q_pipe.text_encoder.buffers()]
    hosts = [g.host for g in seq.groups]
    in_host = [any(_inside(t, h) for h in hosts) for t in te_tensors]
    embeddings = {id(m.weight) for m in q_pipe.text_encoder.modules() if isinstance(m, nn.Embedding)}
    assert all(ok or id(t) in embeddings for t, ok in zip(te_tensors, in_host))
    # the embeddings were never moved: looked up in host memory
    assert all(m.weight.device.type == "cpu" for m in q_pipe.text_encoder.modules() if isinstance(m, nn.Embedding))
    _apply(q_pipe, "resident")
    ref_pos, ref_neg = encode_prompts(q_pipe, "a cat", "", TINY_SETTINGS, torch.device("cpu"))
    assert torch.equal(pos, ref_pos) and torch.equal(neg, ref_neg)


def test_streamed_text_encoder_buffers_die_with_the_encoding(q_pipe):
    """The embeddings must not keep the encoder's device copies alive: the full-scale run
    found two prompts' autograd graphs holding 29 GB of streamed UMT5 blocks on the GPU."""
    import gc
    import weakref

    q_pipe.text_encoder.requires_grad_(True)  # as from_pretrained leaves it
    _apply(q_pipe, "low")
    assert not any(p.requires_grad for p in q_pipe.text_encoder.parameters())  # the policy turns it off
    q_pipe.text_encoder.requires_grad_(True)  # and encoding is safe even when a caller turns it back on
    seq = mo.memory_state_of(q_pipe).text_encoder
    buffers = []
    handles = [m.register_forward_pre_hook(lambda mod, args, g=g: buffers.append(weakref.ref(g.device_buffer)))
               for g, m in zip(seq.groups[1:], q_pipe.text_encoder.encoder.block)]
    try:
        pos, neg = encode_prompts(q_pipe, "a cat", "", TINY_SETTINGS, torch.device("cpu"))
    finally:
        for h in handles:
            h.remove()
    gc.collect()
    assert pos.grad_fn is None and not pos.requires_grad and neg.grad_fn is None
    assert len(buffers) == 2 * len(seq.groups[1:]) and all(ref() is None for ref in buffers)
    q_pipe.text_encoder.requires_grad_(False)


def test_footprint_of_the_tiny_pipeline(q_pipe):
    _apply(q_pipe, "resident")
    fp = mo.measure_footprint(q_pipe, "cpu")

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in (*m.parameters(), *m.buffers())}.values())

    assert fp.experts == 2 and fp.expert == max(nbytes(q_pipe.transformer), nbytes(q_pipe.transformer_2))
    assert fp.scratch == 0  # no fast path on a CPU
    assert 0 < fp.text_encoder_streamed <= fp.text_encoder == nbytes(q_pipe.text_encoder)
    assert fp.vae == nbytes(q_pipe.vae) and fp.dim == 64


def test_api_set_memory_policy_and_replan(q_pipe, caplog):
    import wanquant.api as wq

    with caplog.at_level(logging.INFO, logger="wanquant.api"):
        plan = wq.set_memory_policy(q_pipe, "low", device="cpu", settings=TINY_SETTINGS)
    assert plan is wq.memory_plan_of(q_pipe) and plan.policy == "low"
    assert "memory=low: low" in caplog.text
    bigger = mo.replan(q_pipe, 48, 48, 5)
    assert bigger.video.pixels == 48 * 48 * 5 and bigger.policy == "low"
    assert mo.replan(q_pipe, 48, 48, 5) is bigger  # same size: kept
    for bad, match in ((dict(memory="lowest"), "memory policy"), (dict(chunk_tokens=0), "chunk_tokens"),
                       (dict(budget_gb=-1.0), "budget_gb")):
        with pytest.raises(wq.InputError, match=match):
            wq.set_memory_policy(q_pipe, **{"memory": "auto", "device": "cpu", **bad})
    wq.set_memory_policy(q_pipe, "resident", device="cpu", settings=TINY_SETTINGS)


def test_cli_takes_memory():
    from wanquant.cli import build_parser

    base = ["generate", "--image", "x.png", "--prompt", "p", "--out", "o.mp4"]
    # Policies stay opt-in until they meet their targets at full scale.
    assert build_parser().parse_args(base).memory == "off"
    assert build_parser().parse_args(base + ["--memory", "low"]).memory == "low"
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--memory", "tiny"])
