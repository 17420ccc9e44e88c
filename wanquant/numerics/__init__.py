"""The method's math, one pure piece per module, with explicit arguments (no config object).

Layering: ``formats`` -> ``numerics`` (here) -> ``method`` -> ``kernels`` / ``runtime``.
These modules import only :mod:`wanquant.formats` and each other:

* :mod:`~wanquant.numerics.stats`: streaming calibration statistics of a layer input;
* :mod:`~wanquant.numerics.smooth`: SmoothQuant/SVDQuant smoothing and its alpha search;
* :mod:`~wanquant.numerics.lowrank`: the 16-bit low-rank branch (exact, randomized, activation-aware);
* :mod:`~wanquant.numerics.gptq`: GPTQ with the weight format injected;
* :mod:`~wanquant.numerics.clip`: the activation clip search and per-bin clip tables;
* :mod:`~wanquant.numerics.lora`: a LoRA as more rank in the low-rank branch (DESIGN.md section 9).

:mod:`wanquant.method.layer` chains them for one layer from a
:class:`~wanquant.method.config.QuantConfig`.
"""
