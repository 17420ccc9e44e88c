# TEMPORARY shim (issue 11): re-exports, removed by the lead after the import rewrite
from wanquant.media import to_uint8, write_frame_strip, write_video  # noqa: F401
from wanquant.model.pipeline import GenerationSettings, encode_prompts, is_image_to_video, run_pipeline  # noqa: F401
