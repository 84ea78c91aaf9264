"""``piofvlm doctor``: what is installed, whether it is inside the tested range, and a self-test of every family.

The self-test builds one tiny random model per supported family (:data:`piofvlm.tiny.cases.TINY_CASES`; nothing is
downloaded) and checks, in a few seconds, the four things a broken transformers release breaks first:

* keep-all: a method that keeps every visual token gives logits bit-identical to the unhooked model;
* decode: a pruned, cached ``generate()`` equals a no-cache forward of the same kept sequence (greedy tokens and
  logits), i.e. the shorter KV caches are masked and positioned right;
* continuation: a cache pruned before layer 0 reports the unpruned length and a follow-up turn on it equals the
  no-cache forward of the same kept conversation (:func:`pruned_continuation_error`);
* hooks: after the ``with`` block no hook is left and the model's logits are the unhooked ones again.
"""

from __future__ import annotations

import dataclasses
import platform
import time
import traceback
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import transformers

from piofvlm import transformers_compat
from piofvlm.adapters import get_adapter
from piofvlm.core.context import Selection, StageContext
from piofvlm.methods.base import TokenPruner
from piofvlm.registry import get_method
from piofvlm.tiny.cases import TINY_CASES, UNAVAILABLE

NEW_TOKENS = 3


@dataclass
class FamilyResult:
    model_type: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class ReplaySelection(TokenPruner):
    """Keeps the given original visual indices, ``chosen[stage][sample]``: a recorded selection replayed (e.g. on a
    no-cache forward of the same prompt, as the self-test's reference)."""

    name: ClassVar[str] = "replay"
    chosen: list[list[list[int]]] = dataclasses.field(default_factory=list)

    def select(self, ctx: StageContext) -> Selection:
        keep = torch.zeros_like(ctx.groups, dtype=torch.bool)
        for b, wanted in enumerate(self.chosen[ctx.stage]):
            wanted_index = torch.tensor(wanted, dtype=torch.long, device=ctx.visual_index.device)
            keep[b] = torch.isin(ctx.visual_index[b], wanted_index) & (ctx.groups[b] >= 0)
        return Selection(keep=keep)


def environment() -> dict[str, Any]:
    """Versions, device and attention implementations of this installation."""
    from transformers.utils import is_flash_attn_2_available

    status = transformers_compat.version_status()
    floor, ceiling = transformers_compat.TESTED_RANGE
    attention = ["sdpa", "eager"]
    if is_flash_attn_2_available():
        attention.append("flash_attention_2")
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    else:
        device = "cpu (no CUDA device)"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformers_tested_range": f">={floor},<{ceiling}",
        "transformers_status": status,
        "device": device,
        "attention": attention,
    }


def _hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(getattr(m, "_forward_hooks_with_kwargs", {}))
        for m in model.modules()
    )


def check_family(model_type: str) -> FamilyResult:
    """Self-test one family on its tiny case (see the module docstring)."""
    start = time.perf_counter()
    try:
        detail = _check(model_type)
        ok = detail is None
    except Exception as error:  # a doctor reports, it does not crash
        ok, detail = False, f"{type(error).__name__}: {error}".splitlines()[0][:300]
        detail += f" (at {traceback.extract_tb(error.__traceback__)[-1].filename.rsplit('/', 1)[-1]})"
    return FamilyResult(model_type, ok, detail or "ok", time.perf_counter() - start)


def _check(model_type: str) -> str | None:
    model, inputs = TINY_CASES[model_type]()
    adapter = get_adapter(model)
    visual_ids = [i for i in (adapter.image_token_id, adapter.video_token_id) if i is not None]
    greedy = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
    greedy["suppress_tokens"] = visual_ids  # a random model may emit a placeholder id
    with torch.no_grad():
        reference = model(**inputs).logits  # also installs transformers' own output recorders (first forward)
        hooks_before = _hook_count(model)
        with get_method("pio", layers=[1], keep=1.0)(model):
            keep_all = model(**inputs).logits
        if not torch.equal(keep_all, reference):
            return f"keep-all logits differ from the unhooked model (max |diff| {_max_diff(keep_all, reference)})"

        method = get_method("pio", layers=[1], keep=0.5)
        with method(model):
            generated = model.generate(**inputs, output_logits=True, return_dict_in_generate=True, **greedy)
        kept = [[k.tolist() for k in record.kept] for record in method.last_selection]
        sequences = generated.sequences
        batch = sequences.shape[0]
        mask = torch.cat([inputs["attention_mask"], torch.ones(batch, NEW_TOKENS, dtype=torch.long)], 1)
        others = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if "mm_token_type_ids" in inputs:
            others["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros(batch, NEW_TOKENS, dtype=torch.long)], 1
            )
        with ReplaySelection(layers=[1], keep=0.5, chosen=kept)(model):
            uncached = model(input_ids=sequences, attention_mask=mask, use_cache=False, **others).logits
        for step in range(NEW_TOKENS):
            cached_step, uncached_step = generated.logits[step], uncached[:, -NEW_TOKENS - 1 + step]
            if not torch.allclose(cached_step, uncached_step, rtol=1e-4, atol=1e-4):
                return (
                    f"pruned cached decode step {step} differs from the no-cache forward of the same kept sequence "
                    f"(max |diff| {_max_diff(cached_step, uncached_step)})"
                )

        problem = pruned_continuation_error(model, inputs, greedy)
        if problem is not None:
            return problem

        if _hook_count(model) != hooks_before:
            return f"{_hook_count(model) - hooks_before} hooks left on the model after the method was removed"
        if not torch.equal(model(**inputs).logits, reference):
            return "the model's logits changed after the method was removed"
    return None


def pruned_continuation_error(model: torch.nn.Module, inputs: dict[str, Any], greedy: dict[str, Any]) -> str | None:
    """A cache pruned before layer 0 (every layer holds fewer slots than the prompt) must report the unpruned length
    (transformers reads it to place the next tokens: ``transformers_compat.cache_length_layer`` / ``pad_cache_layer``)
    and a follow-up turn on it must equal a no-cache forward over the whole conversation keeping the same tokens.
    ``None`` if both hold, else what differs."""
    greedy = {k: v for k, v in greedy.items() if k not in ("max_new_tokens", "min_new_tokens")}
    method = get_method("random", layers=[0], keep=0.5)
    prompt = inputs["input_ids"].shape[1]
    with method(model):
        first = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True, **greedy)
        cache = transformers_compat.output_cache(first)
        length = int(cache.get_seq_length())
        if length != prompt + 1:
            return (
                f"a cache pruned before layer 0 reports {length} tokens, not the {prompt + 1} it stands for "
                "(transformers_compat.cache_length_layer / pad_cache_layer must learn this release's Cache)"
            )
        kept = [[k.tolist() for k in record.kept] for record in method.last_selection]
        ids = torch.cat([first.sequences, first.sequences[:, -1:].expand(-1, 2)], 1)  # a 2-token text follow-up
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, prompt:])], 1)
        second = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **{transformers_compat.cache_kwarg_name(model): cache},
            max_new_tokens=1,
            output_logits=True,
            return_dict_in_generate=True,
            **greedy,
        )
    others = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in others:
        others["mm_token_type_ids"] = torch.nn.functional.pad(others["mm_token_type_ids"], (0, ids.shape[1] - prompt))
    with ReplaySelection(layers=[0], keep=0.5, chosen=kept)(model):
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False, **others).logits[:, -1]
    if not torch.allclose(second.logits[0], expected, rtol=1e-4, atol=1e-4):
        return (
            "a follow-up turn on a cache pruned before layer 0 differs from the no-cache forward of the same kept "
            f"conversation (max |diff| {_max_diff(second.logits[0], expected)})"
        )
    return None


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{(a.float() - b.float()).abs().max().item():.3g}" if a.shape == b.shape else f"shapes {a.shape}/{b.shape}"


def run(families: list[str] | None = None, out: Any = None) -> int:
    """Print the report to ``out`` (stdout); 0 if all good, 1 if something is broken."""
    import sys

    out = out or sys.stdout
    env = environment()
    in_range = {"tested": "yes", "older": "NO (older)", "newer": "NO (newer)"}[env["transformers_status"]]
    print("piofvlm doctor", file=out)
    print(f"  python        {env['python']}", file=out)
    print(f"  torch         {env['torch']}", file=out)
    print(
        f"  transformers  {env['transformers']} (tested range {env['transformers_tested_range']}: {in_range})",
        file=out,
    )
    print(f"  device        {env['device']}", file=out)
    print(f"  attention     {', '.join(env['attention'])}", file=out)
    print("self-test on tiny random models (keep-all identity, cached decode == no-cache, hooks removed):", file=out)
    results = []
    for model_type in families or list(TINY_CASES):
        result = check_family(model_type)
        results.append(result)
        state = "ok    " if result.ok else "FAILED"
        text = "" if result.ok else f"  {result.detail}"
        print(f"  {model_type:<18} {state} {result.seconds:5.1f} s{text}", file=out, flush=True)
    for model_type, reason in UNAVAILABLE.items() if families is None else ():
        print(f"  {model_type:<18} not tested here: {reason}", file=out)
    broken = [r.model_type for r in results if not r.ok]
    floor, ceiling = transformers_compat.TESTED_RANGE
    good = transformers_compat.KNOWN_GOOD_TRANSFORMERS[-1]
    if not broken and env["transformers_status"] == "tested":
        print("all good", file=out)
        return 0
    if not broken:
        print(
            f"self-test passed, but transformers {env['transformers']} is outside the tested range; to be safe: "
            f"pip install 'transformers=={good}'",
            file=out,
        )
        return 0
    print(
        f"broken: {', '.join(broken)}. Pin a tested transformers (pip install 'transformers=={good}', tested range "
        f">={floor},<{ceiling}) and report an issue with this output if it persists.",
        file=out,
    )
    return 1
