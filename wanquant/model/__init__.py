"""The model adapter: the only package that knows Wan's structure or imports diffusers.

* :mod:`~wanquant.model.wan`: the declarative table of quantized layers, the experts and
  their timestep ranges, installing W4A4 layers, the runtime hook, expert skeletons;
* :mod:`~wanquant.model.block`: the token-chunked block forward (lower activation peak);
* :mod:`~wanquant.model.parallel`: context parallelism over GPUs (Ulysses / ring);
* :mod:`~wanquant.model.pipeline`: loading a pipeline from a directory, running it;
* :mod:`~wanquant.model.diffusers_quantizer`: the ``"wanquant"`` diffusers quantization method;
* :mod:`~wanquant.model.testbed`: the small Wan2.2-form testbed architecture;
* :mod:`~wanquant.model.outliers`: transplants massive AdaLN activation channels into a
  model without changing its 16-bit output (the outlier testbed);
* :mod:`~wanquant.model.attention`, :mod:`~wanquant.model.offload`: attention backends and
  memory policies;
* :mod:`~wanquant.model.compile`: regional ``torch.compile`` (each block compiled, one
  compilation serving all blocks).

It sits above ``runtime`` (it installs W4A4 layers) and below ``calibration`` and the API.
"""
