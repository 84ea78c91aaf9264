"""piofvlm: training-free visual token reduction for Hugging Face vision-language models.

>>> method = piofvlm.get_method("pio", keep=0.111)
>>> with method(model):
...     out = model.generate(**inputs, max_new_tokens=32)

The names below load on first use (``import piofvlm`` alone does not import torch or transformers, so the command
line's ``--help`` stays fast); the first one also checks the installed transformers against the tested range.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_LAZY = {
    "transformers_compat": "piofvlm.transformers_compat",
    "ADAPTERS": "piofvlm.adapters",
    "ModelAdapter": "piofvlm.adapters",
    "get_adapter": "piofvlm.adapters",
    "register_adapter": "piofvlm.adapters",
    "average_retention": "piofvlm.budget",
    "schedule_for_average_retention": "piofvlm.budget",
    "Selection": "piofvlm.core.context",
    "StageContext": "piofvlm.core.context",
    "StageRecord": "piofvlm.core.context",
    "PruningHandle": "piofvlm.core.handle",
    "PIO": "piofvlm.methods",
    "Method": "piofvlm.methods",
    "NoReduction": "piofvlm.methods",
    "RandomPrune": "piofvlm.methods",
    "TokenPruner": "piofvlm.methods",
    "PRESETS": "piofvlm.presets",
    "available_presets": "piofvlm.presets",
    "get_preset": "piofvlm.presets",
    "METHODS": "piofvlm.registry",
    "available_methods": "piofvlm.registry",
    "get_method": "piofvlm.registry",
    "register_method": "piofvlm.registry",
}

if TYPE_CHECKING:
    from piofvlm import transformers_compat
    from piofvlm.adapters import ADAPTERS, ModelAdapter, get_adapter, register_adapter
    from piofvlm.budget import average_retention, schedule_for_average_retention
    from piofvlm.core.context import Selection, StageContext, StageRecord
    from piofvlm.core.handle import PruningHandle
    from piofvlm.methods import PIO, Method, NoReduction, RandomPrune, TokenPruner
    from piofvlm.presets import PRESETS, available_presets, get_preset
    from piofvlm.registry import METHODS, available_methods, get_method, register_method

_loaded = False


def _load_all() -> None:
    """Import the library (registers every method and adapter) and check the transformers version, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    # What ``import piofvlm`` imported when it was eager (importing registers the methods and adapters).
    from piofvlm import adapters, budget, methods, presets, registry, transformers_compat  # noqa: F401
    from piofvlm.core import context, handle  # noqa: F401

    transformers_compat.check_version()  # warns once if the installed transformers is outside the tested range


#: Subpackages reachable as attributes (``piofvlm.methods.VisionZip``) before anything imported them.
_SUBMODULES = ("adapters", "bench", "budget", "core", "evaluation", "loading", "methods", "overlay", "presets",
               "registry", "runtime", "tiny")  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"piofvlm.{name}")
    if name not in _LAZY:
        raise AttributeError(f"module 'piofvlm' has no attribute {name!r}")
    if _LAZY[name] == f"piofvlm.{name}":  # a submodule: ``from piofvlm import transformers_compat`` inside the
        return importlib.import_module(_LAZY[name])  # package lands here too, so nothing else loads (no cycle)
    _load_all()
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ADAPTERS",
    "METHODS",
    "Method",
    "ModelAdapter",
    "NoReduction",
    "PIO",
    "PRESETS",
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
    "transformers_compat",
]
