"""Adapters keyed by ``config.model_type``."""

from __future__ import annotations

from torch import nn

from piofvlm.adapters.base import ModelAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {}

#: Families studied and not supported yet: the error for their model type says what the mechanism lacks for them.
NOT_SUPPORTED: dict[str, str] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: register an adapter for each of its ``model_types``."""
    for model_type in cls.model_types:
        if model_type in ADAPTERS:
            raise ValueError(f"an adapter for model_type {model_type!r} is already registered")
        ADAPTERS[model_type] = cls
    return cls


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Return the adapter for ``model`` (a ``*ForConditionalGeneration`` instance)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in NOT_SUPPORTED and model_type not in ADAPTERS:
        raise ValueError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported yet: {NOT_SUPPORTED[model_type]}. "
            f"Supported model types: {', '.join(sorted(ADAPTERS))}."
        )
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model type {model_type!r} ({type(model).__name__}); supported model types: "
            f"{', '.join(sorted(ADAPTERS))}. Pass the full *ForConditionalGeneration model."
        )
    return ADAPTERS[model_type](model)
