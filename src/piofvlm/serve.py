"""``piofvlm serve``: an OpenAI-compatible chat server with a pruning method applied, built on ``transformers serve``.

transformers' serving parts (its model manager, its one inference thread per model, its chat-completion handler and
response builders) do the serving; piofvlm builds its own FastAPI app around them so that every input passes
:mod:`piofvlm.serve_limits` first:

* routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``POST /reset`` and ``POST /load_model``
  (the pinned model only). transformers' other endpoints (responses, completions, audio) are not mounted;
* a guard in front of the app refuses a Host header that is not allowed (DNS rebinding) and a body over the size cap;
* the server reads every image itself (data URL; a file under ``--image-dir``; an http(s) URL with ``--allow-fetch``),
  off the event loop, and hands transformers decoded images only: transformers never opens a path or a URL;
* every client mistake is a 4xx with OpenAI's error JSON; nothing a client sent is logged;
* the model manager applies (a fresh copy of) the method to the model it loads and, on ``/reset`` or shutdown, removes
  it on the inference thread and forgets model, handle and method together;
* each generation returns what it pruned, per image and video (the adapter's own per-item counts, as the mechanism
  groups them): ``usage.piofvlm`` and the header ``X-Piofvlm-Kept-Visual-Tokens`` of a response, and ``usage.piofvlm``
  of the last chunk of a stream. A text-only turn runs with the method's hooks lifted and says so.

Concurrency: transformers serve runs every ``generate()`` of one model on that model's single inference thread, so
requests are generated one at a time and the hooks' per-call state is never shared between two requests.
``--compile`` switches decoding to a static cache compiled with ``torch.compile``.
"""

import asyncio
import copy
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from piofvlm import transformers_compat
from piofvlm.adapters import get_adapter
from piofvlm.adapters.base import ModelAdapter
from piofvlm.methods.base import Method
from piofvlm.serve_limits import ClientError, ServeLimits, host_allowed, load_image, quote, validate_chat_body
from piofvlm.serve_limits import video_path as resolve_video_path

logger = logging.getLogger(__name__)

#: Header of a non-streaming chat completion: kept/original visual tokens per image / video after the last stage
#: (``none`` for a turn without images).
KEPT_HEADER = "X-Piofvlm-Kept-Visual-Tokens"
#: ``usage.piofvlm["note"]`` of a turn without an image or a video.
TEXT_ONLY_NOTE = "no image or video in the prompt: nothing to prune (the model ran without the method's hooks)"


# ------------------------------------------------------------------------------------------------- reports
@dataclass
class VisualItems:
    """The images and videos of one prompt, as the pruning mechanism groups them."""

    #: ``"image"`` or ``"video"`` per item, in prompt order.
    kinds: list[str]
    #: Visual tokens of each item.
    tokens: list[int]
    #: ``(N_visual,)`` the item of each visual token of the sample, in prompt order.
    item_of: torch.Tensor


def visual_items(
    adapter: ModelAdapter, input_ids: torch.Tensor, model_kwargs: dict[str, Any], sample: int = 0
) -> VisualItems:
    """The items of ``sample`` of a multimodal call: the adapter's per-item counts (``image_token_counts``), or each
    contiguous run of visual tokens where the family gives none, exactly as the mechanism forms budget groups (so
    Mistral 3's row breaks do not split an image, and a video written frame by frame is one item)."""
    visual = adapter.visual_token_mask(input_ids)
    flat = visual.flatten()
    total = int(flat.sum())
    counts = adapter.image_token_counts(total, {**model_kwargs, "input_ids": input_ids})
    if counts is not None and sum(counts) == total:
        item_flat = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    else:
        starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
        item_flat = (starts.flatten().long().cumsum(0) - 1)[flat].cpu()
    row_of = torch.arange(visual.shape[0])[:, None].expand(visual.shape).flatten()[flat.cpu()]
    mine = item_flat[row_of == sample]
    if len(mine) == 0:
        return VisualItems([], [], mine)
    mine = mine - mine.min()
    modality = adapter.visual_modality(input_ids, model_kwargs)[sample][visual[sample]].cpu()
    number = int(mine.max()) + 1
    first = torch.full((number,), len(mine), dtype=torch.long).scatter_reduce(
        0, mine, torch.arange(len(mine)), reduce="amin"
    )
    kinds = ["video" if int(modality[i]) == 1 else "image" for i in first.tolist()]
    return VisualItems(kinds, torch.bincount(mine, minlength=number).tolist(), mine)


def pruning_report(method: Method, items: VisualItems | None, sample: int = 0) -> dict[str, Any]:
    """What the last prefill of ``method`` kept of each item of ``sample``:

    ``{"method": {...}, "pruned": bool, "items": [{"type", "visual_tokens", "kept": [per stage]}],
    "visual_tokens": [per item], "stages": [{"layer": K, "kept": [per item]}]}`` (``items`` in prompt order; a
    ``note`` instead of items for a prompt without any)."""
    if items is None or not items.tokens:
        return {
            "method": method.to_dict(),
            "pruned": False,
            "items": [],
            "visual_tokens": [],
            "stages": [],
            "note": TEXT_ONLY_NOTE,
        }
    number = len(items.tokens)
    stages = []
    for record in method.last_selection:
        kept = record.kept[sample].cpu()
        counts = torch.bincount(items.item_of[kept], minlength=number).tolist() if len(kept) else [0] * number
        stages.append({"layer": record.layer, "kept": counts})
    return {
        "method": method.to_dict(),
        "pruned": bool(stages),
        "items": [
            {"type": kind, "visual_tokens": tokens, "kept": [stage["kept"][i] for stage in stages]}
            for i, (kind, tokens) in enumerate(zip(items.kinds, items.tokens, strict=True))
        ],
        "visual_tokens": items.tokens,
        "stages": stages,
    }


def kept_header(report: dict[str, Any]) -> str:
    """``"64/256,32/128"``: kept/original visual tokens per item after the last stage (all kept when none ran);
    ``"none"`` for a prompt without images."""
    if not report["visual_tokens"]:
        return "none"
    last = report["stages"][-1]["kept"] if report["stages"] else report["visual_tokens"]
    return ",".join(f"{kept}/{total}" for kept, total in zip(last, report["visual_tokens"], strict=True))


# ------------------------------------------------------------------------------------------ model and method
class _Slot:
    """One loaded model with its own copy of the method applied, and a hook that records the items of each prefill.
    Used on the model's inference thread only (``generate`` and ``close``)."""

    def __init__(self, model: torch.nn.Module, method: Method) -> None:
        self.model = model
        self.method = copy.deepcopy(method)  # a fresh method per model: nothing of an old model survives in it
        self.adapter = get_adapter(model)
        self.items: VisualItems | None = None
        self._recording = False
        self.handle: Any = self.method.apply(model)  # first: a model the method refuses gets no hook at all
        self._capture = self.adapter.multimodal_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._recording:
            return
        self._recording = False  # the first multimodal call of generate() is the prefill
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            self.items = visual_items(self.adapter, input_ids, kwargs)

    def generate(self, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        input_ids = kwargs.get("input_ids")
        if input_ids is None or not bool(self.adapter.visual_token_mask(input_ids).any()):
            # Nothing to prune: the hooks refuse a prompt without visual tokens, so they are lifted for this turn.
            self.handle.remove()
            try:
                output = self.model.generate(**kwargs)
            finally:
                self.handle = self.method.apply(self.model)
            return output, pruning_report(self.method, None)
        self.items, self._recording = None, True
        try:
            output = self.model.generate(**kwargs)
        except ValueError as error:  # piofvlm refuses this prompt (e.g. a count over an image's tokens)
            raise ClientError(f"the pruning method refused this prompt: {quote(str(error), 300)}") from None
        finally:
            self._recording = False
        items, self.items = self.items, None
        return output, pruning_report(self.method, items)

    def close(self) -> None:
        """Remove the method and the recording hook: the model is left as it was loaded."""
        self.handle.remove()
        self._capture.remove()


class _Generation:
    """Stands in for the model in transformers' chat handler: its ``generate()`` (called on the inference thread)
    runs through the slot and keeps the report; everything else is the model's."""

    def __init__(self, slot: _Slot, loop: asyncio.AbstractEventLoop) -> None:
        self._slot = slot
        self._loop = loop
        self.report: dict[str, Any] | None = None
        self.done: asyncio.Future = loop.create_future()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._slot.model, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        report = None
        try:
            output, report = self._slot.generate(kwargs)
            return output
        finally:
            self.report = report
            self._loop.call_soon_threadsafe(_resolve, self.done, report)


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


# ----------------------------------------------------------------------------------------------------- app
def error_response(error: ClientError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status)


class _Guard:
    """ASGI middleware in front of the app: the Host allow-list and the request-size cap (the body is read here,
    up to the cap, before the app sees any of it)."""

    def __init__(self, app: Any, limits: ServeLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.limits):
            message = (
                "this server does not answer that Host (DNS rebinding); the operator adds names with --allowed-host"
            )
            await self._reply(send, ClientError(message, status=403, code="host_not_allowed"))
            return
        cap = self.limits.max_request_bytes
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > 2 * cap:
                break  # stop reading; refused below
        if len(body) > cap:
            error = ClientError(f"a request of over {cap} bytes (--max-request-bytes)", status=413)
            await self._reply(send, error)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect a streaming response waits for

        await self.app(scope, replay, send)

    @staticmethod
    async def _reply(send: Any, error: ClientError) -> None:
        payload = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def build_app(
    model: str,
    method: Method,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    attn: str = "sdpa",
    compile: bool = False,
    compile_backend: str = "inductor",
    limits: ServeLimits | None = None,
) -> tuple[Any, Any]:
    """The server's FastAPI app with ``model`` (a local directory or a hub id) loaded and a copy of ``method``
    applied, and its model manager (``shutdown()`` it, or let the app's lifespan do it). ``limits``: what clients
    may send (default: :class:`~piofvlm.serve_limits.ServeLimits`, every limit at its safe default)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    serving = transformers_compat.serving()
    if Path(model).exists() and not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a model directory (no config.json)")
    limits = limits or ServeLimits()
    pinned = str(model)

    class PrunedModelManager(serving.ModelManager):
        """Applies a copy of the method to the model transformers serve loads; ``shutdown`` removes it and forgets
        model, handle and method together (``/reset`` runs it on the inference thread)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.slots: dict[int, _Slot] = {}
            super().__init__(*args, **kwargs)

        def _load_model(self, *args: Any, **kwargs: Any) -> Any:
            loaded = super()._load_model(*args, **kwargs).eval()
            if compile:  # generate() compiles static-cache decoding on accelerators only unless told otherwise
                loaded.generation_config.compile_config = transformers_compat.compile_config(
                    backend=compile_backend, mode=None if device == "cpu" else "reduce-overhead"
                )
            self.slots[id(loaded)] = _Slot(loaded, method)
            logger.info("piofvlm: %s applied to %s", method.to_dict(), type(loaded).__name__)
            return loaded

        def shutdown(self) -> None:
            for slot in list(self.slots.values()):
                slot.close()
            self.slots.clear()
            super().shutdown()

    class PrunedChatCompletionHandler(serving.ChatCompletionHandler):
        """transformers' chat handler with the model replaced by a :class:`_Generation` (the report) and the report
        added to the response (body and header) or to the stream's last chunk."""

        def _slot(self, model: Any) -> _Slot:
            return manager.slots[id(model)]

        async def _non_streaming(self, request_id: str, model: Any, *args: Any, **kwargs: Any) -> Any:
            generation = _Generation(self._slot(model), asyncio.get_running_loop())
            response = await super()._non_streaming(request_id, generation, *args, **kwargs)
            report = generation.report
            if report is None:
                return response
            payload = json.loads(response.body)
            payload.setdefault("usage", {})["piofvlm"] = report
            return JSONResponse(payload, headers={KEPT_HEADER: kept_header(report)})

        def _streaming(self, request_id: str, model: Any, *args: Any, **kwargs: Any) -> Any:
            generation = _Generation(self._slot(model), asyncio.get_running_loop())
            response = super()._streaming(request_id, generation, *args, **kwargs)
            response.body_iterator = _with_report(response.body_iterator, generation)
            return response

    manager = PrunedModelManager(
        device=device, dtype=dtype, attn_implementation=attn, force_model=pinned, model_timeout=-1
    )
    state = serving.GenerationState(compile=compile)
    chat = PrunedChatCompletionHandler(model_manager=manager, generation_state=state, chat_template_kwargs={})
    model_id = manager.process_model_name(pinned)

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        manager.shutdown()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, limits=limits)

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, error: ClientError) -> Any:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> Any:
        detail = error.detail if isinstance(error.detail, str) else quote(error.detail, 300)
        return error_response(ClientError(detail, status=error.status_code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> Any:
        return error_response(ClientError("the request does not have the expected fields"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ClientError("the request body is not JSON") from None
            visuals = validate_chat_body(body, limits, pinned)
            await _read_visuals(body, visuals, limits)
            try:
                return await chat.handle_request(body, request_id)
            except (ValueError, TypeError, KeyError, IndexError) as error:  # the processor refused the inputs
                raise ClientError(
                    f"the request could not be processed ({type(error).__name__}: {quote(str(error), 200)})"
                ) from None
        except (ClientError, HTTPException):
            raise
        except Exception as error:  # a server fault: logged without the request, answered in OpenAI's shape
            logger.error("piofvlm serve: %s on a chat request: %s", type(error).__name__, quote(str(error), 300))
            logger.debug("traceback", exc_info=True)
            return error_response(ClientError("internal server error (see the server log)", status=500))

    @app.get("/v1/models")
    def list_models() -> Any:
        return JSONResponse({"object": "list", "data": manager.list_models()})

    @app.get("/health")
    def health() -> Any:
        return JSONResponse({"status": "ok"})

    @app.post("/reset")
    async def reset() -> Any:
        """Unload the model: the method is removed on the inference thread (between two generations); the next
        request loads the model again."""
        await state.get_manager(model_id).async_submit(manager.shutdown)
        return JSONResponse({"status": "ok"})

    @app.post("/load_model")
    async def load_model(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ClientError("the request body is not JSON") from None
        requested = body.get("model") if isinstance(body, dict) else None
        if requested != pinned:
            raise ClientError(
                f"this server serves one model, {pinned!r}; it loads no other ({quote(requested)})",
                status=403,
                param="model",
                code="model_not_found",
            )
        await asyncio.to_thread(manager.load_model_and_processor, model_id)
        return JSONResponse({"status": "ready", "model": pinned})

    logger.info("piofvlm serve limits: %s", limits.describe())
    return app, manager


async def _read_visuals(body: dict, visuals: list[tuple[int, int, str]], limits: ServeLimits) -> None:
    """Replace each image URL of ``body`` by the decoded image, each video URL by its resolved path (read off the
    event loop; all or nothing)."""

    def read(i: int, j: int, kind: str) -> Any:
        part = body["messages"][i]["content"][j]
        ref = part[kind]
        url = ref["url"] if isinstance(ref, dict) else ref
        what = f"messages[{i}].content[{j}]"
        return load_image(url, limits, what) if kind == "image_url" else resolve_video_path(url, limits, what)

    results = await asyncio.gather(*(asyncio.to_thread(read, *v) for v in visuals), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    for (i, j, kind), value in zip(visuals, results, strict=True):
        body["messages"][i]["content"][j] = {"type": kind, kind: {"url": value}}


async def _with_report(chunks: Any, generation: _Generation) -> Any:
    """transformers' SSE chunks, with the report put into the ``usage`` of the last chunk (the one that carries
    ``finish_reason``), once the generation has finished."""
    async for chunk in chunks:
        if isinstance(chunk, str) and chunk.startswith("data: ") and '"finish_reason"' in chunk:
            try:
                event = json.loads(chunk[len("data: ") :])
            except json.JSONDecodeError:
                yield chunk
                continue
            report = await generation.done
            if report is not None:
                event.setdefault("usage", {})["piofvlm"] = report
            yield f"data: {json.dumps(event)}\n\n"
            continue
        yield chunk


def serve(
    model: str,
    method: Method,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    **kwargs: Any,
) -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    app, _ = build_app(model, method, limits=limits, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
