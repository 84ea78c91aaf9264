"""``piofvlm serve``: an OpenAI-compatible server with a pruning method applied, built on ``transformers serve``.

transformers' own server (FastAPI app, ``/v1/chat/completions``, its model manager and generation threads) does the
serving; piofvlm changes three things through subclasses:

* the model manager applies the method to the model it loads (``_load_model``), once, for the server's lifetime;
* the generation manager reports what each generation pruned, from the inference thread that ran it;
* the chat handler adds that report to non-streaming responses (``usage.piofvlm`` and the header
  ``X-Piofvlm-Kept-Visual-Tokens``) and accepts ``file://`` image URLs next to local paths and data URLs.

Concurrency: transformers serve runs every ``generate()`` of one model on that model's single inference thread
(``GenerateManager``), so requests to the model are generated one at a time and the hooks' per-call state is never
shared between two requests. ``--compile`` switches decoding to a static cache compiled with ``torch.compile``.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from piofvlm import transformers_compat
from piofvlm.methods.base import TokenPruner

logger = logging.getLogger(__name__)

#: Header of a non-streaming chat completion: kept/original visual tokens per image after the last stage.
KEPT_HEADER = "X-Piofvlm-Kept-Visual-Tokens"

# What the generation awaited by the current request pruned (set in the request's own asyncio task).
_REPORT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("piofvlm_report", default=None)


def pruning_report(method: TokenPruner, input_ids: torch.Tensor, image_token_id: int) -> dict[str, Any]:
    """What the last prefill of ``method`` pruned, per image of the first sample (images are the runs of image
    placeholder tokens of the prompt): ``{"method": {...}, "visual_tokens": [per image],
    "stages": [{"layer": K, "kept": [per image]}]}``."""
    visual = input_ids[0] == image_token_id
    positions = visual.nonzero().flatten()
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    image_of = starts.long().cumsum(0) - 1  # image of each visual token, in order
    num_images = int(image_of[-1]) + 1 if len(image_of) else 0
    stages = []
    for record in method.last_selection:
        kept = record.kept[0].to(image_of.device)
        counts = torch.bincount(image_of[kept], minlength=num_images).tolist() if len(kept) else [0] * num_images
        stages.append({"layer": record.layer, "kept": counts})
    return {
        "method": method.to_dict(),
        "visual_tokens": torch.bincount(image_of, minlength=num_images).tolist(),
        "stages": stages,
    }


def kept_header(report: dict[str, Any]) -> str:
    """``"64/256,32/128"``: kept/original visual tokens per image after the last stage (all kept when none ran)."""
    last = report["stages"][-1]["kept"] if report["stages"] else report["visual_tokens"]
    return ",".join(f"{kept}/{total}" for kept, total in zip(last, report["visual_tokens"], strict=True))


def build_app(
    model: str,
    method: TokenPruner,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    attn: str = "sdpa",
    compile: bool = False,
    compile_backend: str = "inductor",
) -> tuple[Any, Any]:
    """The FastAPI app of ``transformers serve`` with ``model`` (a local directory or a hub id) loaded and ``method``
    applied, and its model manager (``shutdown()`` it, or let the app's lifespan do it)."""
    serving = transformers_compat.serving()
    handles: dict[int, Any] = {}

    class PrunedModelManager(serving.ModelManager):
        """Applies the method to the model transformers serve loads; the handle lives as long as the model."""

        def _load_model(self, *args: Any, **kwargs: Any) -> Any:
            loaded = super()._load_model(*args, **kwargs).eval()
            if compile:  # generate() compiles static-cache decoding on accelerators only unless told otherwise
                loaded.generation_config.compile_config = transformers_compat.compile_config(
                    backend=compile_backend, mode=None if device == "cpu" else "reduce-overhead"
                )
            handles[id(loaded)] = method.apply(loaded)
            logger.info("piofvlm: %s applied to %s", method.to_dict(), type(loaded).__name__)
            return loaded

    class ReportingGenerateManager(serving.GenerateManager):
        """Returns, with each non-streaming generation, what it pruned (read on the inference thread, before the
        next generation of the model can start)."""

        def async_submit(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
            future = super().async_submit(_call_and_report, fn, args, kwargs)

            async def result() -> Any:
                value, report = await future
                _REPORT.set(report)
                return value

            return result()

    def _call_and_report(fn: Callable, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any] | None]:
        value = fn(*args, **kwargs)
        owner = getattr(fn, "__self__", None)
        handle = handles.get(id(owner))
        if handle is None or kwargs.get("input_ids") is None:
            return value, None
        return value, pruning_report(handle.method, kwargs["input_ids"], owner.config.image_token_id)

    class PrunedGenerationState(serving.GenerationState):
        """One reporting generation manager (one inference thread) per model."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._reporting: dict[str, Any] = {}

        def get_manager(self, model_id: str, use_cb: bool = False) -> Any:
            if use_cb:
                return super().get_manager(model_id, use_cb=True)
            if model_id not in self._reporting:  # called on the event loop's thread only
                self._reporting[model_id] = ReportingGenerateManager()
            return self._reporting[model_id]

    class PrunedChatCompletionHandler(serving.ChatCompletionHandler):
        async def handle_request(self, body: dict, request_id: str) -> Any:
            _REPORT.set(None)
            response = await super().handle_request(body, request_id)
            report = _REPORT.get()
            if report is None or not isinstance(response, serving.JSONResponse):
                return response
            payload = json.loads(response.body)
            payload.setdefault("usage", {})["piofvlm"] = report
            return serving.JSONResponse(payload, headers={KEPT_HEADER: kept_header(report)})

        @staticmethod
        def get_processor_inputs_from_messages(messages: list[dict], modality: Any) -> list[dict]:
            parsed = serving.ChatCompletionHandler.get_processor_inputs_from_messages(messages, modality)
            for message in parsed:
                for part in message["content"] if isinstance(message["content"], list) else []:
                    url = part.get("url")
                    if isinstance(url, str) and url.startswith("file://"):
                        part["url"] = url[len("file://") :]
            return parsed

    if Path(model).exists() and not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a model directory (no config.json)")
    manager = PrunedModelManager(
        device=device, dtype=dtype, attn_implementation=attn, force_model=str(model), model_timeout=-1
    )
    state = PrunedGenerationState(compile=compile)
    app = serving.build_app(manager, state, PrunedChatCompletionHandler)
    return app, manager


def serve(model: str, method: TokenPruner, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    app, _ = build_app(model, method, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level="warning")
