"""wanquant: timestep- and expert-aware W4A4 post-training quantization for Wan2.2 video DiTs."""

__version__ = "0.1.0"
