"""Load a checkpoint directory (hub layout) and build prompts, the same way for every command."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def load_model(
    path: str | Path, dtype: str = "float32", attn: str = "sdpa", device: str = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """``from_pretrained`` of a local directory: the model (eval mode) and its processor (left padding)."""
    if not Path(path).is_dir() and looks_like_hub_id(str(path)):
        path = str(path)  # a hub id already checked by resolve_checkpoint (from_pretrained downloads it)
    else:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a model directory (no config.json); give a local checkpoint directory"
            )
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_device(device)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation=attn)
    except ImportError as error:  # e.g. flash_attention_2 without the flash-attn package
        raise ValueError(
            f"attention implementation {attn!r} cannot be used here: {str(error).splitlines()[0]} Use 'sdpa' (the "
            "default) or install what it needs"
        ) from error
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` if it is malformed or this torch build cannot use it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {error}") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: this torch build ({torch.__version__}) sees no CUDA device; use 'cpu' or install a "
            "CUDA build of torch"
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine; use 'cpu'")
    return parsed


def build_prompt(processor: Any, question: str) -> str:
    """A prompt with one image placeholder: the question as given if it has one, else the chat template, else
    LLaVA-1.5's ``USER: <image>\\n{question} ASSISTANT:``."""
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in question:
        return question
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: {image_token}\n{question} ASSISTANT:"


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` with no path elsewhere on disk: what the hub would be asked for."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(text).exists()


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for the local cache only."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in
               ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))  # fmt: skip


def hub_reachable(timeout: float = 3.0) -> str | None:
    """None if the hub's host (``HF_ENDPOINT``, default huggingface.co) accepts a connection within ``timeout``
    seconds, else why not."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"{host}:{port} cannot be reached ({error})"
    return None


def read_config(model: str | Path) -> tuple[str | Path, dict[str, Any]]:
    """``(what from_pretrained should get, the checkpoint's config.json)`` of a local directory or a hub id, read
    before anything heavy loads. A hub id is read from the local cache when ``HF_HUB_OFFLINE`` is set; otherwise the
    hub must answer within seconds (no retry loop). ``FileNotFoundError`` / ``ValueError`` say what to do."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a model directory (no config.json); give a local checkpoint directory"
            )
        return path, json.loads((path / "config.json").read_text())
    if not looks_like_hub_id(str(model)):
        raise FileNotFoundError(
            f"{model} is neither a local checkpoint directory nor a hub id (owner/name); give a directory with "
            "config.json, or a hub id such as llava-hf/llava-1.5-7b-hf"
        )
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(str(model), "config.json")
    if isinstance(cached, str):
        if hub_offline():
            return Path(cached).parent, json.loads(Path(cached).read_text())  # the cached snapshot directory
    elif hub_offline():
        raise FileNotFoundError(
            f"{model}: HF_HUB_OFFLINE is set and the hub cache ({os.environ.get('HF_HUB_CACHE') or 'HF_HOME/hub'}) "
            f"has no copy of it. Download it where there is network (`hf download {model}`, then copy the cache or "
            "the snapshot directory here) and pass the directory, or unset HF_HUB_OFFLINE"
        )
    problem = hub_reachable()
    if problem is not None:
        raise ValueError(
            f"{model} is a hub id and the hub is unreachable: {problem}. Set HF_HUB_OFFLINE=1 to use the local cache, "
            "or give a local checkpoint directory"
        )
    from huggingface_hub import hf_hub_download

    try:
        config_path = hf_hub_download(str(model), "config.json")
    except Exception as error:  # noqa: BLE001 - repository not found, gated, network: said in one line
        raise ValueError(f"{model}: the hub gave no config.json ({type(error).__name__}: {error})") from error
    return str(model), json.loads(Path(config_path).read_text())


def check_family(config: dict[str, Any], name: str | Path) -> None:
    """``ValueError`` naming the supported families unless ``config`` (a config.json) is a vision-language model of
    a family piofvlm adapts."""
    from piofvlm.adapters import ADAPTERS
    from piofvlm.adapters.registry import NOT_SUPPORTED, is_image_text_to_text

    model_type = config.get("model_type")
    if model_type in ADAPTERS:
        return
    supported = ", ".join(sorted(ADAPTERS))
    if model_type in NOT_SUPPORTED:
        raise ValueError(f"{name}: model type {model_type!r} is refused by design ({NOT_SUPPORTED[model_type]}); "
                         f"supported: {supported}")  # fmt: skip
    if isinstance(model_type, str) and is_image_text_to_text(model_type):
        raise ValueError(
            f"{name}: model type {model_type!r} is not supported yet: piofvlm has no adapter for this family "
            f"(`piofvlm families` lists every family's status); supported: {supported}"
        )
    if "vision_config" not in config and "vision_tower" not in json.dumps(config):
        raise ValueError(
            f"{name}: model type {model_type!r} is a text-only model (no vision_config): piofvlm prunes the visual "
            f"tokens of vision-language models; supported families: {supported}"
        )
    raise ValueError(f"{name}: model type {model_type!r} is not a family piofvlm supports; supported: {supported}")


def resolve_checkpoint(model: str | Path) -> str | Path:
    """Read a checkpoint's config.json (local directory or hub id, see :func:`read_config`) and check its family
    before any weight loads; returns what to give :func:`load_model`."""
    source, config = read_config(model)
    check_family(config, model)
    return source
