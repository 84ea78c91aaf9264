"""Load a checkpoint directory (hub layout) and build prompts, the same way for every command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def load_model(
    path: str | Path, dtype: str = "float32", attn: str = "sdpa", device: str = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """``from_pretrained`` of a local directory: the model (eval mode) and its processor (left padding)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); give a local checkpoint directory")
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
