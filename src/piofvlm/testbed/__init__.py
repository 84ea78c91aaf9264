"""Quality testbed: a small LLaVA trained from scratch on synthetic visual questions (see README.md)."""

from .data import TASKS, answer_vocab, chance_accuracy, make_sample, make_split
from .model import (
    CHECKPOINT_DIR,
    IMAGE_TOKEN_ID,
    NUM_IMAGE_TOKENS,
    PROMPT_TEMPLATE,
    evaluate_answers,
    generate_answers,
    load_testbed,
    prompt,
)

__all__ = [
    "CHECKPOINT_DIR",
    "IMAGE_TOKEN_ID",
    "NUM_IMAGE_TOKENS",
    "PROMPT_TEMPLATE",
    "TASKS",
    "answer_vocab",
    "chance_accuracy",
    "evaluate_answers",
    "generate_answers",
    "load_testbed",
    "make_sample",
    "make_split",
    "prompt",
]
