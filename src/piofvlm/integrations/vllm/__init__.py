"""piofvlm's input/encoder-side methods as a vLLM plugin (vLLM's own entry points and registries; no patched files).

* :func:`register` is listed under the entry-point group ``vllm.general_plugins`` (pyproject), so every vLLM process
  (the engine, its workers, the OpenAI server) calls it on start. It registers one model class per supported family
  (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL: :data:`ARCHITECTURES`) with ``ModelRegistry.register_model``:
  ``Piofvlm<Architecture>`` (e.g. ``PiofvlmLlavaForConditionalGeneration``),
  a subclass of vLLM's own model class whose multimodal processor gives each image the budget's number of
  placeholder tokens and whose ``embed_multimodal`` runs the method's selection (piofvlm's own code) on the image's
  projected features.
* The user selects it and the method with ``hf_overrides`` (``LLM(...)`` or ``vllm serve --hf-overrides``)::

      {"architectures": ["PiofvlmLlavaForConditionalGeneration"], "piofvlm": {"method": "divprune", "keep": 64}}

  :func:`hf_overrides` builds that dict. A budget is a count per image or a ratio of each image's visual tokens.

Importing this module imports no vLLM; :func:`register` does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from piofvlm.integrations.vllm.selection import CONFIG_KEY, ENCODER_METHODS, method_from_config

logger = logging.getLogger(__name__)

#: vLLM architecture of each supported family -> the plugin's class (module:Class), registered by :func:`register`.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "piofvlm.integrations.vllm.llava:PiofvlmLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": (
        "piofvlm.integrations.vllm.llava_next:PiofvlmLlavaNextForConditionalGeneration"
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        "piofvlm.integrations.vllm.qwen_vl:PiofvlmQwen2_5_VLForConditionalGeneration"
    ),
    "Qwen3VLForConditionalGeneration": "piofvlm.integrations.vllm.qwen3_vl:PiofvlmQwen3VLForConditionalGeneration",
}
#: Families piofvlm supports on transformers that the plugin does not (yet) run in vLLM, and why.
NOT_SUPPORTED = {
    "Qwen3VLMoeForConditionalGeneration": "not written yet: the Qwen3-VL route "
    "(PiofvlmQwen3VLForConditionalGeneration) "
    "would apply to vLLM's Qwen3-VL-MoE class, but it has no plugin class and is untested",
}
#: piofvlm's positions mode of each family in vLLM (default "renumber").
POSITIONS = {"Qwen2_5_VLForConditionalGeneration": "keep", "Qwen3VLForConditionalGeneration": "keep"}
PREFIX = "Piofvlm"

__all__ = ["ARCHITECTURES", "CONFIG_KEY", "ENCODER_METHODS", "NOT_SUPPORTED", "hf_overrides", "register"]


def plugin_architecture(architecture: str) -> str:
    """The plugin's architecture name for a model whose config says ``architecture``; ``ValueError`` if none."""
    if architecture in ARCHITECTURES:
        return PREFIX + architecture
    if architecture.startswith(PREFIX) and architecture[len(PREFIX) :] in ARCHITECTURES:
        return architecture
    why = NOT_SUPPORTED.get(architecture)
    raise ValueError(
        f"the piofvlm vLLM plugin does not run {architecture}"
        + (f" ({why})" if why else "")
        + f"; it runs: {', '.join(ARCHITECTURES)}"
    )


def hf_overrides(model: str | Path | dict[str, Any], method: str, **fields: Any) -> dict[str, Any]:
    """The ``hf_overrides`` that run ``method`` (with its hyperparameters ``fields``) on ``model`` in vLLM.

    Args:
        model: a checkpoint folder (its ``config.json`` names the architecture), or an architecture name.
        method: one of :data:`ENCODER_METHODS` (or ``"none"``: the plugin's model, nothing pruned).
        fields: the method's hyperparameters, e.g. ``keep=64`` (a count per image) or ``keep=0.25`` (a ratio).

    Raises ``ValueError`` for a method or family the plugin cannot run. Example::

        LLM(model=path, hf_overrides=hf_overrides(path, "divprune", keep=64))
    """
    if isinstance(model, str) and not Path(model).exists() and "/" not in model:
        architecture = model
    else:
        config_file = Path(model) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{config_file} does not exist: give a local checkpoint folder or an architecture name")
        architectures = json.loads(config_file.read_text()).get("architectures") or []
        if len(architectures) != 1:
            raise ValueError(f"{config_file} names architectures {architectures!r}; expected exactly one")
        architecture = architectures[0]
    spec = {"method": method, **fields}
    plugin_architecture(architecture)  # an unsupported family first: its error says why
    # refuse now, not in the engine's workers
    method_from_config(spec, POSITIONS.get(architecture.removeprefix(PREFIX), "renumber"))
    return {"architectures": [plugin_architecture(architecture)], CONFIG_KEY: spec}


def register() -> None:
    """Entry point of ``vllm.general_plugins``: register the plugin's model classes with vLLM's ``ModelRegistry``."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        name = PREFIX + architecture
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)
            logger.debug("registered %s -> %s", name, target)
