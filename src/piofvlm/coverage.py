"""Which of the installed transformers' image-text-to-text families piofvlm supports: ``piofvlm families`` (a table,
or ``--json``) and ``docs/families.md`` (``piofvlm families --markdown``, committed).

Every ``model_type`` of transformers' image-text-to-text auto-mapping (what ``AutoModelForImageTextToText`` loads) gets
one of three statuses, the same ones :func:`piofvlm.adapters.get_adapter`'s error names:

* ``supported``: an adapter is registered (:data:`piofvlm.adapters.ADAPTERS`); ``tested`` says whether its tiny model
  runs here (``piofvlm doctor``'s self-test and the test matrices,
  :data:`piofvlm.tiny.cases.TINY_CASES`), else why not;
* ``refused``: refused by design, with the reason (:data:`piofvlm.adapters.registry.NOT_SUPPORTED`: encoder-decoder
  models, visual features through cross-attention, ...);
* ``not yet``: a family piofvlm has no adapter for yet.

Supported model types outside the mapping (none on transformers 5.24) are listed too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from piofvlm import transformers_compat

SUPPORTED, REFUSED, NOT_YET = "supported", "refused", "not yet"
STATUSES = (SUPPORTED, REFUSED, NOT_YET)

#: One line per supported family: the checkpoints it stands for and what differs (details: DEVELOPERS.md, docs/).
NOTES: dict[str, str] = {
    "llava": "LLaVA-1.5; 1-D RoPE, `positions='renumber'` supported",
    "llava_next": "LLaVA-NeXT / 1.6: anyres images of different sizes in one batch",
    "llava_onevision": "LLaVA-OneVision: anyres images, multi-image prompts, pooled videos",
    "qwen2_vl": "Qwen2-VL: M-RoPE positions kept (`renumber` refused), images and videos in one batch",
    "qwen2_5_vl": "Qwen2.5-VL: as `qwen2_vl`",
    "qwen3_vl": "Qwen3-VL (dense): as `qwen2_vl`, plus deepstack features pruned with their tokens",
    "internvl": "InternVL 2.5 / 3: video frames written as images (one item each)",
    "llava_next_video": "LLaVA-NeXT-Video: encoder-side methods refuse prompts with a video",
    "mistral3": "Mistral Small 3.x: `[IMG_BREAK]` rows of an image are one item; no vision-attention map",
    "smolvlm": "SmolVLM: each tile and the global view is one item; no vision-attention map",
    "idefics3": "Idefics3: SmolVLM's adapter",
    "glm4v": "GLM-4.1V: M-RoPE kept, videos marked by `mm_token_type_ids`, sandwich norms; no vision-attention map",
    "glm46v": "GLM-4.6V: GLM-4.1V's adapter and text model",
    "gemma3": "Gemma 3: local / global layers, windows count kept slots, bidirectional image blocks; no static cache",
    "gemma4": "Gemma 4 (transformers >= 5.24): per-layer inputs, KV-shared layers; reference PIO proxy only",
    "qwen3_5": "Qwen3.5: hybrid Gated DeltaNet / gated attention stack; no static cache",
    "qwen3_vl_moe": "Qwen3-VL-MoE (30B-A3B, 235B-A22B): Qwen3-VL's adapter, PIO's proxy through the MoE block exact",
    "qwen3_5_moe": "Qwen3.5-MoE: Qwen3.5's adapter, PIO's proxy through the MoE block (and shared expert) exact",
    "glm4v_moe": "GLM-4.5V: GLM-4.1V's multimodal adapter on a pre-norm MoE decoder (first layer dense)",
    "vipllava": "ViP-LLaVA: LLaVA-1.5's layout, features of several vision layers (`visionzip`, `vscan` refuse)",
    "idefics2": "Idefics2: perceiver latents, each run one item; encoder-side methods and `pool` refuse",
    "got_ocr2": "GOT-OCR 2.0: a data entry; an image's tiles are one item (`pool`: per tile); no vision-attention map",
    "pp_chart2table": "PP-Chart2Table: GOT-OCR 2.0's classes and entry",
    "lighton_ocr": "LightOnOCR: Mistral 3's adapter on a Qwen3 (no row breaks); no vision-attention map",
    "deepseek_vl": "DeepSeek-VL: a data entry (Llama), images padded to a square grid; no vision-attention map",
    "deepseek_vl_hybrid": "DeepSeek-VL hybrid: DeepSeek-VL's data entry (SAM high-res features fused per token)",
    "janus": "Janus / Janus-Pro (understanding): DeepSeek-VL's data entry; image generation not pruned",
    "shieldgemma2": "ShieldGemma 2: Gemma 3's model and adapter (the image classifier: apply to its `.model`)",
    "paligemma": "PaliGemma / PaliGemma 2: the kept prefix stays bidirectional; softcapped Gemma 2: reference proxy",
    "llama4": "Llama 4 (transformers >= 5.25): chunks count kept slots, MoE, NoPE layers; reference PIO proxy only",
}


@dataclass(frozen=True)
class FamilyStatus:
    """One ``model_type``: its transformers class, status (:data:`STATUSES`), whether its tiny model is tested here,
    and a detail (the family's note, why it is refused, or why its tests do not run here)."""

    model_type: str
    model_class: str
    status: str
    tested: bool
    detail: str


def coverage() -> list[FamilyStatus]:
    """Every model type of the installed transformers' image-text-to-text mapping (then supported ones outside it),
    sorted by model type, with its status."""
    from piofvlm.adapters import ADAPTERS
    from piofvlm.adapters.registry import NOT_SUPPORTED
    from piofvlm.tiny.cases import TINY_CASES, UNAVAILABLE

    mapping = transformers_compat.image_text_to_text_model_types()
    rows = []
    for model_type in sorted(set(mapping) | set(ADAPTERS)):
        model_class = mapping.get(model_type, "")
        if model_type in ADAPTERS:
            tested = model_type in TINY_CASES
            detail = NOTES.get(model_type, "")
            if not tested:
                reason = UNAVAILABLE.get(model_type, "no tiny model")
                detail = f"{detail}; not tested on this installation: {reason}" if detail else reason
            rows.append(FamilyStatus(model_type, model_class, SUPPORTED, tested, detail))
        elif model_type in NOT_SUPPORTED:
            rows.append(FamilyStatus(model_type, model_class, REFUSED, False, NOT_SUPPORTED[model_type]))
        else:
            rows.append(FamilyStatus(model_type, model_class, NOT_YET, False, ""))
    return rows


def counts(rows: list[FamilyStatus]) -> dict[str, int]:
    """Rows per status."""
    return {status: sum(row.status == status for row in rows) for status in STATUSES}


def _summary(rows: list[FamilyStatus]) -> str:
    number = counts(rows)
    return (
        f"transformers {transformers_compat.TRANSFORMERS_VERSION}: {len(rows)} model types, "
        f"{number[SUPPORTED]} supported ({sum(row.tested for row in rows)} tested here), "
        f"{number[REFUSED]} refused by design, {number[NOT_YET]} not yet"
    )


def render_table(rows: list[FamilyStatus]) -> str:
    """A plain-text table (one line per model type) and a summary line."""
    width = max(len(row.model_type) for row in rows)
    class_width = max(len(row.model_class) for row in rows)
    lines = []
    for row in rows:
        status = f"{row.status}{' (tested)' if row.tested else ''}"
        detail = f"  {row.detail}" if row.status == REFUSED or row.tested or row.status == SUPPORTED else ""
        lines.append(f"{row.model_type:<{width}}  {row.model_class:<{class_width}}  {status:<18}{detail}".rstrip())
    return "\n".join([*lines, "", _summary(rows)])


def render_json(rows: list[FamilyStatus]) -> str:
    """``{"transformers": version, "counts": {...}, "families": [{model_type, model_class, status, tested,
    detail}, ...]}``."""
    return json.dumps(
        {
            "transformers": transformers_compat.TRANSFORMERS_VERSION,
            "counts": counts(rows),
            "families": [asdict(row) for row in rows],
        },
        indent=2,
    )


def render_markdown(rows: list[FamilyStatus]) -> str:
    """``docs/families.md``: the summary, then one table per status."""
    lines = [
        "# Model families",
        "",
        "Generated by `piofvlm families --markdown > docs/families.md` (`src/piofvlm/coverage.py`) from the installed "
        "transformers' image-text-to-text auto-mapping (what `AutoModelForImageTextToText` loads); "
        "`tests/test_coverage.py` checks that it is up to date. `piofvlm families` prints the table for your "
        "installation (`--json` for tools). A refused or not-yet-supported checkpoint's error says which of the two "
        "it is.",
        "",
        f"**{_summary(rows)}.**",
        "",
        "## Supported",
        "",
        "Tested: the family's tiny model (built from its config, no download) runs the invariant matrices in CI and "
        "`piofvlm doctor`'s self-test (keep-all bit-identical logits and `generate()`, exact counts, KV lengths, "
        "cached decode == no-cache forward, batch with left padding == single, kept indices vs an independent "
        "computation, fast == reference PIO proxy, every method runs or refuses with an error); DEVELOPERS.md has "
        "each family's details.",
        "",
        "| model type | transformers class | tested | notes |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{row.model_type}` | `{row.model_class}` | {'yes' if row.tested else 'no'} | {row.detail} |"
        for row in rows
        if row.status == SUPPORTED
    ]
    lines += [
        "",
        "## Refused by design",
        "",
        "The mechanism drops visual tokens from a decoder's sequence between its layers; these models have none "
        "there.",
        "",
        "| model type | transformers class | why |",
        "|---|---|---|",
    ]
    lines += [f"| `{row.model_type}` | `{row.model_class}` | {row.detail} |" for row in rows if row.status == REFUSED]
    lines += [
        "",
        "## Not supported yet",
        "",
        'No adapter yet (DEVELOPERS.md, "How to add a family"); their error says "not supported yet".',
        "",
        "| model type | transformers class |",
        "|---|---|",
    ]
    lines += [f"| `{row.model_type}` | `{row.model_class}` |" for row in rows if row.status == NOT_YET]
    return "\n".join(lines) + "\n"
