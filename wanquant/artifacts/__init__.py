"""The quantized checkpoint directory: atomic writing, the manifest, verification, reading."""
