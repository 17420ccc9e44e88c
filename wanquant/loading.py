"""Loading a quantized checkpoint into a Wan pipeline.

Experts are rebuilt from the checkpoint alone (config + quantized layers + 16-bit rest),
with parameters created on the meta device, so a quantized expert never exists in BF16
in memory. The pipeline's own experts, if loaded, are used only to check that the
checkpoint was made from the same model, and are then replaced.

Sits above the checkpoint files (:mod:`wanquant.artifacts`), the runtime layers and the
model adapter (:mod:`wanquant.model.wan`), which it combines.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from wanquant.artifacts.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    fingerprint_module,
    read_manifest,
)
from wanquant.method.config import QuantConfig
from wanquant.method.params import QuantizedLinearParams
from wanquant.model.pipeline import source_of
from wanquant.model.wan import (
    architecture_differences,
    bind_expert,
    component_mismatch,
    empty_expert,
    experts_of,
    install_layer,
    quant_targets,
    restore_buffers,
    split_saved_buffers,
)
from wanquant.runtime.expert import quantized_layers, refresh, set_backend
from wanquant.runtime.linear import Backend, W4A4Linear
from wanquant.runtime.state import TimestepBins

log = logging.getLogger(__name__)


# safetensors dtype names (the format's header) -> torch dtypes
_SAFETENSORS_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                       "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


class TensorFile:
    """A safetensors file read one tensor at a time, with plain reads into fresh allocations.

    ``safetensors.torch.load_file`` materialises every tensor of the file at once, and a
    memory map counts every page it touches in the process's resident memory while the
    file is open; an expert's layers are then held twice (file and layers) at the peak.
    Here each tensor is read when asked for (its own aligned allocation, nothing shared),
    so loading holds the layers built so far plus one layer in flight.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")
            size = int.from_bytes(self._f.read(8), "little")
            header = json.loads(self._f.read(size))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {self.path}: {e}; the checkpoint is corrupt: re-copy or "
                                  "re-quantize") from e
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self._data = 8 + size

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, key: str, default=None) -> torch.Tensor | None:
        """The tensor ``key`` (a new allocation each call), or ``default`` if the file has none."""
        info = self.entries.get(key)
        if info is None:
            return default
        begin, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key} has dtype {info['dtype']}, which wanquant does not read")
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._f.seek(self._data + begin)
        if end > begin and self._f.readinto(memoryview(buf.numpy())) != end - begin:
            raise CheckpointError(f"{self.path} ends inside tensor {key}: the file is truncated; re-copy it")
        return buf.view(dtype).reshape(info["shape"])

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_quantized_expert(qdir: str | Path, attr: str, manifest: dict, device: torch.device | str = "cpu",
                           backend: Backend = "auto") -> nn.Module:
    """Rebuild one expert from the checkpoint, on ``device``, one layer at a time (the host
    holds the layers built so far and one being read: never the file's tensors beside them)."""
    cfg = QuantConfig.from_dict(manifest["config"])
    if attr not in manifest["experts"]:
        raise CheckpointError(f"{qdir} has no expert {attr!r}; it holds {sorted(manifest['experts'])}")
    entries = manifest["experts"][attr]["layers"]
    model = empty_expert(_read_config(qdir, attr))
    check_layer_coverage(qdir, attr, entries, expected_layers(model, cfg))
    with TensorFile(Path(qdir) / attr / WEIGHTS_NAME) as tf:
        for name, info in entries.items():
            params = QuantizedLinearParams.from_flat(tf, name, info.get("report", {}))
            missing = [f for f in params.TENSORS if f != "bias" and getattr(params, f) is None]
            if missing:
                raise CheckpointError(f"{tf.path} lacks {missing} for layer {name}")
            try:
                layer = W4A4Linear.from_params(params, cfg.weight_format, cfg.act_format)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"layer {name} in {tf.path} is malformed: {e}") from e
            install_layer(model, name, layer)
            del params, layer
        names = tuple(f"{n}." for n in entries)
        rest = {k: tf.get(k) for k in tf.entries if not k.startswith(names)}
    rest, buffers = split_saved_buffers(rest)
    restore_buffers(model, buffers)
    expected = set(model.state_dict())
    quant_keys = {k for k in expected if k.startswith(names)}
    missing = sorted(expected - quant_keys - set(rest))
    unexpected = sorted(set(rest) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{qdir}/{attr} does not match the expert's architecture: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}; re-quantize with this wanquant")
    # Fresh allocations (TensorFile reads each tensor into its own): views into one mapping at
    # arbitrary offsets would make CPU GEMMs round differently on unaligned memory.
    model.load_state_dict(rest, strict=False, assign=True)
    del rest
    model.to(device)
    refresh(model)
    set_backend(model, backend)
    bind_expert(model, TimestepBins.from_dict(manifest["experts"][attr]["timestep_bins"]))
    model.eval()
    return model


def expected_layers(expert: nn.Module | dict, cfg: QuantConfig) -> dict[str, tuple[int, int]]:
    """Every layer a complete checkpoint of this expert holds (after the precision
    policy), with its (out, in) shape; ``expert`` is a model or its config."""
    model = empty_expert(expert) if isinstance(expert, dict) else expert
    return {t.name: t.shape for t in quant_targets(model, cfg)}


def layer_coverage(layers: dict, expected: dict[str, tuple[int, int]]) -> dict:
    """How a checkpoint's quantized layers (name -> params or manifest entry) cover the
    expected ones: counts, and the names missing, unexpected or with another shape."""
    def shape(v):
        return tuple(v["shape"]) if isinstance(v, dict) else (v.out_features, v.in_features)

    return {"quantized": sum(n in layers for n in expected), "expected": len(expected),
            "missing": [n for n in expected if n not in layers],
            "unexpected": [n for n in layers if n not in expected],
            "wrong_shape": {n: (list(shape(v)), list(expected[n])) for n, v in layers.items()
                            if n in expected and shape(v) != tuple(expected[n])}}


def check_layer_coverage(qdir, attr: str, layers: dict, expected: dict[str, tuple[int, int]]) -> None:
    """Refuse a checkpoint whose layers are not exactly those its expert config calls for."""
    cov = layer_coverage(layers, expected)
    where = f"{qdir}/{attr}"
    if cov["wrong_shape"]:
        name, (got, want) = next(iter(cov["wrong_shape"].items()))
        raise CheckpointError(f"{where}: layer {name} is {got[0]}x{got[1]} but the expert's config.json calls for "
                              f"{want[0]}x{want[1]} ({len(cov['wrong_shape'])} layers differ): config.json was edited "
                              "or belongs to another model; restore the checkpoint or re-quantize")
    if cov["missing"] or cov["unexpected"]:
        raise CheckpointError(f"{where} holds {cov['quantized']} of the {cov['expected']} quantized layers its config "
                              f"calls for (missing {cov['missing'][:5]}, unexpected {cov['unexpected'][:5]}): the "
                              "checkpoint is incomplete or its config.json was edited; re-quantize")


def check_compatible(pipe, manifest: dict, qdir: str | Path, allow_mismatch: bool = False) -> None:
    """Refuse a checkpoint made for another model or another expert layout."""
    roles = {e.attr: e.role for e in experts_of(pipe)} if getattr(pipe, "transformer", None) is not None else None
    for attr, info in manifest["experts"].items():
        if roles is not None and attr not in roles:
            raise CheckpointError(f"{qdir} has expert {attr!r} but the pipeline has no such expert "
                                  f"(it has {sorted(roles)}); use the pipeline the checkpoint was made for")
        if roles is not None and roles[attr] != info["role"]:
            raise CheckpointError(f"{qdir}: expert {attr} was quantized as the {info['role']!r} expert but the "
                                  f"pipeline runs it as {roles[attr]!r}; check the pipeline's boundary_ratio")
        ck_config = _read_config(qdir, attr)
        why = component_mismatch(pipe, ck_config)
        if why is not None:
            raise CheckpointError(f"{qdir} was made for another model: {why}")
        existing = getattr(pipe, attr, None)
        # Without its 16-bit expert, the pipeline's model directory still has the config.
        source = source_of(pipe)
        base = dict(existing.config) if existing is not None else source.expert_config(attr) if source else None
        if base is None:
            continue
        diffs = architecture_differences(ck_config, base)
        if diffs:
            raise CheckpointError(f"{qdir} was made for another model: {attr} config differs in "
                                  + ", ".join(f"{k} (checkpoint {a}, pipeline {b})" for k, (a, b) in diffs.items())
                                  + "; load the base model it was made from, or re-quantize")
        if existing is None:
            continue
        if quantized_layers(existing) or next(existing.parameters()).device.type == "meta":
            continue
        fp = fingerprint_module(existing)
        if fp != info["source_fingerprint"] and not allow_mismatch:
            raise CheckpointError(
                f"{qdir} was quantized from different {attr} weights (fingerprint {info['source_fingerprint']}, "
                f"pipeline {fp}); load the base model it was made from, or pass allow_mismatch=True "
                "(--allow-mismatch) if you know the weights are equivalent")


def _read_config(qdir, attr) -> dict:
    config = json.loads((Path(qdir) / attr / "config.json").read_text())
    config.pop("quantization_config", None)
    return config


def load_quantized(pipe, qdir: str | Path, device: torch.device | str | None = None, backend: Backend = "auto",
                   allow_mismatch: bool = False, verify: bool = True):
    """Replace the pipeline's experts by the quantized ones from ``qdir``; returns ``pipe``."""
    manifest = read_manifest(qdir, verify=verify)
    check_compatible(pipe, manifest, qdir, allow_mismatch)
    if device is None:
        existing = getattr(pipe, "transformer", None)
        device = next(existing.parameters()).device if existing is not None else "cpu"
        if torch.device(device).type == "meta":
            device = "cpu"
    for attr in manifest["experts"]:
        old = getattr(pipe, attr, None)
        if old is not None:
            pipe.register_modules(**{attr: None})  # free the 16-bit expert before building
            del old
        pipe.register_modules(**{attr: build_quantized_expert(qdir, attr, manifest, device, backend)})
    log.info("loaded %s: experts %s on %s", qdir, sorted(manifest["experts"]), device)
    return pipe
