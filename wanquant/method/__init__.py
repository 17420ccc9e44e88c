"""The quantization method above the numerics: its configuration and the per-layer pipeline.

Layering: ``formats`` -> ``numerics`` -> ``method`` (here) -> ``kernels`` / ``runtime``.

* :mod:`~wanquant.method.config`: :class:`QuantConfig` (formats, grids, switches) and presets;
* :mod:`~wanquant.method.params`: :class:`QuantizedLinearParams`, the canonical tensors of a layer;
* :mod:`~wanquant.method.layer`: :func:`quantize_layer` (config -> explicit numerics calls)
  and :func:`reference_forward`, the one PyTorch definition of a quantized layer;
* :mod:`~wanquant.method.shared_clip`: one clip table shared by both experts.
"""
