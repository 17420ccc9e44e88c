"""The diffusers way: a registered quantization method ``"wanquant"``.

Each expert directory of a wanquant checkpoint is a diffusers model directory whose
``config.json`` carries ``"quantization_config": {"quant_method": "wanquant", ...}``. After
:func:`register` (done on ``import wanquant.model.diffusers_quantizer``)::

    transformer = WanTransformer3DModel.from_pretrained("wan22-w4a4/transformer", torch_dtype=torch.bfloat16)
    transformer_2 = WanTransformer3DModel.from_pretrained("wan22-w4a4/transformer_2", torch_dtype=torch.bfloat16)
    pipe = WanImageToVideoPipeline.from_pretrained(base, transformer=transformer, transformer_2=transformer_2)

loads pre-quantized experts with the timestep-bin hook attached. diffusers casts floating
tensors to ``torch_dtype`` before a quantizer sees them; the fp32 smoothing vectors and
clip tables must not be rounded, so the quantizer keeps the originals from the state
dict and ignores the cast copies. Only loading is supported (quantize with
``wanquant quantize``); the checksum and fingerprint checks of :func:`load_quantized`
are the stricter path (:func:`wanquant.loading.load_quantized`).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch

from wanquant.method.config import QuantConfig
from wanquant.model.wan import BUFFER_PREFIX, bind_expert, install_layer, restore_buffers
from wanquant.runtime.expert import refresh
from wanquant.runtime.linear import W4A4Linear
from wanquant.runtime.state import TimestepBins


class _Method(str, Enum):
    # diffusers reads `quant_method.value`; the member's name equals its value so that it
    # hashes like the plain string key of diffusers' registries.
    wanquant = "wanquant"


QUANT_METHOD = _Method.wanquant


def _classes():
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

    class WanquantConfig(QuantizationConfigMixin):
        """diffusers-side description of a pre-quantized wanquant expert."""

        def __init__(self, config: dict, layers: dict, timestep_bins: dict, format_version: int = 1, **kwargs):
            self.quant_method = QUANT_METHOD
            self.config, self.layers, self.timestep_bins = config, layers, timestep_bins
            self.format_version = format_version

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": QUANT_METHOD.value, "config": self.config, "layers": self.layers,
                    "timestep_bins": self.timestep_bins, "format_version": self.format_version}

        def to_diff_dict(self) -> dict[str, Any]:
            return self.to_dict()

    class WanquantQuantizer(DiffusersQuantizer):
        requires_calibration = True  # loads pre-quantized checkpoints only
        use_keep_in_fp32_modules = True

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            if not self.pre_quantized:
                raise ValueError("the wanquant method loads pre-quantized checkpoints; quantize with "
                                 "`wanquant quantize` first")
            self._originals: dict[str, torch.Tensor] = {}
            self._buffers: dict[str, torch.Tensor] = {}

        def validate_environment(self, *args, **kwargs):
            return None

        def _process_model_before_weight_loading(self, model, **kwargs):
            qc = self.quantization_config
            cfg = QuantConfig.from_dict(qc.config)
            for name, info in qc.layers.items():
                n, k = info["shape"]
                layer = W4A4Linear(k, n, info["rank"], info["num_bins"], cfg.weight_format, cfg.act_format, bias=info["bias"])
                install_layer(model, name, layer)
            self._names = tuple(f"{n}." for n in qc.layers)

        def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
            # The saved non-persistent buffers are not state-dict keys: consumed in
            # maybe_update_state_dict, so diffusers must not report them as unused.
            return [k for k in loaded_keys if not k.startswith(BUFFER_PREFIX)]

        def maybe_update_state_dict(self, state_dict):
            # Keep exact originals; take the non-persistent buffers out of diffusers' way.
            # Every tensor is copied out of the file's memory map: views sit at arbitrary
            # offsets, and CPU GEMMs round differently on unaligned memory, so without the
            # copy this path would not match load_quantized bit for bit (which copies too).
            for k in list(state_dict):
                value = state_dict[k].clone()
                if k.startswith(BUFFER_PREFIX):
                    self._buffers[k[len(BUFFER_PREFIX):]] = value
                    del state_dict[k]
                    continue
                state_dict[k] = value
                if k.startswith(self._names):
                    self._originals[k] = value
            return state_dict

        def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
            return param_name in self._originals

        def check_quantized_param_shape(self, param_name, current_param, loaded_param):
            if tuple(current_param.shape) != tuple(loaded_param.shape):
                raise ValueError(f"{param_name}: checkpoint shape {tuple(loaded_param.shape)} does not match the "
                                 f"model's {tuple(current_param.shape)}")
            return True

        def create_quantized_param(self, model, param_value, param_name, target_device, state_dict,
                                   unexpected_keys, **kwargs):
            path, _, attr = param_name.rpartition(".")
            owner = model.get_submodule(path)
            device = torch.device("cpu") if target_device is None else torch.device(
                f"cuda:{target_device}" if isinstance(target_device, int) else target_device)
            owner._buffers[attr] = self._originals.pop(param_name).to(device)

        def _process_model_after_weight_loading(self, model, **kwargs):
            restore_buffers(model, self._buffers)
            self._buffers.clear()
            refresh(model)
            bind_expert(model, TimestepBins.from_dict(self.quantization_config.timestep_bins))
            return model

        @property
        def is_serializable(self):
            return False

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return False

    return WanquantConfig, WanquantQuantizer


def register() -> tuple[type, type]:
    """Add ``"wanquant"`` to diffusers' quantizer registry (idempotent)."""
    from diffusers.quantizers import auto

    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD], auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD]
    config_cls, quantizer_cls = _classes()
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = config_cls
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = quantizer_cls
    return config_cls, quantizer_cls


WanquantConfig, WanquantQuantizer = register()
