"""Tokenizer, processor and LLaVA model definition of the piofvlm testbed VLM, plus loading and evaluation helpers.

The testbed model is a stock :class:`transformers.LlavaForConditionalGeneration` (CLIP-style vision tower with a
16 x 16 = 256 patch grid (336 px, patch 21), 2-layer MLP projector, Llama-style decoder) with a word-level tokenizer.
It is saved with ``save_pretrained`` and loads like a hub checkpoint::

    model = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT_DIR)
    processor = AutoProcessor.from_pretrained(CHECKPOINT_DIR)  # a LlavaProcessor with CLIPImageProcessorPil
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from . import data

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"

PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
#: Chat template (saved with the processor as ``chat_template.jinja``): one user message with an image and a question
#: renders exactly :data:`PROMPT_TEMPLATE`, so chat clients (``piofvlm serve``) ask what the testbed was trained on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if message['content'] is string -%}\n"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}\n"
    "{%- else -%}\n"
    "{%- set parts = message['content'] -%}\n"
    "{%- endif -%}\n"
    "{%- if message['role'] == 'assistant' -%}\n"
    "{{- 'ASSISTANT: ' -}}\n"
    "{%- for part in parts if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}\n"
    "{{- eos_token -}}\n"
    "{%- else -%}\n"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}{%- endif -%}\n"
    "{%- for part in parts -%}\n"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}\n"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{{- ' ' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}\n"
)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_TOKEN_ID = range(5)
NUM_IMAGE_TOKENS = data.GRID * data.GRID  # 256
# CLIP normalisation constants (the processor uses the same values).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Default model shapes (see README.md for the measured accuracy of the shipped checkpoint).
DEFAULT_SHAPES: dict[str, int] = {
    "vision_hidden": 128,
    "vision_layers": 3,
    "vision_heads": 4,
    "vision_mlp": 384,
    "text_hidden": 128,
    "text_layers": 8,
    "text_heads": 4,
    "text_kv_heads": 4,
    "text_mlp": 384,
}


def build_vocab() -> list[str]:
    """Word vocabulary: special tokens, prompt words, question words and all answers (deterministic order)."""
    words: list[str] = ["USER", "ASSISTANT", ":", "?"]
    words += "is there a what colour the how many objects object left of above letter".split()
    words += list(data.COLOURS) + list(data.SHAPES)
    words += list(data.answer_vocab())
    seen: dict[str, None] = {}
    for w in list(SPECIAL_TOKENS) + words:
        seen.setdefault(w, None)
    return list(seen)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer (BOS added, left padding for batched generation)."""
    vocab = {w: i for i, w in enumerate(build_vocab())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=["<image>"],
        padding_side="left",
        model_max_length=1024,
    )
    tok.image_token = "<image>"
    return tok


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """``LlavaProcessor`` with the PIL/numpy CLIP image processor (no torchvision needed): 336 px -> 256 tokens."""
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": data.IMAGE_SIZE},
        crop_size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=data.PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(shapes: dict[str, int] | None = None) -> LlavaConfig:
    """LLaVA config: CLIP-style tower (336 px, patch 21, CLS dropped -> 256 tokens) and a Llama-style decoder."""
    s = dict(DEFAULT_SHAPES, **(shapes or {}))
    vision = CLIPVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=s["vision_mlp"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=data.IMAGE_SIZE,
        patch_size=data.PATCH_SIZE,
        projection_dim=s["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=len(build_vocab()),
        hidden_size=s["text_hidden"],
        intermediate_size=s["text_mlp"],
        num_hidden_layers=s["text_layers"],
        num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"],
        max_position_embeddings=1024,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=True,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=NUM_IMAGE_TOKENS,
        tie_word_embeddings=True,
    )
    cfg.pad_token_id = PAD_ID
    return cfg


def build_model(shapes: dict[str, int] | None = None, seed: int = 0) -> LlavaForConditionalGeneration:
    """Randomly initialised testbed model (seeded)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(shapes))
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    return model


def load_testbed(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, path: str | Path | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load the shipped testbed checkpoint (or ``path``) as ``(model, processor)``, model in eval mode."""
    path = Path(path) if path is not None else CHECKPOINT_DIR
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = LlavaProcessor.from_pretrained(path)
    return model, processor


def prompt(question: str) -> str:
    """Chat-style prompt of the testbed for one question."""
    return PROMPT_TEMPLATE.format(question=question)


def first_word(text: str) -> str:
    """Normalised first word of a generated answer (exact-match scoring)."""
    m = re.search(r"[A-Za-z0-9]+", text)
    return m.group(0).lower() if m else ""


@torch.no_grad()
def generate_answers(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[dict[str, Any]],
    batch_size: int = 16,
    max_new_tokens: int = 2,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy answers (first word, lower-case) for ``samples`` via batched ``model.generate``."""
    out: list[str] = []
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        inputs = processor(
            images=[s["image"] for s in batch],
            text=[prompt(s["question"]) for s in batch],
            return_tensors="pt",
            padding=True,
        )
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        gen = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD_ID, **generate_kwargs
        )
        texts = processor.tokenizer.batch_decode(gen[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        out += [first_word(t) for t in texts]
    return out


def score(samples: Sequence[dict[str, Any]], answers: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy overall (``"all"``) and per task."""
    per: dict[str, list[bool]] = {}
    for s, a in zip(samples, answers, strict=True):
        per.setdefault(s["task"], []).append(a == s["answer"])
    res = {t: sum(v) / len(v) for t, v in sorted(per.items())}
    res["all"] = sum(sum(v) for v in per.values()) / max(1, len(answers))
    return res


def evaluate_answers(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[dict[str, Any]],
    batch_size: int = 16,
    **generate_kwargs: Any,
) -> dict[str, float]:
    """Greedy-generate answers for ``samples`` and return exact-match accuracy overall and per task."""
    return score(samples, generate_answers(model, processor, samples, batch_size=batch_size, **generate_kwargs))
