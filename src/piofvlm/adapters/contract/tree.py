"""The module tree of a family: where the multimodal model, the language model, its decoder layers, the final norm
and the LM head live (defaults: the Hugging Face layout ``model.model.language_model`` + ``model.lm_head``)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from piofvlm import transformers_compat


class ModuleTree:
    """Module lookups; defaults fit LLaVA-style models (:mod:`piofvlm.adapters.facts` reads them from data)."""

    model: nn.Module
    model_types: ClassVar[tuple[str, ...]] = ()

    @property
    def multimodal_model(self) -> nn.Module:
        """The module that receives ``input_ids`` and pixel inputs and calls the language model."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (embeddings, layers, final norm, rotary embedding)."""
        return self.model.model.language_model

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def model_type(self) -> str:
        """This model's ``config.model_type`` if it is one of :attr:`model_types`, else the first of them (for
        error messages: an adapter serving several types names the one in use)."""
        model_type = getattr(self.model.config, "model_type", None)
        return model_type if model_type in self.model_types else (self.model_types or ("?",))[0]

    @property
    def attn_implementation(self) -> str:
        return transformers_compat.attn_implementation(self.text_config)
