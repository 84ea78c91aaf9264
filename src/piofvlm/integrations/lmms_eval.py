"""lmms-eval model ``piofvlm``: a Hugging Face VLM with a piofvlm method applied while it answers.

Registered through the ``lmms_eval.models`` entry point (:func:`piofvlm.integrations.lmms_eval_manifest`). After
the install in the README section "Evaluate on standard benchmarks" (lmms-eval with ``--no-deps``, then
``piofvlm[eval]``; no torchvision)::

    python -m lmms_eval --model piofvlm --model_args pretrained=DIR,method=pio,keep=0.111 --tasks pope --batch_size 8
    torchrun --nproc-per-node 8 -m lmms_eval --model piofvlm --model_args ... --tasks pope --batch_size 8
    ACCELERATE_USE_CPU=true torchrun --nproc-per-node 2 -m lmms_eval ...        # N ranks on CPUs (gloo)

Model args: ``pretrained`` (a local checkpoint directory or hub id, loaded with ``AutoModelForImageTextToText``),
``method`` (any of :func:`piofvlm.available_methods`, default ``pio``), ``device``, ``dtype`` (``auto``: bfloat16
on CUDA, float32 on CPU), ``attn_implementation``, ``batch_size``, and every field of the method (``keep``,
``layers``, ``tau``, ...), typed after the method's dataclass: a list is written ``layers=[2,8]``, ``None`` as
``none``. A keep ratio needs a decimal point (``keep=1.0``: all tokens; ``keep=1``: one token).

Models bigger than one device (``docs/scaling.md``): ``device_map`` (``auto``, ``balanced``, ``balanced_low_0``,
``sequential``, a device, or a JSON object of module -> device) with optional ``max_memory`` (a JSON object such
as ``{"0":"70GiB","1":"70GiB","cpu":"200GiB"}``) and ``offload_folder`` (disk offload), in one process; or
``tp_plan=auto`` under ``torchrun --nproc-per-node N``: the N ranks then form one tensor-parallel model and answer
every request together (no data parallelism; each rank returns its own shard's answers to lmms-eval).

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

from piofvlm import transformers_compat
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


MODEL_ARGS = (
    "pretrained",
    "method",
    "device",
    "dtype",
    "attn_implementation",
    "batch_size",
    "max_batch_size",
    "device_map",
    "max_memory",
    "offload_folder",
    "tp_plan",
)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_name(value: Any, what: str) -> Any:
    """A device of a ``device_map``: a GPU index (int >= 0), ``disk``, or a name ``torch.device`` accepts."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if value == "disk":
        return value
    if isinstance(value, str):
        try:
            torch.device(value)
            return value
        except RuntimeError:
            pass
    raise ValueError(f"{what}: {value!r} is not a device (a GPU index, cpu, cuda:N, mps, disk)")


def big_model_args(
    device_map: Any, max_memory: Any, offload_folder: Any, tp_plan: Any, device: Any, world_size: int
) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``device_map`` / ``max_memory`` / ``offload_folder`` / ``tp_plan``.

    Raises:
        ValueError: a value of the wrong form, ``max_memory`` / ``offload_folder`` without ``device_map``,
            ``device_map`` with ``tp_plan`` or with ``device`` or under several data-parallel processes, ``tp_plan``
            without ``torchrun``, each saying what to write instead.
    """
    kwargs: dict[str, Any] = {}
    if device_map is not None:
        value = _parse_json_object(device_map, "device_map")
        if isinstance(value, dict):
            kwargs["device_map"] = {str(k): _device_name(v, f"device_map[{k!r}]") for k, v in value.items()}
        elif value in DEVICE_MAP_STRATEGIES:
            kwargs["device_map"] = value
        else:
            try:
                kwargs["device_map"] = _device_name(value, "device_map")
            except ValueError:
                raise ValueError(
                    f"device_map={device_map!r}: expected one of {', '.join(DEVICE_MAP_STRATEGIES)}, a device "
                    '(0, cpu, cuda:1) or a JSON object of module -> device (device_map={"":"cpu"})'
                ) from None
        if device is not None:
            raise ValueError(f"give device_map or device, not both (device_map={device_map!r}, device={device!r})")
        if world_size > 1:
            raise ValueError(
                f"device_map={device_map!r} under {world_size} data-parallel processes would spread every process "
                "over the same devices: run one process with device_map, or tp_plan=auto under torchrun "
                "(docs/scaling.md)"
            )
    for name, value in (("max_memory", max_memory), ("offload_folder", offload_folder)):
        if value is not None and device_map is None:
            raise ValueError(f"{name} needs device_map (e.g. device_map=auto,{name}=...)")
    if max_memory is not None:
        memory = _parse_json_object(max_memory, "max_memory")
        if not isinstance(memory, dict) or not memory:
            raise ValueError(
                f"max_memory={max_memory!r}: expected a JSON object of device -> size, "
                'e.g. {"0":"20GiB","cpu":"64GiB"}'
            )
        parsed: dict[Any, Any] = {}
        for key, size in memory.items():
            device_key: Any = int(key) if str(key).isdigit() else _device_name(key, f"max_memory key {key!r}")
            if isinstance(size, bool) or not isinstance(size, (int, str)):
                raise ValueError(f"max_memory[{key!r}]={size!r}: expected bytes (int) or a size like '20GiB'")
            parsed[device_key] = size
        kwargs["max_memory"] = parsed
    if offload_folder is not None:
        if not isinstance(offload_folder, str) or not offload_folder:
            raise ValueError(f"offload_folder={offload_folder!r}: expected a directory path")
        kwargs["offload_folder"] = offload_folder
    if tp_plan is not None:
        if tp_plan != "auto":
            raise ValueError(f"tp_plan={tp_plan!r}: only tp_plan=auto (the checkpoint's own plan) is supported")
        if device_map is not None:
            raise ValueError("give tp_plan or device_map, not both")
        if world_size < 2:
            raise ValueError(
                "tp_plan=auto shards the model over the ranks of torchrun: launch with torchrun --nproc-per-node N "
                "(on CPUs with ACCELERATE_USE_CPU=true); see docs/scaling.md"
            )
        kwargs.update(transformers_compat.tensor_parallel_kwargs("auto"))
    return kwargs


def _parse_json_object(value: Any, name: str) -> Any:
    """``value`` itself, or the JSON object a string starting with ``{`` holds."""
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"cannot parse {name}={value!r} as a JSON object: {err}") from None
    return value


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
        device_map: ``auto``, ``balanced``, ``balanced_low_0``, ``sequential``, a device, or a JSON object of
            module -> device (transformers' ``from_pretrained(device_map=...)``), in one process.
        max_memory: with ``device_map``: a JSON object of device -> size (``{"0":"70GiB","cpu":"200GiB"}``).
        offload_folder: with ``device_map``: where weights that fit nowhere else are offloaded to disk.
        tp_plan: ``auto``: tensor parallelism over the ranks of ``torchrun``; every rank answers every request
            with its shard of the model (each generate is collective) and returns its own requests' answers.
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
        device_map: Any = None,
        max_memory: Any = None,
        offload_folder: str | None = None,
        tp_plan: str | None = None,
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
        big = big_model_args(device_map, max_memory, offload_folder, tp_plan, device, self._world_size)
        self._tensor_parallel = "distributed_config" in big
        if self._world_size > 1:  # one model per process: cuda:<local rank> when there is CUDA, else the CPU
            local = self.accelerator.local_process_index
            device = f"cuda:{local}" if torch.cuda.is_available() and device != "cpu" else "cpu"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "bfloat16" if self._device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
        if big:  # placed by transformers (device_map / tensor parallelism): never moved afterwards
            model, self.processor = self.load(pretrained, DTYPES[dtype], attn_implementation, **big)
            self._model = model.eval()
            if "device_map" in big:  # inputs go where the first weights are (the CPU when they are on disk)
                first = self._model.device
                self._device = first if first.type != "meta" else torch.device("cpu")
        else:
            model, self.processor = self.load(pretrained, DTYPES[dtype], attn_implementation)
            self._model = model.to(self._device).eval()
        self.processor.tokenizer.padding_side = "left"  # batched generation
        if not getattr(self.processor, "chat_template", None):
            image_token = getattr(self.processor, "image_token", None) or "<image>"
            self.processor.chat_template = FALLBACK_CHAT_TEMPLATE.replace("<image>", image_token)
        self.pretrained = pretrained
        logger.info("piofvlm lmms-eval model: %s on %s, method %s", pretrained, self._device, self.method.to_dict())

    def load(
        self, pretrained: str, dtype: torch.dtype, attn_implementation: str, **placement: Any
    ) -> tuple[torch.nn.Module, Any]:
        """``(model, processor)`` of ``pretrained``, refused before any weight is read if piofvlm cannot adapt it.

        ``placement``: ``device_map`` / ``max_memory`` / ``offload_folder`` / ``tp_plan`` for ``from_pretrained``."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        config = AutoConfig.from_pretrained(pretrained)
        if config.model_type not in ADAPTERS:
            raise ValueError(
                f"{pretrained}: model_type {config.model_type!r} is not supported by piofvlm; "
                f"supported: {', '.join(sorted(ADAPTERS))}"
            )
        model = AutoModelForImageTextToText.from_pretrained(
            pretrained, dtype=dtype, attn_implementation=attn_implementation, **placement
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
        if self._tensor_parallel:
            return self._generate_until_tensor_parallel(requests)
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

    def _generate_until_tensor_parallel(self, requests: list[Instance]) -> list[GenerationResult]:
        """Under ``tp_plan``: every rank answers the requests of all ranks, in the same batches (each ``generate`` is
        a collective over the tensor-parallel group), and returns the answers to its own requests."""
        import torch.distributed as dist

        local = []
        for request in requests:
            _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            local.append((ChatMessages(messages=doc_to_messages(doc)), dict(gen_kwargs), str(request.args[0])))
        shards: list[Any] = [None] * self._world_size
        dist.all_gather_object(shards, local)
        everything = [item for shard in shards for item in shard]
        groups: dict[str, list[int]] = {}  # same generation kwargs, in rank then request order
        for i, (_, gen_kwargs, _) in enumerate(everything):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        answers: list[GenerationResult | None] = [None] * len(everything)
        bar = tqdm(total=len(everything), disable=self.rank != 0, desc="piofvlm responding (tensor parallel)")
        with torch.no_grad(), self.method(self._model):
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    texts, lengths = self._generate([everything[i][0] for i in batch], dict(everything[batch[0]][1]))
                    for i, text, length in zip(batch, texts, lengths, strict=True):
                        answers[i] = GenerationResult(text=text, token_counts=TokenCounts(output_tokens=length))
                    bar.update(len(batch))
        bar.close()
        offset = sum(len(shard) for shard in shards[: self._rank])
        mine = answers[offset : offset + len(local)]
        for answer, (_, gen_kwargs, context) in zip(mine, local, strict=True):
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer.text)
        return mine

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
