"""The quantized-model directory: writing it atomically, reading and verifying it.

Layout (DESIGN.md section 6)::

    out/
      manifest.json                      format, versions, config, experts, checksums
      <expert>/config.json               the diffusers config of the expert + "quantization_config"
      <expert>/diffusion_pytorch_model.safetensors
                                         per quantized layer: qweight, wscales, smooth, l1, l2, bias,
                                         clip_table; and every tensor that stays 16-bit

``<expert>`` is the pipeline attribute (``transformer``, ``transformer_2``). Each expert
directory is also a diffusers model directory: with :mod:`wanquant.model.diffusers_quantizer`
registered, ``WanTransformer3DModel.from_pretrained(out / "transformer")`` loads it. The
layout is kernel-independent; kernels repack at load time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import wanquant
from wanquant.method.params import QuantizedLinearParams

FORMAT_NAME = "wanquant"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
QUANT_METHOD = "wanquant"
# Manifest keys a checkpoint cannot be read without.
REQUIRED_KEYS = ("config", "experts", "files")

log = logging.getLogger(__name__)


def quantization_config_of(config: dict[str, Any], bins: dict[str, Any],
                           layers: dict[str, QuantizedLinearParams]) -> dict[str, Any]:
    """The ``quantization_config`` entry of an expert's diffusers config.json."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "config": config,
        "timestep_bins": bins,
        "layers": {n: {"shape": [p.out_features, p.in_features], "rank": p.rank,
                       "num_bins": int(p.clip_table.shape[0]), "bias": p.bias is not None}
                   for n, p in layers.items()},
    }


class CheckpointError(RuntimeError):
    """A quantized checkpoint is missing, corrupt, or does not fit the model."""


class OutputBusyError(RuntimeError):
    """Another live process is writing the same output."""


def is_wanquant_output(path: Path) -> bool:
    """True for what ``--overwrite`` may replace: an empty directory or a wanquant checkpoint."""
    if path.is_symlink() or not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold ``<out>.lock`` while one run writes ``out`` and its work directory.

    An ``flock`` on the file: the kernel drops it when its process dies, so the file a
    killed run leaves behind is stale by construction and simply taken over. The file
    holds the owner's pid and host, for the message another run gets.
    """
    path = lock_path(Path(out))
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise OutputBusyError(f"{out} is being written by another wanquant run ({_lock_owner(path)}); wait "
                                  f"for it to finish or choose another --out") from None
        # The holder we waited on may have removed the file on release: then this lock
        # guards a name nobody else sees, so start over on the current file.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = os.read(fd, 256).decode(errors="replace").strip()
    if previous:
        log.info("taking over the lock %s left by a run that is no longer running (%s)", path, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def check_output_free(out: str | Path) -> None:
    """Raise :class:`OutputBusyError` now if another run holds ``out``'s lock (takes it for a moment)."""
    if lock_path(Path(out)).exists():
        with output_lock(out):
            pass


def _lock_owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "owner unknown"
    except OSError:
        return "owner unknown"


@dataclass
class ExpertArtifact:
    attr: str
    role: str
    bins: dict[str, Any]  # TimestepBins.to_dict()
    model_config: dict[str, Any]
    layers: dict[str, QuantizedLinearParams]
    rest: dict[str, torch.Tensor]
    source_fingerprint: str
    calibration: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_module(module: torch.nn.Module) -> str:
    """A cheap identity of a model: config, parameter names/shapes/dtypes, sampled values.

    Hashing every byte of a 14B model takes minutes; 4096 strided values per tensor tell
    two trained models apart just as well.
    """
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        # diffusers' private keys (``_use_default_values``) are built from a set: their
        # order follows the process's hash seed, so they cannot be part of an identity.
        public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        h.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.float32).contiguous()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def _flatten_layers(layers: dict[str, QuantizedLinearParams]) -> dict[str, torch.Tensor]:
    return {k: v for name, p in layers.items() for k, v in p.flat(name).items()}


def save_checkpoint(out_dir: str | Path, experts: list[ExpertArtifact], config: dict[str, Any],
                    overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """Write the directory atomically: a sibling temp dir renamed into place at the end."""
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
        if not is_wanquant_output(out):
            raise CheckpointError(f"{out} is not a wanquant checkpoint: --overwrite replaces only wanquant "
                                  "checkpoints (or an empty directory); choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir honours the umask (tempfile.mkdtemp would make it 0700: unreadable by the
    # group or a container running as another user).
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        manifest_experts = {}
        for e in experts:
            d = tmp / e.attr
            d.mkdir()
            model_config = {**e.model_config, "quantization_config": quantization_config_of(config, e.bins, e.layers)}
            (d / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True, default=str))
            tensors = {k: v.detach().contiguous().cpu() for k, v in e.rest.items()}
            tensors.update(_flatten_layers(e.layers))
            save_file(tensors, str(d / WEIGHTS_NAME), metadata={"format": FORMAT_NAME})
            manifest_experts[e.attr] = {
                "role": e.role,
                "timestep_bins": e.bins,
                "source_fingerprint": e.source_fingerprint,
                "layers": {n: {"shape": [p.out_features, p.in_features], "rank": p.rank,
                               "clip_table": p.clip_table.tolist(), "report": p.report}
                           for n, p in e.layers.items()},
                "calibration": e.calibration,
            }
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                rel = path.relative_to(tmp).as_posix()
                files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": wanquant.__version__,
            "torch_version": torch.__version__,
            "config": config,
            "experts": manifest_experts,
            "files": files,
            **(extra or {}),
        }
        _write_json_atomic(tmp / MANIFEST, manifest)
        # safetensors writes 0600 whatever the umask; give every file the mode the umask
        # gives a new file (the manifest's, written by plain open()).
        mode = (tmp / MANIFEST).stat().st_mode & 0o777
        for path in tmp.rglob("*"):
            if path.is_file():
                path.chmod(mode)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_manifest(qdir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and check the manifest; with ``verify`` also every file's size and sha256."""
    qdir = Path(qdir)
    mpath = qdir / MANIFEST
    if not qdir.is_dir():
        raise CheckpointError(f"quantized model directory {qdir} does not exist; run `wanquant quantize` first")
    if not mpath.is_file():
        raise CheckpointError(f"{mpath} is missing: {qdir} is not a wanquant checkpoint (or was not fully written)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is not valid JSON ({e}); the checkpoint is corrupt: re-run quantize") from e
    if manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{mpath} is not a wanquant manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{qdir} has checkpoint format version {version!r} (written by wanquant "
            f"{manifest.get('library_version')}); this wanquant {wanquant.__version__} reads version "
            f"{FORMAT_VERSION}: upgrade wanquant or re-quantize with this version"
        )
    missing = [k for k in REQUIRED_KEYS if not manifest.get(k)]
    if missing:
        raise CheckpointError(f"{mpath} has no {' or '.join(repr(k) for k in missing)}: the manifest is incomplete or "
                              "was edited, so the checkpoint cannot be checked or rebuilt; restore the original "
                              "manifest.json (copy the whole directory again) or re-quantize")
    if verify:
        for rel, info in manifest["files"].items():
            path = qdir / rel
            if not path.is_file():
                raise CheckpointError(f"{path} is missing from the checkpoint; copy the whole directory or re-quantize")
            if path.stat().st_size != info["bytes"]:
                raise CheckpointError(f"{path} has {path.stat().st_size} bytes, the manifest says {info['bytes']}: "
                                      "the file is truncated or altered; re-copy or re-quantize")
            if sha256_file(path) != info["sha256"]:
                raise CheckpointError(f"{path} fails its sha256 check: the file is corrupt or altered; "
                                      "re-copy or re-quantize")
    return manifest


def load_expert_files(qdir: str | Path, attr: str, manifest: dict[str, Any]) -> tuple[
        dict[str, QuantizedLinearParams], dict[str, torch.Tensor], dict[str, Any]]:
    """The quantized layers, the 16-bit rest and the diffusers config of one expert."""
    qdir = Path(qdir)
    if attr not in manifest["experts"]:
        raise CheckpointError(f"{qdir} has no expert {attr!r}; it holds {sorted(manifest['experts'])}")
    d = qdir / attr
    try:
        flat = load_file(str(d / WEIGHTS_NAME))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {d / WEIGHTS_NAME}: {e}; the checkpoint is corrupt: re-copy or re-quantize") from e
    names = tuple(f"{n}." for n in manifest["experts"][attr]["layers"])
    rest = {k: v for k, v in flat.items() if not k.startswith(names)}
    config = json.loads((d / "config.json").read_text())
    config.pop("quantization_config", None)
    layers = {}
    for name, info in manifest["experts"][attr]["layers"].items():
        try:
            p = QuantizedLinearParams.from_flat(flat, name, info.get("report", {}))
            missing = [f for f in p.TENSORS if f != "bias" and getattr(p, f) is None]
            if missing:
                raise CheckpointError(f"{d / WEIGHTS_NAME} lacks {missing} for layer {name}")
            layers[name] = p
        except TypeError as e:
            raise CheckpointError(f"layer {name} in {d} is malformed: {e}") from e
    return layers, rest, config
