# TEMPORARY shim (issue 11): re-exports, removed by the lead after the import rewrite
from wanquant.model.parallel import *  # noqa: F401,F403
from wanquant.model.parallel import check_context_parallel, check_context_parallel_shape, enable_context_parallel  # noqa: F401
from wanquant.model.pipeline import video_tokens  # noqa: F401
