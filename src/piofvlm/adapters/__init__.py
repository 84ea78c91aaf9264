"""One adapter per model family; see :class:`~piofvlm.adapters.base.ModelAdapter`."""

# Importing the family modules registers them.
from piofvlm.adapters import glm4v, internvl, llava, llava_next, llava_next_video, llava_onevision  # noqa: F401,I001
from piofvlm.adapters import gemma3, mistral3, qwen_vl, smolvlm  # noqa: F401,I001
from piofvlm.adapters import qwen3_5  # noqa: F401,I001
from piofvlm.adapters import gemma4  # noqa: F401,I001
from piofvlm.adapters import moe  # noqa: F401,I001
from piofvlm.adapters import vipllava  # noqa: F401,I001
from piofvlm.adapters import idefics2  # noqa: F401,I001
from piofvlm.adapters import shieldgemma2  # noqa: F401,I001
from piofvlm.adapters import paligemma  # noqa: F401,I001
from piofvlm.adapters import llama4  # noqa: F401,I001
from piofvlm.adapters import facts  # noqa: F401,I001  (the common-layout families, declared as data)
from piofvlm.adapters.base import SUPPORTED_ATTENTION, ModelAdapter
from piofvlm.adapters.registry import ADAPTERS, get_adapter, register_adapter

__all__ = ["ADAPTERS", "SUPPORTED_ATTENTION", "ModelAdapter", "get_adapter", "register_adapter"]
