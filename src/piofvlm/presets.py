"""Named, published configurations (the authors' settings), as ready methods.

Counts are visual tokens per image, so they assume LLaVA-1.5's 576 tokens per image; their mean over the 32 layers
of LLaVA-1.5-7B is the paper's budget (spec A.2).
"""

from __future__ import annotations

from typing import Any

from piofvlm.registry import get_method

PRESETS: dict[str, dict[str, Any]] = {
    # w/o VE, 64 tokens (11.1%): (576 + 9*92 + 5*54 + 17*22) / 32 = 64.0. Authors' code comment.
    "pio-llava15-64": {"method": "pio", "layers": [1, 10, 15], "keep": [92, 54, 22], "positions": "renumber"},
    # w/o VE, 128 tokens (22.2%): every published LLaVA-1.5 eval script.
    "pio-llava15-128": {"method": "pio", "layers": [1, 10, 15], "keep": [218, 128, 54], "positions": "renumber"},
    # w/o VE, 192 tokens (33.3%): not published; a same-shape schedule with mean 192.0 (inferred, unverified).
    "pio-llava15-192": {"method": "pio", "layers": [1, 10, 15], "keep": [346, 202, 85], "positions": "renumber"},
    # w/ VE ("encoder-involved"), 64 tokens: VScan-style encoder stage keeps 96, PIO keeps 32 after layer 16;
    # (96 + 32) / 2 = 64 (README default usage, spec A.2 / A.9).
    "pio-llava15-64-ve": {
        "method": "chain",
        "encoder": {"method": "vscan", "keep": 96},
        "llm": {"method": "pio", "layers": [16], "keep": 32},
        "positions": "renumber",
    },
    # w/ VE 128 and 192: not published; the same 3:1 split (inferred, unverified).
    "pio-llava15-128-ve": {
        "method": "chain",
        "encoder": {"method": "vscan", "keep": 192},
        "llm": {"method": "pio", "layers": [16], "keep": 64},
        "positions": "renumber",
    },
    "pio-llava15-192-ve": {
        "method": "chain",
        "encoder": {"method": "vscan", "keep": 288},
        "llm": {"method": "pio", "layers": [16], "keep": 96},
        "positions": "renumber",
    },
    # Qwen2.5-VL-7B w/ VE, 11.1%: the encoder keeps 16.7%, PIO keeps a third of that after layer 14, proxy on the
    # same layer, original M-RoPE positions; VScan on the first full-attention block (7) and the last block (31, the
    # one feeding the merger) with 4 x 4 windows of the merged grid and mean attention received.
    # The authors round int(ratio * current) per stage; here each ratio counts the original tokens (0.167 / 3).
    # Their proxy's output head is the input embedding matrix (their patched text decoder has no lm_head; see
    # docs/methods.md, "Fidelity to the authors' code").
    "pio-qwen25vl-11-ve": {
        "method": "chain",
        "encoder": {
            "method": "vscan",
            "keep": 0.167,
            "local_layer": None,
            "global_layer": None,
            "window": 4,
            "attention": "mean",
        },
        "llm": {
            "method": "pio",
            "layers": [14],
            "keep": 0.167 / 3,
            "proxy_layer": "previous",
            "output_head": "input_embeddings",
        },
        "positions": "keep",
    },
}


def available_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, **overrides: Any) -> Any:
    """The method configured as preset ``name``; ``overrides`` replace fields (e.g. ``positions="keep"``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(available_presets())}")
    fields = {**PRESETS[name], **overrides}
    return get_method(fields.pop("method"), **fields)
