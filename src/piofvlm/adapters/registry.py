"""Adapters keyed by ``config.model_type``."""

from __future__ import annotations

from torch import nn

from piofvlm.adapters.base import ModelAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {}

_ENCODER_DECODER = (
    "encoder-decoder: the image is read by an encoder and the text decoder cross-attends to it, so no visual tokens "
    "sit in a decoder sequence for a token pruner to drop between decoder layers"
)
_CROSS_ATTENTION = (
    "the visual features enter the language model through cross-attention layers, not as tokens of its sequence, so "
    "there are no visual tokens to drop between decoder layers"
)
#: Model types refused by design, with the reason (the error for them and ``piofvlm families`` say it). Every other
#: model type of transformers' image-text-to-text mapping without an adapter is "not supported yet"
#: (:mod:`piofvlm.coverage`).
NOT_SUPPORTED: dict[str, str] = {
    "florence2": _ENCODER_DECODER + " (Florence-2: DaViT encoder, BART encoder-decoder)",
    "pix2struct": _ENCODER_DECODER + " (Pix2Struct: ViT encoder, T5-style text decoder)",
    "pp_formulanet": _ENCODER_DECODER + " (PP-FormulaNet: vision encoder, MBart-style text decoder)",
    "t5gemma2": _ENCODER_DECODER + " (T5Gemma 2)",
    "udop": _ENCODER_DECODER + " (UDOP: T5 encoder-decoder over text, layout and image)",
    "vision-encoder-decoder": _ENCODER_DECODER + " (VisionEncoderDecoderModel: any vision encoder + text decoder)",
    "mllama": _CROSS_ATTENTION + " (Llama 3.2 Vision: gated cross-attention layers between the self-attention ones)",
    "idefics": _CROSS_ATTENTION + " (IDEFICS 1: Flamingo-style gated cross-attention to perceiver latents)",
    "blip": _CROSS_ATTENTION + " (BLIP: a BERT text decoder cross-attending to the ViT's patch features)",
    "evolla": _CROSS_ATTENTION + " (Evolla: protein features through cross-attention; no image input)",
    "diffusion_gemma": (
        "block diffusion: a bidirectional denoising decoder reads the prompt's KV cache through cross-attention "
        "instead of continuing a causal prefill autoregressively, which is what the mechanism prunes"
    ),
}


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
            f"model type {model_type!r} ({type(model).__name__}) is refused by design: {NOT_SUPPORTED[model_type]}. "
            f"Supported model types: {', '.join(sorted(ADAPTERS))}."
        )
    if model_type not in ADAPTERS and isinstance(model_type, str) and is_image_text_to_text(model_type):
        raise ValueError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported yet: piofvlm has no adapter for "
            "this family of transformers' image-text-to-text models (`piofvlm families` lists every family's status; "
            f"docs/families.md). Supported model types: {', '.join(sorted(ADAPTERS))}."
        )
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model type {model_type!r} ({type(model).__name__}); supported model types: "
            f"{', '.join(sorted(ADAPTERS))}. Pass the full *ForConditionalGeneration model."
        )
    return ADAPTERS[model_type](model)


def is_image_text_to_text(model_type: str) -> bool:
    """Whether the installed transformers maps ``model_type`` to an image-text-to-text model."""
    from piofvlm import transformers_compat

    try:
        return model_type in transformers_compat.image_text_to_text_model_types()
    except transformers_compat.TransformersInternalsError:
        return False
