"""``piofvlm serve``: an OpenAI-compatible chat server with a pruning method applied.

piofvlm owns the whole server (no serving internal of transformers: ``transformers serve`` was rewritten twice, the
second time in 5.25); it calls only transformers' public API. Every input passes :mod:`piofvlm.serve_limits` first:

* routes: ``POST /v1/chat/completions`` (streaming or not), ``GET /v1/models``, ``GET /health``, ``POST /reset`` and
  ``POST /load_model`` (the pinned model only). Nothing else is mounted;
* a guard in front of the app refuses a Host header that is not allowed (DNS rebinding) and a body over the size cap;
* the server reads every image itself (data URL; a file under ``--image-dir``; an http(s) URL with ``--allow-fetch``),
  off the event loop, and hands the processor decoded images only: transformers never opens a path or a URL;
* every client mistake is a 4xx with OpenAI's error JSON (unknown fields 422, fields it cannot honour 400); nothing a
  client sent is logged;
* the chat core (:class:`ServedModel`): messages -> ``processor.apply_chat_template(..., tokenize=True,
  return_dict=True)`` -> ``model.generate`` with the request's generation config (:func:`generation_config`) ->
  an OpenAI ``chat.completion``, or ``chat.completion.chunk`` events (a :class:`~transformers.TextStreamer`), with
  ``usage`` (prompt and completion tokens) and ``finish_reason`` (``length`` when ``max_tokens`` ended it); ``stop``
  strings are cut from the answer (:class:`StopCut`);
* the model is loaded with ``from_pretrained`` from the pinned path (``--dtype``, ``--attn``, ``--device``:
  ``device_map`` off the CPU); a fresh copy of the method is applied to it; ``/reset`` or shutdown removes the method
  and forgets model, processor, handle and method together;
* each generation returns what it pruned, per image and video (the adapter's own per-item counts, as the mechanism
  groups them): ``usage.piofvlm`` and the header ``X-Piofvlm-Kept-Visual-Tokens`` of a response, and ``usage.piofvlm``
  of the last chunk of a stream. A text-only turn runs with the method's hooks lifted and says so. A stream's headers
  are sent after the prefill, so a prompt the method refuses is a 400 streamed or not.

Concurrency: :class:`ServedModel` owns the model on ONE inference thread (a single-worker executor): loading, every
``generate()`` and unloading run there one at a time, so the hooks' per-call state is never shared between two
requests. ``--compile`` switches decoding to a static cache compiled with ``torch.compile``.
"""

import asyncio
import copy
import gc
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from piofvlm import transformers_compat
from piofvlm.adapters import get_adapter
from piofvlm.adapters.base import ModelAdapter
from piofvlm.loading import DTYPES, looks_like_hub_id
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
        """``model.generate(**kwargs)`` and the prune report; a prompt the method or ``generate()`` refuses
        (``ValueError``) is a :class:`~piofvlm.serve_limits.ClientError`."""
        try:
            return self._generate(kwargs)
        except ValueError as error:  # the method (e.g. a count over an image's tokens) or generate() refuses it
            who = "the pruning method" if _raised_in_piofvlm(error) else "generate()"
            raise ClientError(f"{who} refused this prompt: {quote(str(error), 300)}") from None

    def _generate(self, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
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
        finally:
            self._recording = False
        items, self.items = self.items, None
        return output, pruning_report(self.method, items)

    def close(self) -> None:
        """Remove the method and the recording hook: the model is left as it was loaded."""
        self.handle.remove()
        self._capture.remove()


def _raised_in_piofvlm(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is piofvlm's code."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("piofvlm")


class _StopOnText(StoppingCriteria):
    """Stops ``generate()`` once the text generated after the prompt contains a stop string. (transformers'
    ``stop_strings`` reads the tokenizer's vocabulary and fails on some tokenizers, e.g. a word-level one without a
    decoder; decoding the generated tokens works with any.)"""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_tokens: int) -> None:
        self.tokenizer, self.stops, self.prompt_tokens = tokenizer, stops, prompt_tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = [
            any(
                stop in self.tokenizer.decode(row[self.prompt_tokens :], skip_special_tokens=True)
                for stop in self.stops
            )
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _Cancelled(Exception):
    """Raised in ``generate()`` by the streamer when the client of a stream went away: the generation stops."""


class StopCut:
    """Cuts an answer before the first stop string (OpenAI's ``stop``: the returned text does not contain it;
    ``generate()`` stops on the token that completes it, so that token's text is cut here). Fed the text as it is
    generated, it returns what may already be sent: text that could still begin a stop string is held back."""

    def __init__(self, stops: str | list[str] | None) -> None:
        self.stops = [stops] if isinstance(stops, str) else [s for s in stops or [] if s]
        self.hit = False
        self._held = ""

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        held = self._held + text
        cuts = [i for i in (held.find(stop) for stop in self.stops) if i >= 0]
        if cuts:
            self.hit, self._held = True, ""
            return held[: min(cuts)]
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if held.endswith(stop[:n])), default=0)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def finish(self) -> str:
        rest, self._held = ("" if self.hit else self._held), ""
        return rest


class _Streamer(TextStreamer):
    """Sends the text of each generated token to the event loop (``emit``) as soon as it is printable (and cannot
    be the start of a stop string); the first generated token also sends ``("started",)``: the prefill (where a
    method may refuse the prompt) is over. A set ``cancelled`` stops ``generate()`` at its next token."""

    def __init__(
        self, tokenizer: Any, stops: str | list[str] | None, emit: Callable[[tuple], None], cancelled: threading.Event
    ) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._cut = StopCut(stops)
        self._emit = emit
        self._cancelled = cancelled
        self._started = False

    def put(self, value: torch.Tensor) -> None:
        if self._cancelled.is_set():
            raise _Cancelled()
        if not self.next_tokens_are_prompt and not self._started:
            self._started = True
            self._emit(("started",))
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        text = self._cut.feed(text) + (self._cut.finish() if stream_end else "")
        if text:
            self._emit(("text", text))


@dataclass
class _Answer:
    """One finished generation: the text, the token counts and the prune report."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    report: dict[str, Any]

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "piofvlm": self.report,
        }


def processor_messages(messages: list[dict]) -> tuple[list[dict], bool]:
    """OpenAI chat messages (images already decoded by the server, videos resolved to paths) as a processor's chat
    template takes them: every content a list of ``{"type": "text" | "image" | "video", ...}`` parts; tool calls of
    earlier turns are passed on with their arguments parsed. Returns ``(messages, has_video)``."""
    converted, has_video = [], False
    for message in messages:
        parsed: dict[str, Any] = {"role": message["role"], "content": []}
        if message.get("tool_calls"):
            calls = []
            for call in copy.deepcopy(message["tool_calls"]):
                function = call.get("function", call) if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except json.JSONDecodeError:
                        raise ClientError("tool_calls[].function.arguments must be JSON", param="messages") from None
                calls.append(call)
            parsed["tool_calls"] = calls
        if "tool_call_id" in message:
            parsed["tool_call_id"] = message["tool_call_id"]
        content = [] if message.get("tool_calls") else (message.get("content") or [])
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        for part in content:
            kind = part["type"]
            if kind == "text":
                parsed["content"].append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                parsed["content"].append({"type": "image", "image": part["image_url"]["url"]})
            elif kind == "video_url":
                has_video = True
                parsed["content"].append({"type": "video", "url": part["video_url"]["url"]})
        converted.append(parsed)
    return converted, has_video


def generation_config(body: dict[str, Any], base: Any, *, compile: bool = False) -> Any:
    """The generation config of one request: the model's own, with the request's ``max_tokens`` /
    ``max_completion_tokens`` (new tokens), ``temperature`` (0: greedy; above 0: sampling), ``top_p``,
    ``frequency_penalty`` (as ``repetition_penalty = 1 + frequency_penalty``) and ``logit_bias`` (``sequence_bias``);
    a static cache with ``compile``. ``stop`` is not set here (:class:`_StopOnText` and :class:`StopCut` do it).
    ``body`` was checked by :func:`~piofvlm.serve_limits.validate_chat_body`, which also set ``max_tokens`` when the
    request gave none."""
    config = copy.deepcopy(base)
    if body.get("max_completion_tokens") is not None:
        config.max_new_tokens = int(body["max_completion_tokens"])
    else:
        config.max_new_tokens = int(body["max_tokens"])
    if body.get("temperature") is not None:
        temperature = float(body["temperature"])
        config.do_sample = temperature > 0
        if temperature > 0:
            config.temperature = temperature
    if body.get("top_p") is not None:
        config.top_p = float(body["top_p"])
    if body.get("frequency_penalty") is not None:
        config.repetition_penalty = 1.0 + float(body["frequency_penalty"])
    if body.get("logit_bias") is not None:
        config.sequence_bias = {(int(k),): float(v) for k, v in body["logit_bias"].items()}
    if compile and config.cache_implementation is None:
        config.cache_implementation = "static"
    return config


class ServedModel:
    """The pinned model, its processor and its copy of the method, owned by ONE inference thread (a single-worker
    executor): loading, every generation and unloading run there, one at a time, so the hooks' per-call state is
    never shared between two requests (``docs/threads.md``).

    ``slot`` is the loaded :class:`_Slot` (``None`` until the first request, ``/load_model``, or :meth:`load`, and
    after ``/reset``); read it from the inference thread only, or between requests in tests."""

    def __init__(
        self,
        model: str,
        method: Method,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        attn: str = "sdpa",
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.model_id = str(model)
        self.method = method
        self.device, self.dtype, self.attn = device, dtype, attn
        self.compile, self.compile_backend = compile, compile_backend
        self.slot: _Slot | None = None
        self.processor: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="piofvlm-inference")
        self._closed = False

    # -- on the inference thread
    def _loaded(self) -> _Slot:
        """The slot, loading the model first if needed (inference thread)."""
        if self.slot is not None:
            return self.slot
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kwargs: dict[str, Any] = {"dtype": DTYPES[self.dtype], "attn_implementation": self.attn}
        if self.device != "cpu":
            kwargs["device_map"] = self.device
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.model_id, **kwargs).eval()
        except ImportError as error:  # e.g. flash_attention_2 without the flash-attn package
            raise ValueError(
                f"attention implementation {self.attn!r} cannot be used here: {str(error).splitlines()[0]} Use "
                "'sdpa' (the default) or install what it needs"
            ) from error
        processor = AutoProcessor.from_pretrained(self.model_id)
        if self.compile:  # generate() compiles static-cache decoding on accelerators only unless told otherwise
            model.generation_config.compile_config = transformers_compat.compile_config(
                backend=self.compile_backend, mode=None if self.device == "cpu" else "reduce-overhead"
            )
        self.slot, self.processor = _Slot(model, self.method), processor
        logger.info("piofvlm: %s applied to %s", self.method.to_dict(), type(model).__name__)
        return self.slot

    def _load(self) -> None:
        self._loaded()  # the slot is not returned: no future holds the model after /reset

    def _unload(self) -> None:
        """Remove the method and forget model, processor, handle and method (inference thread)."""
        slot, self.slot, self.processor = self.slot, None, None
        if slot is not None:
            slot.close()
            del slot
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _inputs(self, body: dict[str, Any]) -> dict[str, Any]:
        messages, has_video = processor_messages(body["messages"])
        try:
            inputs = self.processor.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                **({"num_frames": 32} if has_video else {}),  # some video processors read every frame otherwise
            )
        except (ValueError, TypeError, KeyError, IndexError, OSError) as error:  # the processor refused the inputs
            raise ClientError(
                f"the request could not be processed ({type(error).__name__}: {quote(str(error), 200)})"
            ) from None
        return dict(inputs.to(self.slot.model.device))  # type: ignore[union-attr]

    def _generate(
        self, body: dict[str, Any], stream: tuple[Callable[[tuple], None], threading.Event] | None = None
    ) -> _Answer:
        """Load if needed, build the inputs with the chat template, generate (inference thread). ``stream``:
        ``(emit, cancelled)`` to stream the text through a :class:`_Streamer`."""
        slot = self._loaded()
        inputs = self._inputs(body)
        config = generation_config(body, slot.model.generation_config, compile=self.compile)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        prompt_tokens = int(inputs["input_ids"].shape[-1])
        cut = StopCut(body.get("stop"))
        kwargs = {**inputs, "generation_config": config}
        if cut.stops:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnText(tokenizer, cut.stops, prompt_tokens)])
        if stream is not None:
            kwargs["streamer"] = _Streamer(tokenizer, cut.stops, *stream)
        if body.get("seed") is not None:
            torch.manual_seed(int(body["seed"]))
        output, report = slot.generate(kwargs)
        new = output[0, prompt_tokens:].tolist()
        eos = config.eos_token_id
        eos = set(eos if isinstance(eos, list | tuple) else [] if eos is None else [eos])
        ended = bool(new) and new[-1] in eos
        text = cut.feed(tokenizer.decode(new, skip_special_tokens=True)) + cut.finish()
        finish = "length" if len(new) >= config.max_new_tokens and not ended and not cut.hit else "stop"
        return _Answer(text, prompt_tokens, len(new), finish, report)

    # -- from the event loop
    def _submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        if self._closed:
            raise RuntimeError("the server is shutting down")
        return asyncio.wrap_future(self._executor.submit(fn, *args))

    async def answer(self, body: dict[str, Any]) -> _Answer:
        """Generate the answer of a checked request (inference thread)."""
        return await self._submit(self._generate, body)

    async def stream(self, body: dict[str, Any]) -> tuple[tuple, asyncio.Queue, threading.Event]:
        """Start a streamed generation: ``(first event, queue of the next ones, cancel)``. Events: ``("started",)``,
        ``("text", str)``, ``("end", _Answer)``, ``("error", exception)``. Returns once the prefill is over (the first
        token) or the generation failed, so a refused prompt is still answered with a 4xx."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(event: tuple) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def run() -> None:
            try:
                emit(("end", self._generate(body, (emit, cancelled))))
            except _Cancelled:
                emit(("end", None))
            except Exception as error:  # noqa: BLE001 - handed to the request, which answers it
                emit(("error", error))

        self._submit(run)
        first = await queue.get()
        if first[0] == "error":
            raise first[1]
        return first, queue, cancelled

    async def load(self) -> None:
        """Load the model (inference thread) if it is not loaded."""
        await self._submit(self._load)

    async def reset(self) -> None:
        """Unload the model between two generations (inference thread); the next request loads it again."""
        await self._submit(self._unload)

    def load_now(self) -> None:
        """Load the model before the server starts (blocking): a model that cannot load fails here, not on a
        request."""
        self._executor.submit(self._load).result()

    def shutdown(self) -> None:
        """Remove the method, forget the model and stop the inference thread (after the generation under way).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._executor.submit(self._unload).result()
        self._executor.shutdown(wait=True)

    def models(self) -> list[dict[str, Any]]:
        """``/v1/models``: the pinned model alone."""
        owner = self.model_id.split("/")[0] if looks_like_hub_id(self.model_id) else "local"
        status = "loaded" if self.slot is not None else "unloaded"
        return [{"id": self.model_id, "object": "model", "created": 0, "owned_by": owner, "status": {"value": status}}]


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


_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _completion(request_id: str, model_id: str, answer: _Answer) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` object."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": answer.usage(),
    }


def _chunk(request_id: str, model_id: str, delta: dict[str, Any], **fields: Any) -> str:
    """One ``chat.completion.chunk`` as a server-sent event."""
    choice = {"index": 0, "delta": delta, "finish_reason": fields.pop("finish_reason", None)}
    event = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model_id,
        "system_fingerprint": "",
        "choices": [choice],
        **fields,
    }
    return f"data: {json.dumps(event)}\n\n"


async def _events(
    request_id: str, model_id: str, first: tuple, queue: asyncio.Queue, cancelled: threading.Event
) -> AsyncIterator[str]:
    """The SSE chunks of a streamed answer: the role, the text as it is generated, then a last chunk with
    ``finish_reason`` and ``usage`` (``usage.piofvlm``: the prune report). A client that goes away stops the
    generation (the streamer raises on its next token)."""
    try:
        yield _chunk(request_id, model_id, {"role": "assistant", "content": ""})
        event = first
        while True:
            if event[0] == "text":
                yield _chunk(request_id, model_id, {"content": event[1]})
            elif event[0] == "error":
                error = event[1]
                if not isinstance(error, ClientError):
                    logger.error("piofvlm serve: %s in a stream: %s", type(error).__name__, quote(str(error), 300))
                    error = ClientError("internal server error (see the server log)", status=500)
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            elif event[0] == "end":
                answer = event[1]
                if answer is not None:
                    yield _chunk(request_id, model_id, {}, finish_reason=answer.finish_reason, usage=answer.usage())
                return
            event = await queue.get()
    finally:
        cancelled.set()  # a no-op once the generation has ended


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
) -> tuple[Any, ServedModel]:
    """The server's FastAPI app serving ``model`` (a local checkpoint directory, or a hub id from_pretrained finds)
    with a copy of ``method`` applied, and its :class:`ServedModel` (``shutdown()`` it, or let the app's lifespan do
    it). The model loads on the first request (or :meth:`ServedModel.load_now`). ``limits``: what clients may send
    (default: :class:`~piofvlm.serve_limits.ServeLimits`, every limit at its safe default)."""
    from contextlib import asynccontextmanager

    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError as error:
        raise ImportError(
            f"piofvlm serve needs the serve extra ({error.name} is missing): pip install 'piofvlm[serve]'"
        ) from error

    if Path(model).exists() and not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a model directory (no config.json)")
    limits = limits or ServeLimits()
    pinned = str(model)
    served = ServedModel(
        pinned, method, device=device, dtype=dtype, attn=attn, compile=compile, compile_backend=compile_backend
    )

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        await asyncio.to_thread(served.shutdown)

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
        given = request.headers.get("x-request-id") or ""
        request_id = given if _REQUEST_ID.fullmatch(given) else f"chatcmpl-{uuid.uuid4().hex}"
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ClientError("the request body is not JSON") from None
            visuals = validate_chat_body(body, limits, pinned)
            await _read_visuals(body, visuals, limits)
            if body.get("stream"):
                first, queue, cancelled = await served.stream(body)
                events = _events(request_id, pinned, first, queue, cancelled)
                return StreamingResponse(events, media_type="text/event-stream")
            answer = await served.answer(body)
            return JSONResponse(
                _completion(request_id, pinned, answer), headers={KEPT_HEADER: kept_header(answer.report)}
            )
        except (ClientError, HTTPException):
            raise
        except Exception as error:  # a server fault: logged without the request, answered in OpenAI's shape
            logger.error("piofvlm serve: %s on a chat request: %s", type(error).__name__, quote(str(error), 300))
            logger.debug("traceback", exc_info=True)
            return error_response(ClientError("internal server error (see the server log)", status=500))

    @app.get("/v1/models")
    def list_models() -> Any:
        return JSONResponse({"object": "list", "data": served.models()})

    @app.get("/health")
    def health() -> Any:
        return JSONResponse({"status": "ok"})

    @app.post("/reset")
    async def reset() -> Any:
        """Unload the model: the method is removed on the inference thread (between two generations); the next
        request loads the model again."""
        await served.reset()
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
        await served.load()
        return JSONResponse({"status": "ready", "model": pinned})

    logger.info("piofvlm serve limits: %s", limits.describe())
    return app, served


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

    app, served = build_app(model, method, limits=limits, **kwargs)
    try:
        served.load_now()  # a model that cannot load fails here (the CLI says why), not on the first request
    except BaseException:
        served.shutdown()
        raise
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
