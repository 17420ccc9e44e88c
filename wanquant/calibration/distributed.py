# TEMPORARY shim (issue 11): re-exports, removed by the lead after the import rewrite
from wanquant.calibration.shards import *  # noqa: F401,F403
from wanquant.distributed import DistContext, init_distributed, launched_by_torchrun  # noqa: F401
