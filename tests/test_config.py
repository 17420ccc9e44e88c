"""QuantConfig: dict round-trips, presets, and manifests written before the format split."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from wanquant.formats import INT4, MXFP4, INT4Format, MXFP4Format, make_format
from wanquant.method.config import PRESETS, ClipConfig, QuantConfig, preset
from wanquant.runtime.linear import W4A4Linear

# The "config" entry of a manifest.json written before issue 11 (a shared_policy
# checkpoint of the testbed ablation), verbatim: format names, one shared group size,
# a scale rule each.
LEGACY = {
    "act_format": "mxfp4", "act_scale_rule": "ocp_floor",
    "bins": {"high": {"edges": [0.33, 0.66]}, "low": {"edges": [0.2, 0.7]}, "single": {"edges": [0.33, 0.66]}},
    "clip": {"clip_ratios": [0.6, 0.7, 0.8, 0.9, 1.0], "enabled": True, "exp_offsets": [-1, 0, 1],
             "max_tokens": 4096, "per_bin": True, "per_expert": False},
    "gptq": {"act_order": False, "block_size": 128, "damp": 0.01, "enabled": True, "max_damp_retries": 5},
    "group_size": 32,
    "lowrank": {"method": "exact", "randomized_iters": 4, "randomized_oversample": 16, "rank": 16},
    "precision": {"skip_blocks": [], "skip_layers": []},
    "smooth": {"act_quantile": 1.0, "alpha_grid": [0.5], "enabled": True},
    "weight_format": "mxfp4", "weight_scale_rule": "ocp_floor",
}


def _json_round_trip(cfg: QuantConfig) -> QuantConfig:
    return QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))


def test_legacy_manifest_config_migrates() -> None:
    cfg = QuantConfig.from_dict(copy.deepcopy(LEGACY))
    assert cfg.weight_format == MXFP4Format(32, "ocp_floor") and cfg.act_format == MXFP4Format(32, "ocp_floor")
    assert (cfg.lowrank.rank, cfg.smooth.alpha_grid, cfg.clip.per_expert) == (16, [0.5], False)
    assert cfg.bins_for("low").edges == [0.2, 0.7]
    # written back in the new layout, which reads back equal
    d = cfg.to_dict()
    assert not {"group_size", "weight_scale_rule", "act_scale_rule"} & set(d)
    assert d["weight_format"] == {"name": "mxfp4", "group_size": 32, "scale_rule": "ocp_floor"}
    assert _json_round_trip(cfg) == cfg
    # what the paper preset was then is what it is now
    assert cfg == QuantConfig.from_dict({**preset("paper").to_dict(), "clip": LEGACY["clip"]})


@pytest.mark.parametrize("changes,want_w,want_a", [
    ({"weight_scale_rule": "safe_ceil"}, MXFP4Format(32, "safe_ceil"), MXFP4),
    ({"weight_scale_rule": "safe_ceil", "act_scale_rule": "safe_ceil", "group_size": 64},
     MXFP4Format(64, "safe_ceil"), MXFP4Format(64, "safe_ceil")),
    # int4 had no scale rule: the stored one was ignored, qmax was always 7
    ({"weight_format": "int4", "act_format": "int4", "group_size": 64}, INT4, INT4),
    ({"act_format": "int4", "group_size": 64, "act_scale_rule": "safe_ceil"}, MXFP4Format(64), INT4Format(64)),
])
def test_legacy_variants(changes: dict, want_w, want_a) -> None:
    cfg = QuantConfig.from_dict({**LEGACY, **changes})
    assert (cfg.weight_format, cfg.act_format) == (want_w, want_a)
    assert _json_round_trip(cfg) == cfg


def test_legacy_minimal_keys_take_the_old_defaults() -> None:
    # The oldest manifests may lack fields added later; absent format keys meant mxfp4 g32 ocp_floor.
    cfg = QuantConfig.from_dict({"weight_format": "mxfp4", "lowrank": {"rank": 8}})
    assert cfg.weight_format == MXFP4 and cfg.act_format == MXFP4 and cfg.lowrank.rank == 8
    assert QuantConfig.from_dict({"group_size": 64}).weight_format == MXFP4Format(64)


def test_legacy_layer_loads_bit_exact() -> None:
    """A layer built from a migrated config computes the MXFP4 numerics exactly (independent fp64 reference)."""
    from test_runtime import brute_force_forward, random_params

    seed = random.randrange(1 << 30)
    gen = torch.Generator().manual_seed(seed)
    cfg = QuantConfig.from_dict(copy.deepcopy(LEGACY))
    p = random_params(16, 64, 4, 3, gen)
    layer = W4A4Linear.from_params(p, cfg.weight_format, cfg.act_format)
    x = torch.randn(3, 64, generator=gen) * 3
    for b in range(3):
        layer.state.bin_index = b
        c, o = p.clip_table[b].tolist()
        torch.testing.assert_close(layer(x).double(), brute_force_forward(p, x, c, int(o)), rtol=1e-4, atol=1e-3,
                                   msg=f"seed {seed} bin {b}")


def test_new_layout_round_trips() -> None:
    for name in PRESETS:
        assert _json_round_trip(preset(name)) == preset(name)
    mixed = QuantConfig(weight_format=INT4Format(128, qmax=8), act_format=MXFP4Format(32, "safe_ceil"),
                        clip=ClipConfig(per_bin=False))
    back = _json_round_trip(mixed)
    assert back == mixed and back.weight_format.group_size == 128 and back.act_format.group_size == 32
    assert mixed.describe_formats() == "W:int4 g128 qmax=8 A:mxfp4 g32 scale_rule=safe_ceil"


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown QuantConfig fields.*colour"):
        QuantConfig.from_dict({**LEGACY, "colour": "red"})
    with pytest.raises(ValueError, match="unknown format 'fp3'"):
        QuantConfig.from_dict({**LEGACY, "weight_format": "fp3"})
    with pytest.raises(TypeError, match="format object"):
        QuantConfig(weight_format="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale_rule"):
        QuantConfig.from_dict({"weight_format": {"name": "mxfp4", "group_size": 32, "scale_rule": "up"}})
    assert make_format("mxfp4") is not MXFP4 and make_format("mxfp4") == MXFP4
