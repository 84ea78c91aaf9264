"""piofvlm: training-free visual token reduction for Hugging Face vision-language models.

>>> method = piofvlm.get_method("pio", keep=0.111)
>>> with method(model):
...     out = model.generate(**inputs, max_new_tokens=32)
"""

from piofvlm import transformers_compat
from piofvlm.adapters import ADAPTERS, ModelAdapter, get_adapter, register_adapter
from piofvlm.budget import average_retention, schedule_for_average_retention
from piofvlm.core.context import Selection, StageContext, StageRecord
from piofvlm.core.handle import PruningHandle
from piofvlm.methods import PIO, Method, NoReduction, RandomPrune, TokenPruner
from piofvlm.presets import PRESETS, available_presets, get_preset
from piofvlm.registry import METHODS, available_methods, get_method, register_method

__version__ = "0.1.0"

transformers_compat.check_version()  # warns once if the installed transformers is outside the tested range

__all__ = [
    "ADAPTERS",
    "METHODS",
    "PIO",
    "PRESETS",
    "Method",
    "ModelAdapter",
    "NoReduction",
    "PruningHandle",
    "RandomPrune",
    "Selection",
    "StageContext",
    "StageRecord",
    "TokenPruner",
    "__version__",
    "available_methods",
    "available_presets",
    "average_retention",
    "get_adapter",
    "get_method",
    "get_preset",
    "register_adapter",
    "register_method",
    "schedule_for_average_retention",
]
