"""Multi-process calibration and context-parallel inference, on the CPU with gloo.

Two ranks are forked from the test process (they inherit its imports: seconds instead of
the ~20 s a fresh interpreter spends importing diffusers) and join a gloo group through
the torchrun environment variables, as ``torchrun -m wanquant.cli quantize`` would.

* the across-ranks merge of one layer's statistics equals the single-process merge, bit
  for bit, and differs from one unsharded stream only by fp32 reassociation (Hessian);
* a 2-rank calibration writes the same checkpoint (every tensor of every expert, the
  clip tables, the recorded timesteps) as one process with two shards;
* context parallelism (Ulysses, ring) over W4A4 experts keeps the timestep bins and the
  cross-attention k/v cache and reproduces the single-process video;
* on a machine with >= 2 CUDA GPUs, the same through torchrun and NCCL (skipped here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from safetensors.torch import load_file

# pytest and torchrun (this file as a script) both put tests/ on the path: conftest imports.
from conftest import TINY_SETTINGS, build_tiny_pipeline, fast_config  # noqa: E402
from wanquant.calibration.shards import (  # noqa: E402
    assign_layers, fold_shards, local_shards, reduce_layer_stats, resolve_shards, shard_ranges, shard_seed)
from wanquant.distributed import DistContext, init_distributed  # noqa: E402
from wanquant.numerics.stats import LayerStatsAccumulator  # noqa: E402

WORLD = 2
_START = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn, args) -> None:
    """One rank: join the group the torchrun way, run ``fn``, save its result for the parent."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = init_distributed("cpu", timeout_s=120)
    try:
        result = fn(dist, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.close()


def run_ranks(tmp_path: Path, fn, *args, world: int = WORLD) -> list:
    """Run ``fn(dist, *args)`` in ``world`` processes; returns each rank's result."""
    out = tmp_path / f"ranks-{fn.__name__}"
    out.mkdir()
    try:
        mp.start_processes(_entry, args=(world, _free_port(), str(out), fn, args), nprocs=world, join=True,
                           start_method=_START)
    except Exception as e:
        errs = "\n".join(p.read_text() for p in sorted(out.glob("*.err")))
        raise AssertionError(f"a rank failed: {e}\n{errs}") from None
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------------------------------
# pieces


def test_shards_and_owners():
    assert [list(r) for r in shard_ranges(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [len(r) for r in shard_ranges(7, 4)] == [2, 2, 2, 1]
    assert shard_seed(5, 0) == 5 and shard_seed(5, 1) != shard_seed(5, 0)
    assert resolve_shards(None, None, 3) == 1
    with pytest.raises(ValueError, match="at least 4 samples"):
        resolve_shards(4, None, 3)
    fake = DistContext(1, 2, 1, torch.device("cpu"), "gloo")
    assert resolve_shards(None, fake, 3) == 2 and local_shards(4, fake) == [2, 3]
    with pytest.raises(ValueError, match="evenly"):
        resolve_shards(3, fake, 8)
    owner = assign_layers({"a": 1.0, "b": 5.0, "c": 3.0, "d": 3.0}, 2)
    assert owner == {"b": 0, "c": 1, "d": 1, "a": 0}  # largest first, to the least loaded rank


def test_run_id_fingerprint_ignores_diffusers_private_config_order():
    """diffusers' _use_default_values is a list made from a set: its order changes with each
    process's hash seed, and the ranks (or a resumed run) must still agree on the run id."""
    from types import SimpleNamespace

    from wanquant.artifacts.checkpoint import fingerprint_module

    lin = torch.nn.Linear(4, 3)
    a = SimpleNamespace(config={"dim": 4, "_use_default_values": ["x", "y"]}, state_dict=lin.state_dict)
    b = SimpleNamespace(config={"dim": 4, "_use_default_values": ["y", "x"]}, state_dict=lin.state_dict)
    assert fingerprint_module(a) == fingerprint_module(b)
    c = SimpleNamespace(config={"dim": 5, "_use_default_values": ["x", "y"]}, state_dict=lin.state_dict)
    assert fingerprint_module(c) != fingerprint_module(a)


def _shard_accumulators(shards: list[int]) -> list[LayerStatsAccumulator]:
    """Deterministic per-shard statistics: bf16 tokens in shard 3, bin 2 empty in shard 0."""
    out = []
    for s in shards:
        acc = LayerStatsAccumulator(64, 3, reservoir_capacity=40, quantile=0.99, seed=shard_seed(7, s), name="l")
        g = torch.Generator().manual_seed(100 + s)
        for step in range(6):
            x = torch.randn(2, 9, 64, generator=g) * (1 + step)
            x[..., 5] *= 30  # an outlier channel
            b = step % 3
            if s == 0 and b == 2:
                continue
            acc.update(x.bfloat16() if s == 3 else x, b)
        out.append(acc)
    return out


def _stats_snapshot(acc) -> dict:
    return {"absmax": {"value": acc.absmax.value}, "hist": None if acc.hist is None else {"counts": acc.hist.counts},
            "hessian": {"hessian": acc.hessian.hessian.cpu(), "n_tokens": acc.hessian.n_tokens},
            "reservoirs": [{"keys": r.keys, "tokens": r.tokens, "n_seen": r.n_seen} for r in acc.reservoirs]}


def _reduce_worker(dist, shards_per_rank: int, owner: int):
    mine = list(range(dist.rank * shards_per_rank, (dist.rank + 1) * shards_per_rank))
    acc = reduce_layer_stats(dist, _shard_accumulators(mine), owner)
    return None if acc is None else _stats_snapshot(acc)


def _assert_same(a: dict, b: dict, path: str = "") -> None:
    assert a.keys() == b.keys(), path
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            _assert_same(x, y, f"{path}.{k}")
        elif isinstance(x, list):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                _assert_same(u, v, f"{path}.{k}[{i}]")
        elif isinstance(x, torch.Tensor):
            if k == "generator":
                continue  # the merged reservoir's own stream is never used again
            assert x.dtype == y.dtype and torch.equal(x, y), f"{path}.{k}"
        else:
            assert x == y, f"{path}.{k}"


def test_stats_merge_across_ranks_equals_single_process_merge(tmp_path):
    ranks = run_ranks(tmp_path, _reduce_worker, 2, 1)  # 4 shards on 2 ranks, merged on rank 1
    assert ranks[0] is None and ranks[1] is not None
    single = _stats_snapshot(fold_shards(_shard_accumulators([0, 1, 2, 3])))
    _assert_same(ranks[1], single)

    # Against one unsharded stream: everything exact but the Hessian (fp32 reassociation)
    # and the reservoirs (other random keys, same size and token count).
    stream = LayerStatsAccumulator(64, 3, reservoir_capacity=40, quantile=0.99, seed=7, name="l")
    absum = torch.zeros(64, 64, dtype=torch.float64)
    for s in range(4):
        g = torch.Generator().manual_seed(100 + s)
        for step in range(6):
            x = torch.randn(2, 9, 64, generator=g) * (1 + step)
            x[..., 5] *= 30
            if s == 0 and step % 3 == 2:
                continue
            x = x.bfloat16() if s == 3 else x
            stream.update(x, step % 3)
            xf = x.double().reshape(-1, 64)
            absum += xf.abs().T @ xf.abs()
    one = _stats_snapshot(stream)
    assert torch.equal(one["absmax"]["value"], single["absmax"]["value"])
    assert torch.equal(one["hist"]["counts"], single["hist"]["counts"])
    assert one["hessian"]["n_tokens"] == single["hessian"]["n_tokens"]
    diff = (one["hessian"]["hessian"].double() - single["hessian"]["hessian"].double()).abs()
    n_batches = 4 * 6
    assert (diff <= (n_batches + 4) * 2.0 ** -24 * absum).all()  # the documented bound
    for a, b in zip(one["reservoirs"], single["reservoirs"]):
        assert a["n_seen"] == b["n_seen"] and a["tokens"].shape == b["tokens"].shape


# ---------------------------------------------------------------------------------------
# calibration end to end


def _samples(n: int = 2):
    from wanquant.calibration.samples import CalibSample
    from wanquant.testbed.dataset import list_samples

    return [CalibSample(s.first_frame(), s.prompt, 100 + i, f"calib:{i}")
            for i, s in enumerate(list_samples("calib", n, num_frames=5, height=32, width=32))]


def _calib_run(**kw):
    from wanquant.calibration.run import CalibrationRun

    return CalibrationRun(TINY_SETTINGS, reservoir_tokens=256, progress=False, **kw)


def _quantize_worker(dist, out: str, blocks_per_pass):
    from wanquant.calibration.run import quantize_pipeline

    pipe = build_tiny_pipeline()
    quantize_pipeline(pipe, _samples(), fast_config(), _calib_run(blocks_per_pass=blocks_per_pass), out, dist=dist)
    return {"rank": dist.rank, "exists": Path(out).exists()}


def _expert_tensors(qdir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {d.name: load_file(str(d / "diffusion_pytorch_model.safetensors"))
            for d in sorted(qdir.iterdir()) if (d / "diffusion_pytorch_model.safetensors").exists()}


@pytest.fixture(scope="module")
def two_rank_checkpoints(tmp_path_factory):
    """The same calibration (2 samples, 2 shards, 2 passes): 2 gloo ranks, and 1 process."""
    from wanquant.calibration.run import quantize_pipeline

    tmp = tmp_path_factory.mktemp("dist")
    multi = tmp / "two_ranks"
    ranks = run_ranks(tmp, _quantize_worker, str(multi), 1)
    assert [r["exists"] for r in ranks] == [True, True]  # rank 1 returned after rank 0 wrote it
    single = tmp / "one_process"
    pipe = build_tiny_pipeline()
    quantize_pipeline(pipe, _samples(), fast_config(), _calib_run(blocks_per_pass=1, shards=2), single)
    return multi, single, pipe


@pytest.mark.slow
def test_two_rank_calibration_equals_one_process_with_two_shards(two_rank_checkpoints):
    from wanquant.artifacts.checkpoint import read_manifest

    multi, single, _ = two_rank_checkpoints
    a, b = _expert_tensors(multi), _expert_tensors(single)
    assert sorted(a) == ["transformer", "transformer_2"] and a.keys() == b.keys()
    for attr in a:
        assert a[attr].keys() == b[attr].keys()
        quant = [k for k in a[attr] if k.endswith(".qweight")]
        assert len(quant) == 2 * 7, attr
        for k in a[attr]:
            assert a[attr][k].dtype == b[attr][k].dtype and torch.equal(a[attr][k], b[attr][k]), f"{attr}: {k}"
    ma, mb = read_manifest(multi), read_manifest(single)
    assert ma["calibration"]["shards"] == mb["calibration"]["shards"] == 2
    assert ma["calibration"]["run_id"] == mb["calibration"]["run_id"]
    for attr, info in ma["experts"].items():
        other = mb["experts"][attr]
        assert info["calibration"] == other["calibration"]  # timesteps and forwards per bin/branch
        for name, layer in info["layers"].items():
            assert layer["clip_table"] == other["layers"][name]["clip_table"], (attr, name)
    assert not multi.with_name(multi.name + ".partial").exists()


def _interrupted_worker(dist, out: str):
    from wanquant.calibration import passes, run as run_mod

    real, calls = passes.calibrate_pass, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")  # every rank, at the same point
        return real(*args, **kwargs)

    passes.calibrate_pass = flaky
    try:
        run_mod.quantize_pipeline(build_tiny_pipeline(), _samples(), fast_config(), _calib_run(blocks_per_pass=1),
                                  out, dist=dist)
    except KeyboardInterrupt:
        return calls["n"]
    return -1


@pytest.mark.slow
def test_interrupted_two_rank_run_resumes_in_one_process(two_rank_checkpoints, tmp_path, monkeypatch):
    """The work directory's run id holds the shards, not the processes: resume anywhere."""
    from wanquant.calibration import passes, run as run_mod

    multi, _, _ = two_rank_checkpoints
    out = tmp_path / "resumed"
    assert run_ranks(tmp_path, _interrupted_worker, str(out)) == [2, 2]
    progress = json.loads((tmp_path / "resumed.partial" / "progress.json").read_text())
    assert list(progress["done"]) == ["transformer:0-1"] and not out.exists()  # expert-major passes

    calls = {"n": 0}
    real = passes.calibrate_pass

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(passes, "calibrate_pass", counting)
    run_mod.quantize_pipeline(build_tiny_pipeline(), _samples(), fast_config(),
                              _calib_run(blocks_per_pass=1, shards=2), out)
    assert calls["n"] == 3  # the passes not done: transformer blocks 1, transformer_2 blocks 0 and 1
    a, b = _expert_tensors(out), _expert_tensors(multi)
    for attr in a:
        for k in a[attr]:
            assert torch.equal(a[attr][k], b[attr][k]), f"{attr}: {k}"


@pytest.mark.slow
def test_one_shard_is_the_plain_single_process_run(tmp_path):
    """shards=1 goes through the unchanged code path: same files as a default run."""
    from wanquant.artifacts.checkpoint import read_manifest
    from wanquant.calibration.run import CalibrationRun, quantize_pipeline

    s = _samples(1)
    a, b = tmp_path / "a", tmp_path / "b"
    quantize_pipeline(build_tiny_pipeline(), s, fast_config(), CalibrationRun(TINY_SETTINGS, reservoir_tokens=64,
                                                                                 progress=False), a)
    quantize_pipeline(build_tiny_pipeline(), s, fast_config(), CalibrationRun(TINY_SETTINGS, reservoir_tokens=64,
                                                                                 progress=False, shards=1), b)
    ha, hb = read_manifest(a), read_manifest(b)
    assert {k: v["sha256"] for k, v in ha["files"].items() if "safetensors" in k} == \
           {k: v["sha256"] for k, v in hb["files"].items() if "safetensors" in k}
    assert "shards" not in ha["calibration"] and "shards" not in hb["calibration"]


# ---------------------------------------------------------------------------------------
# context-parallel inference over W4A4 experts


def _probe(pipe) -> dict:
    """Record, per forward, the bin each expert picked, k/v cache hits and layer input shapes."""
    rec = {"bins": [], "kv_hits": 0, "qkv_tokens": set(), "kv_tokens": set()}
    for attr in ("transformer", "transformer_2"):
        m = getattr(pipe, attr)
        state = m._wanquant_state
        set_t, get = state.set_timestep, state.cache_get

        def set_timestep(t, _set=set_t, _attr=attr):
            b = _set(t)
            rec["bins"].append((_attr, float(t.max()), b))
            return b

        def cache_get(layer, x, _get=get):
            hit = _get(layer, x)
            rec["kv_hits"] += hit is not None
            return hit

        state.set_timestep, state.cache_get = set_timestep, cache_get
        attn1, attn2 = m.blocks[0].attn1, m.blocks[0].attn2
        attn1.to_qkv.register_forward_pre_hook(lambda mod, a: rec["qkv_tokens"].add(a[0].shape[-2]))
        attn2.to_kv.register_forward_pre_hook(lambda mod, a: rec["kv_tokens"].add(a[0].shape[-2]))
    return rec


def _snapshot(rec: dict) -> dict:
    return {k: (sorted(v) if isinstance(v, set) else list(v) if isinstance(v, list) else v) for k, v in rec.items()}


def _cp_worker(dist, qdir: str, degrees: list[tuple[int, int]], device=None):
    from wanquant.model.pipeline import run_pipeline, video_tokens
    from wanquant.loading import load_quantized
    from wanquant.model.parallel import check_context_parallel, enable_context_parallel
    from wanquant.testbed.dataset import list_samples

    ev = list_samples("eval", 1, num_frames=5, height=32, width=32)[0]
    out = {}
    probe = build_tiny_pipeline()
    if device is None:
        with pytest.raises(ValueError, match="log-sum-exp"):  # ring needs an LSE backend: CUDA only
            enable_context_parallel(probe, ulysses_degree=1, ring_degree=2)
    with pytest.raises(ValueError, match="must equal the number"):
        enable_context_parallel(probe, ulysses_degree=1)
    del probe
    for ulysses, ring in degrees:
        pipe = build_tiny_pipeline() if device is None else _gpu_pipe(device)
        pipe.register_modules(transformer=None, transformer_2=None)
        load_quantized(pipe, qdir, device=device)
        rec_ref = _probe(pipe)
        ref = run_pipeline(pipe, ev.first_frame(), ev.prompt, TINY_SETTINGS, seed=0)
        rec_ref = _snapshot(rec_ref)  # the probe keeps recording: keep what the plain run saw
        before = check_context_parallel(pipe)
        info = enable_context_parallel(pipe, ulysses_degree=ulysses, ring_degree=ring)
        hooks = check_context_parallel(pipe)
        rec = _probe(pipe)  # a second probe: the first one's counts go on, these start at zero
        frames = run_pipeline(pipe, ev.first_frame(), ev.prompt, TINY_SETTINGS, seed=0)
        with pytest.raises(RuntimeError, match="already has parallelism"):
            enable_context_parallel(pipe, ulysses_degree=ulysses, ring_degree=ring)
        load_quantized(pipe, qdir, device=device)  # new experts: diffusers' hooks are gone with the old ones
        out[(ulysses, ring)] = {
            "ref": ref, "cp": frames, "rec_ref": rec_ref, "rec_cp": _snapshot(rec),
            "hooks_before": before, "hooks": hooks, "hooks_after_reload": check_context_parallel(pipe),
            "quantized_layers": info.quantized_layers,
            "tokens": video_tokens(pipe, TINY_SETTINGS.height, TINY_SETTINGS.width, TINY_SETTINGS.num_frames),
        }
    return out


@pytest.mark.slow
def test_context_parallel_w4a4_keeps_bins_and_kv_cache_and_reproduces_the_video(two_rank_checkpoints, tmp_path):
    _, single, _ = two_rank_checkpoints
    ranks = run_ranks(tmp_path, _cp_worker, str(single), [(2, 1)])  # ring: GPU test below
    for (ulysses, ring), r0 in ranks[0].items():
        r1 = ranks[1][(ulysses, ring)]
        what = f"ulysses {ulysses} x ring {ring}"
        assert r0["quantized_layers"] == 2 * 2 * 7
        assert r0["hooks_before"] == {"transformer": False, "transformer_2": False}
        assert r0["hooks"] == {"transformer": True, "transformer_2": True}
        assert r0["hooks_after_reload"] == {"transformer": False, "transformer_2": False}
        # Every rank ends with the whole video, the one a single process makes.
        np.testing.assert_array_equal(r0["cp"], r1["cp"])
        np.testing.assert_allclose(r0["cp"], r0["ref"], rtol=0, atol=1e-5, err_msg=what)
        # The runtime hook saw the whole timestep: same bins, forward by forward, on every rank.
        assert r0["rec_cp"]["bins"] == r0["rec_ref"]["bins"] == r1["rec_cp"]["bins"], what
        assert {b for _, _, b in r0["rec_cp"]["bins"]} == {0, 1, 2}
        # The sequence really is split; the text (k/v input) is not, and the cache still hits.
        n = r0["tokens"]
        assert r0["rec_ref"]["qkv_tokens"] == [n] and r0["rec_cp"]["qkv_tokens"] == [n // 2], what
        assert r0["rec_cp"]["kv_tokens"] == r0["rec_ref"]["kv_tokens"] == [TINY_SETTINGS.max_sequence_length]
        assert r0["rec_cp"]["kv_hits"] == r0["rec_ref"]["kv_hits"] > 0, what


def test_context_parallel_needs_a_process_group():
    from wanquant.model.parallel import check_context_parallel_shape, enable_context_parallel

    if tdist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    pipe = build_tiny_pipeline()
    with pytest.raises(RuntimeError, match="torchrun"):
        enable_context_parallel(pipe, ulysses_degree=2)
    assert check_context_parallel_shape(pipe, 32, 32, 5, world_size=2) == 32
    with pytest.raises(ValueError, match="not divisible by 3"):
        check_context_parallel_shape(pipe, 32, 32, 5, world_size=3)


# ---------------------------------------------------------------------------------------
# GPUs: torchrun + NCCL (skipped without two CUDA devices)

TWO_GPUS = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs >= 2 CUDA GPUs")


def _torchrun(*args: str, nproc: int = 2, timeout: int = 600) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"


def _gpu_pipe(device):
    return build_tiny_pipeline().to(device, torch.bfloat16)  # bf16: what flash (ring) attention needs


def _gpu_main(argv: list[str]) -> None:
    """``torchrun ... tests/test_distributed.py calibrate OUT`` / ``... cp QDIR RESULT``."""
    from wanquant.calibration.run import quantize_pipeline

    dist = init_distributed("cuda")
    try:
        if argv[0] == "calibrate":
            quantize_pipeline(_gpu_pipe(dist.device), _samples(), fast_config(), _calib_run(blocks_per_pass=1),
                              argv[1], dist=dist)
        elif argv[0] == "cp":
            out = _cp_worker(dist, argv[1], [(2, 1), (1, 2)], device=dist.device)
            if dist.is_main:
                torch.save(out, argv[2])
    finally:
        dist.close()


@pytest.mark.gpu
@pytest.mark.slow
@TWO_GPUS
def test_gpu_two_rank_nccl_calibration_and_context_parallel(tmp_path):
    from wanquant.calibration.run import quantize_pipeline

    _torchrun("calibrate", str(tmp_path / "two"))
    quantize_pipeline(_gpu_pipe("cuda:0"), _samples(), fast_config(), _calib_run(blocks_per_pass=1, shards=2),
                      tmp_path / "one")
    a, b = _expert_tensors(tmp_path / "two"), _expert_tensors(tmp_path / "one")
    assert a.keys() == b.keys()
    for attr in a:
        assert a[attr].keys() == b[attr].keys()
        for k in a[attr]:  # same GPU model on every rank: bit-identical
            assert torch.equal(a[attr][k], b[attr][k]), f"{attr}: {k}"

    _torchrun("cp", str(tmp_path / "one"), str(tmp_path / "cp.pt"))
    res = torch.load(tmp_path / "cp.pt", weights_only=False)
    for key, r in res.items():
        assert r["hooks"] == {"transformer": True, "transformer_2": True}, key
        assert r["rec_cp"]["bins"] == r["rec_ref"]["bins"], key
        assert r["rec_cp"]["kv_hits"] == r["rec_ref"]["kv_hits"] > 0, key
        assert r["rec_cp"]["qkv_tokens"] == [r["tokens"] // 2], key
        np.testing.assert_allclose(r["cp"], r["ref"], rtol=0, atol=2e-2, err_msg=str(key))  # bf16 attention


if __name__ == "__main__":
    _gpu_main(sys.argv[1:])
