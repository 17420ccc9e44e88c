"""Calibrating a pipeline: statistics from BF16 forwards, then the per-layer method.

* :mod:`~wanquant.calibration.samples`: the (image, prompt) calibration manifest;
* :mod:`~wanquant.calibration.config`: ``CalibrationRun`` (how a run is carried out);
* :mod:`~wanquant.calibration.collect`: hooks that stream statistics per expert and bin
  (one accumulator per input; static inputs once per sample; cond-only as an option);
* :mod:`~wanquant.calibration.budget`: the statistics' memory and what is spilled to host;
* :mod:`~wanquant.calibration.trajectory`: expert-major runs (one trajectory pass: earlier
  experts replayed from recorded outputs, later ones skipped, idle ones in host memory);
* :mod:`~wanquant.calibration.passes`: one pass over some blocks (collect + quantize);
* :mod:`~wanquant.calibration.shards`: samples and layers split over processes, merged
  so that results depend on the shard count only;
* :mod:`~wanquant.calibration.run`: the whole resumable job behind ``wanquant quantize``.
"""
