"""wanquant: timestep- and expert-aware W4A4 post-training quantization for Wan2.2 video DiTs.

Where things are (dependencies point down this list, never up):

* ``formats``      4-bit number formats behind one interface, and their registry
* ``numerics``     statistics, smoothing, low-rank split, GPTQ, clip search (pure math)
* ``method``       the typed config and presets, the per-layer pipeline, the reference forward
* ``kernels``      Hopper FP8 Triton kernels, each with a PyTorch reference
* ``runtime``      ``W4A4Linear`` and the per-expert timestep-bin state
* ``artifacts``    the checkpoint directory
* ``model``        the Wan/diffusers adapter (the only importer of diffusers)
* ``loading``      a checkpoint into a pipeline; ``lora``: LoRA files onto the experts;
                   ``validate``: checks of user input shared by the API and the CLI
* ``calibration``  statistics from BF16 runs and the resumable quantize job
* ``api`` / ``cli`` the Python API and the command line over it

Beside them: ``media`` (images and videos in and out), ``distributed`` (torchrun),
``evaluation`` (metrics, report pages), ``testbed`` (the embedded model and its data),
``demo``. Experiments and benchmark drivers live outside the package, in ``benchmarks/``.
"""

__version__ = "0.1.0"
