# TEMPORARY shim (issue 11): re-exports, removed by the lead after the import rewrite
from wanquant.loading import build_quantized_expert, check_compatible, load_quantized  # noqa: F401
from wanquant.model.wan import BUFFER_PREFIX, bind_expert, export_rest  # noqa: F401
from wanquant.runtime.expert import quantized_layers, set_backend  # noqa: F401
