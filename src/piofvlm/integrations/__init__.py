"""Integrations with third-party tools. Each submodule imports its tool itself: importing piofvlm imports none."""

from __future__ import annotations

from typing import Any

LMMS_EVAL_MODEL_ID = "piofvlm"


def lmms_eval_manifest() -> Any:
    """Entry point of group ``lmms_eval.models``: the ``piofvlm`` chat model, as a ``ModelManifest``.

    It lives here, not in :mod:`piofvlm.integrations.lmms_eval`: lmms-eval calls it while its model registry is
    being built, when importing the model module (which imports lmms-eval) would be circular; lmms-eval imports the
    class from ``chat_class_path`` only when the model is requested.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL_ID, chat_class_path="piofvlm.integrations.lmms_eval.PiofvlmModel")
