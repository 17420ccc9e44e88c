# TEMPORARY shim (issue 11): re-exports, removed by the lead after the import rewrite
from wanquant.model.diffusers_quantizer import *  # noqa: F401,F403
