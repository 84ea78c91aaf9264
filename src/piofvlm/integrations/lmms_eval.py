"""lmms-eval model ``piofvlm``: a Hugging Face VLM with a piofvlm method applied while it answers.

Registered through the ``lmms_eval.models`` entry point (:func:`piofvlm.integrations.lmms_eval_manifest`). After
the install in the README section "Evaluate on standard benchmarks" (lmms-eval with ``--no-deps``, then
``piofvlm[eval]``; no torchvision)::

    python -m lmms_eval --model piofvlm --model_args pretrained=DIR,method=pio,keep=0.111 --tasks pope --batch_size 8
    accelerate launch --num_processes 8 -m lmms_eval --model piofvlm --model_args ... --tasks pope --batch_size 8

Model args: ``pretrained`` (a local checkpoint directory or hub id, loaded with ``AutoModelForImageTextToText``),
``method`` (any of :func:`piofvlm.available_methods`, default ``pio``), ``device``, ``dtype`` (``auto``: bfloat16
on CUDA, float32 on CPU), ``attn_implementation``, ``batch_size``, and every field of the method (``keep``,
``layers``, ``tau``, ...), typed after the method's dataclass: a list is written ``layers=[2,8]``, ``None`` as
``none``. A keep ratio needs a decimal point (``keep=1.0``: all tokens; ``keep=1``: one token).

lmms-eval's own ``huggingface`` / ``llava_hf`` wrappers are not subclassed: in lmms-eval 0.7.3 they bind every
process to ``cuda:<rank>`` and assert a GPU backend (so ``accelerate launch --cpu`` fails), hard-code the dtype, pass
``audios=`` that transformers 5 processors reject, and ``llava_hf`` asserts batch size 1. What this class reuses
is lmms-eval's request plumbing: ``lmms``, ``Collator`` (grouping by generation kwargs, original order back) and
``ChatMessages`` (media extraction, HF message format). Data parallelism is lmms-eval's evaluator's: every process
builds its own model and method and hooks only that model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import types
import typing
from typing import Any

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from tqdm.auto import tqdm

from piofvlm.adapters import ADAPTERS
from piofvlm.loading import DTYPES
from piofvlm.registry import get_method, method_class, method_fields

logger = logging.getLogger(__name__)

# LLaVA-1.5's prompt (what piofvlm.loading.build_prompt uses) for processors that ship no chat template.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# ------------------------------------------------------------------------------------------------ model args
def _parse_text(value: Any) -> Any:
    """lmms-eval already turned numbers and booleans into Python values; here ``[2,8]`` -> list, ``none`` -> None."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null"):
        return None
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"cannot parse {value!r} as a list (write it like [2,8]): {err}") from None
    return value


def _coerce(value: Any, annotation: Any, widen: bool = True) -> tuple[bool, Any]:
    """``(True, value converted to annotation)`` if ``value`` fits ``annotation``, else ``(False, None)``.

    An int is widened to a float field, except in a union that takes the int as it is (``keep: float | int``).
    """
    if annotation is Any:
        return True, value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for strict in (True, False) if widen else (True,):
            for member in typing.get_args(annotation):
                ok, converted = _coerce(value, member, widen=not strict)
                if ok:
                    return True, converted
        return False, None
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        if isinstance(value, (list, tuple)):
            items = [_coerce(v, item, widen) for v in value]
            return (True, [v for _, v in items]) if all(ok for ok, _ in items) else (False, None)
        return _coerce(value, item, widen)  # a single value where a list is expected: the methods accept one stage
    if annotation is type(None):
        return value is None, None
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        ok = isinstance(value, (int, float) if widen else float) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if annotation is str:
        return isinstance(value, str), value
    return True, value  # anything else: the method's own validation decides


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def method_from_model_args(name: str, fields: dict[str, Any]) -> Any:
    """Build method ``name`` from ``--model_args`` values, each checked against the method's field types.

    Raises:
        ValueError: unknown method, unknown field (both list what is valid), or a value of the wrong type.
    """
    cls = method_class(name)
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    known = method_fields(cls)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"unknown model_args {', '.join(map(repr, unknown))} for method {name!r}: its fields are "
            f"{', '.join(sorted(known)) or '(none)'}; the model's own args are {', '.join(MODEL_ARGS)}"
        )
    typed = {}
    for key, raw in fields.items():
        value = _parse_text(raw)
        ok, converted = _coerce(value, hints.get(key, Any))
        if not ok:
            raise ValueError(
                f"model_arg {key}={raw!r} for method {name!r}: expected {_type_name(hints[key])}, "
                f"got {type(value).__name__}"
            )
        typed[key] = converted
    return get_method(name, **typed)


MODEL_ARGS = ("pretrained", "method", "device", "dtype", "attn_implementation", "batch_size", "max_batch_size")


# ----------------------------------------------------------------------------------------------------- model
class PiofvlmModel(lmms):
    """A ``transformers`` image-text-to-text model answering lmms-eval requests with a piofvlm method applied.

    Args:
        pretrained: checkpoint directory or hub id; its ``config.model_type`` must be one of ``piofvlm.ADAPTERS``.
        method: a registered method name (``none`` for the unpruned model).
        device: ``cuda``, ``cpu``, ...; under several processes each uses ``cuda:<local rank>`` when CUDA is
            available, else the CPU.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU) or one of float32, bfloat16, float16, float64.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``; some methods need eager or sdpa.
        batch_size: requests per ``generate`` call (left padding; results equal batch size 1).
        **method_fields: fields of the method, typed after its dataclass (``keep=0.111``, ``layers=[2,8]``).
    """

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        method: str = "pio",
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **method_fields: Any,
    ) -> None:
        super().__init__()
        from accelerate import Accelerator

        self.method = method_from_model_args(method, method_fields)  # validated before anything is loaded
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the piofvlm model; give an integer")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")

        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        if self._world_size > 1:  # one model per process: cuda:<local rank> when there is CUDA, else the CPU
            local = self.accelerator.local_process_index
            device = f"cuda:{local}" if torch.cuda.is_available() and device != "cpu" else "cpu"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "bfloat16" if self._device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
        model, self.processor = self.load(pretrained, DTYPES[dtype], attn_implementation)
        self._model = model.to(self._device).eval()
        self.processor.tokenizer.padding_side = "left"  # batched generation
        if not getattr(self.processor, "chat_template", None):
            image_token = getattr(self.processor, "image_token", None) or "<image>"
            self.processor.chat_template = FALLBACK_CHAT_TEMPLATE.replace("<image>", image_token)
        self.pretrained = pretrained
        logger.info("piofvlm lmms-eval model: %s on %s, method %s", pretrained, self._device, self.method.to_dict())

    def load(self, pretrained: str, dtype: torch.dtype, attn_implementation: str) -> tuple[torch.nn.Module, Any]:
        """``(model, processor)`` of ``pretrained``, refused before any weight is read if piofvlm cannot adapt it."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        config = AutoConfig.from_pretrained(pretrained)
        if config.model_type not in ADAPTERS:
            raise ValueError(
                f"{pretrained}: model_type {config.model_type!r} is not supported by piofvlm; "
                f"supported: {', '.join(sorted(ADAPTERS))}"
            )
        model = AutoModelForImageTextToText.from_pretrained(
            pretrained, dtype=dtype, attn_implementation=attn_implementation
        )
        return model, AutoProcessor.from_pretrained(pretrained)

    # lmms-eval reads these.
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def config(self) -> Any:
        return self._model.config

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the piofvlm model answers generation tasks only (generate_until)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the piofvlm model answers single-round generation tasks only (generate_until)")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Greedy (or sampled, per the task's generation kwargs) answers, ``batch_size`` requests per call."""
        args = [request.args for request in requests]  # (context, doc_to_messages, gen_kwargs, doc_id, task, split)
        collator = lmms_utils.Collator(args, lambda a: (a[3], a[3]), group_fn=lambda a: a[2], grouping=True)
        results: list[GenerationResult] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="piofvlm responding")
        with torch.no_grad(), self.method(self._model):
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                _, doc_to_messages, all_gen_kwargs, doc_ids, tasks, splits = zip(*chunk, strict=True)
                messages = [
                    ChatMessages(messages=doc_to_messages[0](self.task_dict[task][split][doc_id]))
                    for doc_id, task, split in zip(doc_ids, tasks, splits, strict=True)
                ]
                texts, lengths = self._generate(messages, dict(all_gen_kwargs[0]))
                for text, length, context in zip(texts, lengths, messages, strict=True):
                    results.append(GenerationResult(text=text, token_counts=TokenCounts(output_tokens=length)))
                    self.cache_hook.add_partial("generate_until", (str(context), all_gen_kwargs[0]), text)
                bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)

    def _generate(self, messages: list[ChatMessages], gen_kwargs: dict[str, Any]) -> tuple[list[str], list[int]]:
        """One batched ``generate``: decoded answers (cut at the first ``until`` string) and their token counts."""
        images, videos = [], []
        for message in messages:
            image, video, _ = message.extract_media()
            images += image
            videos += video
        prompts = [
            self.processor.apply_chat_template(m.to_hf_messages(), tokenize=False, add_generation_prompt=True)
            for m in messages
        ]
        media: dict[str, Any] = {"images": images or None}
        if videos:
            media["videos"] = videos
        inputs = self.processor(text=prompts, padding=True, return_tensors="pt", **media).to(self._device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self._model.dtype)
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
        options = {
            "max_new_tokens": int(gen_kwargs.pop("max_new_tokens", 128)),
            "num_beams": int(gen_kwargs.pop("num_beams", 1)),
            "do_sample": sample,
        }
        if sample:
            options["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = gen_kwargs["top_p"]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        output = self._model.generate(**inputs, pad_token_id=pad, **options)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        for stop in until:
            texts = [text.split(stop)[0] if stop else text for text in texts]
        lengths = [int((row != pad).sum()) for row in new_tokens]
        return [text.strip() for text in texts], lengths
