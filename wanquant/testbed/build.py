# TEMPORARY shim (issue 11): re-exports, removed by the lead after the import rewrite
from wanquant.model.testbed import *  # noqa: F401,F403
from wanquant.model.testbed import WEIGHTS_DIR, TestbedConfig, build_expert, build_testbed_pipeline, encode_prompts, generate, load_testbed_pipeline, testbed_config_of  # noqa: F401
