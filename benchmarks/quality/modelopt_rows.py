"""An outside reference: NVIDIA ModelOpt's FP4 quantizers on the same testbed and videos.

Optional (``pip install .[compare]``): :func:`available` says whether ``modelopt`` imports,
and every entry point raises a clear error naming the extra otherwise. ModelOpt's FP4
fake-quantization asserts CUDA; its documented hook ``register_quant_backend`` lets a
quantizer call our entry point instead, which runs ModelOpt's own PyTorch routines
(``MXFP4QTensor`` / ``NVFP4QTensor`` quantize + dequantize) on any device.

Rows (block linears only, as ``wanquant`` quantizes; weights and activations both 4-bit,
activations dynamic per token and group):

- ``modelopt_mxfp4_rtn``: MXFP4 (E2M1, E8M0 scale per 32, ModelOpt's ceil rule);
- ``modelopt_nvfp4_rtn``: NVFP4 (E2M1, E4M3 scale per 16, fp32 per-tensor scale);
- ``modelopt_svdquant``: ModelOpt's SVDQuant-lite (AWQ-lite smoothing search + rank-32
  low-rank branch) on MXFP4, calibrated on the same calibration samples.
"""

from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger(__name__)
BACKEND = "wanquant_cpu_fp4"
ROWS = ("modelopt_mxfp4_rtn", "modelopt_nvfp4_rtn", "modelopt_svdquant")
MXFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}
NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
DESCRIBE = {"modelopt_mxfp4_rtn": "ModelOpt MXFP4 round-to-nearest (its ceil scale rule)",
            "modelopt_nvfp4_rtn": "ModelOpt NVFP4 round-to-nearest",
            "modelopt_svdquant": "ModelOpt SVDQuant-lite (AWQ-lite alpha, rank 32), MXFP4"}
SCALE_RULE = {"modelopt_mxfp4_rtn": "modelopt_ceil", "modelopt_nvfp4_rtn": "nvfp4_e4m3",
              "modelopt_svdquant": "modelopt_ceil"}


def available() -> tuple[bool, str]:
    """(importable, why not)."""
    try:
        import modelopt.torch.quantization  # noqa: F401
    except Exception as e:  # any import failure: the rows are skipped, with the reason
        return False, (f"nvidia-modelopt is not importable ({type(e).__name__}: {e}); "
                       "install the optional extra: pip install .[compare]")
    return True, ""


def _require():
    ok, why = available()
    if not ok:
        raise ImportError(why)
    import modelopt.torch.quantization as mtq

    return mtq


def fake_quant(x: torch.Tensor, scale_bits: tuple[int, int]) -> torch.Tensor:
    """Quantize-dequantize ``x`` along its last dim with ModelOpt's own PyTorch routines."""
    from modelopt.torch.quantization.qtensor.mxfp4_tensor import MXFP4QTensor
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    dtype = x.dtype
    if tuple(scale_bits) == (8, 0):
        qt, scale = MXFP4QTensor.quantize(x.float().contiguous(), 32)
        return qt.dequantize(torch.float32, scale=scale, block_sizes={-1: 32}).reshape(x.shape).to(dtype)
    if tuple(scale_bits) == (4, 3):
        qt, s1, s2 = NVFP4QTensor.quantize(x.float().contiguous(), 16)
        return qt.dequantize(torch.float32, scale=s1, double_scale=s2, block_sizes={-1: 16}).reshape(x.shape).to(dtype)
    raise ValueError(f"scale_bits {scale_bits}: only MXFP4 (8, 0) and NVFP4 (4, 3) are wired to the CPU backend")


def _entrypoint(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    return fake_quant(inputs, quantizer.block_sizes["scale_bits"])


def quant_config(row: str) -> dict:
    """ModelOpt config of ``row``: block linears' weights and inputs, through the CPU backend."""
    fmt = NVFP4 if row == "modelopt_nvfp4_rtn" else MXFP4
    cfg = {**fmt, "backend": BACKEND}
    algo = {"method": "svdquant", "lowrank": 32} if row == "modelopt_svdquant" else None
    if row not in ROWS:
        raise ValueError(f"unknown ModelOpt row {row!r}; choose from {ROWS}")
    return {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                          {"quantizer_name": "*blocks.*weight_quantizer", "cfg": cfg},
                          {"quantizer_name": "*blocks.*input_quantizer", "cfg": cfg}],
            "algorithm": algo}


def quantize_pipeline(pipe, row: str, forward_loop) -> None:
    """Quantize both experts of ``pipe`` in place with ModelOpt (``forward_loop()`` runs calibration)."""
    mtq = _require()
    from modelopt.torch.quantization.nn.modules import tensor_quantizer as tq

    if BACKEND not in tq._QUANT_FUNCTIONAL_BACKENDS:
        tq.register_quant_backend(BACKEND, lambda x, q: _entrypoint(x, q))  # late-bound: tests may wrap it
    experts = torch.nn.ModuleDict({n: getattr(pipe, n) for n in ("transformer", "transformer_2")
                                   if getattr(pipe, n, None) is not None})
    mtq.quantize(experts, copy.deepcopy(quant_config(row)), forward_loop=lambda _m: forward_loop())


def run_rows(make_pipeline, calib, evals, settings, out, reference, rows: tuple[str, ...] = ROWS,
             generate: bool = True, measure: bool = True, skip_busy: bool = False,
             missing_ok: bool = False) -> list[dict]:
    """Quantize a fresh pipeline per row, generate ``evals`` with the ablation's seeds, measure
    against ``reference`` (the 16-bit videos); cached in ``out`` like the ablation's configs
    (:func:`benchmarks.quality.ablation.cached_unit`, the same flags)."""
    import time
    from importlib.metadata import version
    from pathlib import Path

    from benchmarks.quality import ablation as A
    from wanquant.model.pipeline import run_pipeline

    _require()
    out = Path(out)
    key = {**settings.key(), "calib": [s.source for s in calib], "eval": [s.prompt for s in evals],
           "modelopt": version("nvidia-modelopt")}
    done = []
    for row in rows:
        def produce(row=row):
            log.info("%s: %s", row, DESCRIBE[row])
            pipe = make_pipeline()
            t0 = time.perf_counter()
            quantize_pipeline(pipe, row, lambda: [run_pipeline(pipe, s.image, s.prompt, settings.generation,
                                                               seed=s.seed) for s in calib])
            cal = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                videos = A._generate(pipe, evals, settings.generation, settings.eval_seed)
            return ({"config": row, "describe": DESCRIBE[row], "scale_rule": SCALE_RULE[row],
                     "switches": {"quantized": True, "outside": "NVIDIA ModelOpt " + version("nvidia-modelopt")},
                     "outside": "nvidia-modelopt " + version("nvidia-modelopt"),
                     "generated_on": {"device": A.device_name(settings.device), "dtype": str(A._dtype_of(pipe))},
                     "seconds": {"calibrate_quantize": cal, "generate": time.perf_counter() - t0}}, videos)

        r, _ = A.cached_unit(out, row, {**key, "config": quant_config(row)}, produce, reference, evals, settings,
                             generate=generate, measure=measure, skip_busy=skip_busy, missing_ok=missing_ok)
        if r is not None:
            done.append(r)
    return done


__all__ = ["ROWS", "DESCRIBE", "available", "fake_quant", "quant_config", "quantize_pipeline", "run_rows"]
