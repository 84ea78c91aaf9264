"""Property-based invariants (Hypothesis): drawn family x method x budget x prune points x batch / padding x images
and videos per sample x positions mode x dtype x handle reuse, checked against what must always hold.

Every family with a tiny case (``piofvlm.tiny.cases.TINY_CASES``) is drawn; what differs between families comes from
the family itself: its adapter (``supports_renumber``) and the methods it refuses by design
(``test_methods_matrix.REFUSED``, never drawn here). Two profiles of the same properties: ``FAST`` (a few examples per
family, in the default suite) and ``DEEP`` (many more, marked ``slow``). Both are derandomized, so a run is
reproducible; a failure prints the drawn example.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import conftest
import piofvlm
import test_qwen as tq
from conftest import FixedSelection, assert_decode_equals_uncached
from piofvlm import transformers_compat
from piofvlm.adapters import ADAPTERS, get_adapter
from piofvlm.tiny.cases import TINY_CASES
from piofvlm.tiny.qwen import random_image
from test_methods_matrix import REFUSED

#: Every family with a tiny case on the installed transformers (the others are in ``tiny.cases.UNAVAILABLE``).
FAMILIES = list(TINY_CASES)
LLAVA_FAMILIES = ("llava", "llava_next")
#: Families whose norms compute in fp32 whatever the model dtype (``Gemma3RMSNorm``; Gemma 4's vision pooler too, its
#: unhooked fp64 model differs by ~1.3e-6 between a batch and its samples): fp64 is only fp32-exact there.
FP32_NORM_KINDS = ("gemma3", "gemma4", "shieldgemma2")
NUM_LAYERS = 4  # every tiny model here
#: The fast profile runs each property on every family: a few examples each.
FAST = settings(
    max_examples=2,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its drawn example at once
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DEEP = settings(FAST, max_examples=30)
BOTH_DTYPES = (torch.float32, torch.float64)
BOTH_ATTN = ("sdpa", "eager")  # the deep profile draws both (eager in fp32 only)
#: Methods that only choose tokens (no merged hidden states): a :class:`FixedSelection` replays them exactly.
SELECT_ONLY = ("random", "pio", "fastv", "pdrop", "dart", "divprune", "cdpruner")


# ------------------------------------------------------------------------------------------------ models, inputs
@functools.cache
def get_model(kind: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa") -> torch.nn.Module:
    if kind in LLAVA_FAMILIES:
        return conftest.model(kind, attn, dtype=dtype)
    return tq.model(kind, attn, dtype=dtype)


@functools.cache
def _inputs(kind: str, indices: tuple[int, ...], image_seed: int) -> dict[str, torch.Tensor]:
    if kind in LLAVA_FAMILIES:
        images = [random_image(image_seed + i, conftest.IMAGE_SIZES[i]) for i in indices]
        return dict(conftest.make_inputs(kind, indices=indices, images=images))
    return dict(tq.make_inputs(kind, indices=indices))


def get_inputs(kind: str, indices: tuple[int, ...], image_seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Processor outputs (cached; copied so a test never changes the cache), pixels in ``dtype``."""
    inputs = {k: v.clone() for k, v in _inputs(kind, indices, image_seed).items()}
    for key in ("pixel_values", "pixel_values_videos", "high_res_pixel_values"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    return inputs


def group_sizes(kind: str, inputs: dict[str, torch.Tensor]) -> list[list[int]]:
    """Per sample, the visual tokens of each image / video (a budget group under ``budget_scope="image"``)."""
    if kind in LLAVA_FAMILIES:
        return [[int(n)] for n in (inputs["input_ids"] == 4).sum(1)]
    return tq.visual_counts(kind, inputs)


def slice_inputs(kind: str, indices: tuple[int, ...], i: int, image_seed: int, dtype: torch.dtype):
    """Sample ``i`` of the batch ``indices`` as a batch of one, built by the processor on its own."""
    return get_inputs(kind, (indices[i],), image_seed, dtype)


# ------------------------------------------------------------------------------------------------- scenarios
BATCHES = st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True).map(tuple)


@dataclass
class Scenario:
    kind: str
    name: str
    fields: dict[str, Any]
    indices: tuple[int, ...]
    image_seed: int
    dtype: torch.dtype
    stages_keep: list[Any] = field(default_factory=list)
    other: tuple[int, ...] = ()  # another batch of the same family, for handle reuse
    attn: str = "sdpa"

    def method(self, **override: Any) -> Any:
        return piofvlm.get_method(self.name, **{**self.fields, **override})

    def inputs(self) -> dict[str, torch.Tensor]:
        return get_inputs(self.kind, self.indices, self.image_seed, self.dtype)

    def model(self) -> torch.nn.Module:
        return get_model(self.kind, self.dtype, self.attn)


def _layers(draw, low: int, stages: int) -> list[int]:
    return sorted(draw(st.sets(st.integers(low, NUM_LAYERS - 1), min_size=stages, max_size=stages)))


def _keep(draw, stages: int, smallest_group: int) -> list[Any]:
    """Non-increasing ratios, or non-increasing counts no larger than the smallest budget group."""
    if draw(st.booleans()):
        ratios = draw(st.lists(st.sampled_from([1.0, 0.7, 0.5, 0.3, 0.2, 0.1]), min_size=stages, max_size=stages))
        return sorted(ratios, reverse=True)
    counts = draw(st.lists(st.integers(1, smallest_group), min_size=stages, max_size=stages))
    return sorted(counts, reverse=True)


#: The methods drawn: every registered one but ``none`` (minus, per family, the ones it refuses by design).
METHODS = ("random", "pio", "fastv", "pdrop", "dart", "sparsevlm", "divprune", "cdpruner", "pool", "visionzip",
           "vscan", "chain")  # fmt: skip


def refuses(kind: str, name: str, has_video: bool) -> bool:
    """Whether ``name`` refuses ``kind`` by design on prompts with (``has_video``) or without a video: the pairs of
    ``test_methods_matrix.REFUSED``; LLaVA-NeXT-Video's encoder-side methods refuse only prompts with a video (its
    pooled frames have no patch map)."""
    return (name, kind) in REFUSED and (kind != "llava_next_video" or has_video)


@st.composite
def scenarios(
    draw, names: tuple[str, ...] = METHODS, families=FAMILIES, dtypes=(torch.float32,), attns=("sdpa",)
) -> Scenario:
    kind = draw(st.sampled_from(families))
    indices, other = draw(BATCHES), draw(BATCHES)
    image_seed = draw(st.integers(0, 3)) if kind in LLAVA_FAMILIES else 0
    dtype = draw(st.sampled_from(dtypes))
    # eager fp64 with padding is NaN in stock transformers (its softmax runs in fp32): eager is drawn in fp32 only
    attn = draw(st.sampled_from(attns)) if dtype == torch.float32 else "sdpa"
    batches = [get_inputs(kind, indices, image_seed, dtype), get_inputs(kind, other, image_seed, dtype)]
    sizes = [n for batch in batches for n in group_sizes(kind, batch)]
    smallest = min(n for sample in sizes for n in sample)  # counts must fit both batches
    has_video = any("pixel_values_videos" in batch for batch in batches)
    name = draw(st.sampled_from([name for name in names if not refuses(kind, name, has_video)]))
    fields: dict[str, Any] = {}
    if name in ("random", "pio", "divprune", "cdpruner"):
        fields["layers"] = _layers(draw, 0, draw(st.integers(1, 2)))
    elif name in ("fastv", "dart"):
        fields["layers"] = _layers(draw, 1, 1)
    elif name in ("pdrop", "sparsevlm"):
        fields["layers"] = _layers(draw, 1, 2 if name == "pdrop" else draw(st.integers(1, 2)))
    else:
        fields["layers"] = [0]
    if name == "dart":
        fields.update(image_pivots=2, text_pivots=2)
    if name == "vscan":
        fields.update(local_layer=0, window=3)
    stages = len(fields["layers"])
    keep = _keep(draw, stages, smallest)
    if name == "random" and draw(st.booleans()):
        fields["budget_scope"] = "sample"
    if name == "chain":
        llm_layer = draw(st.integers(1, NUM_LAYERS - 1))
        first = _keep(draw, 1, smallest)[0]
        second = min(first, keep[0]) if isinstance(first, type(keep[0])) else first
        keep = [first, second]
        fields = {
            "encoder": {"method": "visionzip", "keep": first},
            "llm": {"method": "pio", "layers": [llm_layer], "keep": second},
        }
    else:
        fields["keep"] = keep
    if ADAPTERS[kind].supports_renumber and draw(st.booleans()):
        fields["positions"] = "renumber"
    if name != "chain":  # hybrid stacks (Qwen3.5): no attention map at a linear layer (refused: test_qwen3_5.py)
        adapter = get_adapter(get_model(kind, dtype))
        reads = piofvlm.get_method(name, **fields).attention_layers()
        assume(all(adapter.is_attention_layer(index) for index in reads))
    return Scenario(kind, name, fields, indices, image_seed, dtype, keep, other, attn)


def expected_kept(scenario: Scenario, sizes: list[list[int]]) -> list[list[int]]:
    """Per stage, per sample: visual tokens kept, from the budget rules alone."""

    def one(keep: Any, n: int) -> int:
        return max(1, int(keep * n + 0.5)) if isinstance(keep, float) else keep

    sample_scope = scenario.fields.get("budget_scope") == "sample"
    return [
        [one(keep, sum(sample)) if sample_scope else sum(one(keep, n) for n in sample) for sample in sizes]
        for keep in scenario.stages_keep
    ]


# ---------------------------------------------------------------------------------------------------- checks
def hooks_and_shadows(m: torch.nn.Module) -> tuple[list, list]:
    hooks = [
        (len(x._forward_pre_hooks), len(x._forward_hooks), len(x._forward_hooks_with_kwargs)) for x in m.modules()
    ]
    shadows = [(i, name) for i, x in enumerate(m.modules()) for name, value in vars(x).items() if callable(value)]
    return hooks, shadows


def warm(m: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Unhooked logits (transformers adds recorder hooks on a model's first forward: warm it before counting)."""
    with torch.no_grad():
        return m(**inputs).logits


def check_keep_all_identity_and_clean_exit(s: Scenario) -> None:
    m, inputs = s.model(), s.inputs()
    reference = warm(m, inputs)
    before = hooks_and_shadows(m)
    valid = inputs["attention_mask"].bool()
    method = s.method(**_keep_all(s))
    with torch.no_grad(), method(m):
        pruned = m(**inputs).logits
    assert pruned.shape == reference.shape
    assert torch.equal(pruned[valid], reference[valid]), "keep-all must be bit-identical to the unhooked model"
    assert hooks_and_shadows(m) == before
    assert torch.equal(warm(m, inputs), reference)


def _keep_all(s: Scenario) -> dict[str, Any]:
    if s.name == "chain":
        return {"encoder": {**s.fields["encoder"], "keep": 1.0}, "llm": {**s.fields["llm"], "keep": 1.0}}
    return {"keep": [1.0] * len(s.fields["layers"])}


def check_counts_batch_single_and_exit_on_error(s: Scenario) -> None:
    m, inputs = s.model(), s.inputs()
    reference = warm(m, inputs)
    before = hooks_and_shadows(m)
    method = s.method()
    with torch.no_grad(), method(m):
        batch = m(**inputs).logits[:, -1]
        kept = [[k.tolist() for k in record.kept] for record in method.last_selection]
        sizes = group_sizes(s.kind, inputs)
        assert [[len(k) for k in stage] for stage in kept] == expected_kept(s, sizes)
        for stage in method.last_selection:
            for k, candidates in zip(stage.kept, stage.candidates, strict=True):
                assert torch.equal(k, k.sort().values) and bool(torch.isin(k, candidates).all())
        # fp64: the unhooked LLaVA-OneVision model itself differs by ~1e-8 between a batch and its samples; Gemma 3's
        # RMSNorm computes in fp32 even in an fp64 model, so the unhooked model differs by ~1.4e-7 there.
        tolerance = {"rtol": 1e-4, "atol": 1e-5} if s.dtype == torch.float32 else {"rtol": 1e-6, "atol": 1e-7}
        if s.dtype == torch.float64 and s.kind in FP32_NORM_KINDS:
            tolerance = {"rtol": 1e-5, "atol": 1e-6}
        for i in range(len(s.indices)):
            single = slice_inputs(s.kind, s.indices, i, s.image_seed, s.dtype)
            torch.testing.assert_close(m(**single).logits[:, -1], batch[i : i + 1], **tolerance)
            assert [record.kept[0].tolist() for record in method.last_selection] == [stage[i] for stage in kept]
    # An exception inside the method's hooks (a budget larger than a group) leaves the model as it was too.
    if s.name == "chain":
        too_many = {part: {**s.fields[part], "keep": 10_000} for part in ("encoder", "llm")}
    else:
        too_many = {"keep": [10_000] * len(s.fields["layers"])}
    with pytest.raises(ValueError, match="visual tokens"):
        with torch.no_grad(), s.method(**too_many)(m):
            m(**inputs)
    assert hooks_and_shadows(m) == before
    assert torch.equal(warm(m, inputs), reference)


def check_reused_handle_equals_fresh(s: Scenario) -> None:
    """One handle over several prompts (different batches, and image / video mixes) == a fresh handle per prompt."""
    m = s.model()
    calls = [s.indices, s.other, s.indices]
    method = s.method()
    reused = []
    with torch.no_grad(), method(m):
        for indices in calls:
            inputs = get_inputs(s.kind, indices, s.image_seed, s.dtype)
            logits = m(**inputs).logits[:, -1]
            reused.append((logits, [[k.tolist() for k in r.kept] for r in method.last_selection]))
    for indices, (logits, kept) in zip(calls, reused, strict=True):
        inputs = get_inputs(s.kind, indices, s.image_seed, s.dtype)
        with torch.no_grad(), method(m):
            assert torch.equal(m(**inputs).logits[:, -1], logits)
            assert [[k.tolist() for k in r.kept] for r in method.last_selection] == kept


def follow_up_ids(kind: str, batch: int) -> torch.Tensor:
    """``(batch, 3)`` ids of a text-only follow-up question ("what is the") in the family's vocabulary."""
    tokenizer = conftest.processor(kind).tokenizer if kind in LLAVA_FAMILIES else tq.tokenizer(kind)
    return torch.tensor([tokenizer.convert_tokens_to_ids(["what", "is", "the"])]).expand(batch, -1)


def check_decoding_and_second_turn_equal_no_cache_references(s: Scenario) -> None:
    """Cached decoding equals, step by step, a no-cache forward of the kept sequence; so does a follow-up turn on
    the returned cache."""
    m, inputs = s.model(), s.inputs()
    method = s.method()
    with torch.no_grad(), method(m):
        first = m.generate(**inputs, **tq.GREEDY, output_logits=True, return_dict_in_generate=True)
        cache = transformers_compat.output_cache(first)
        assert cache.get_seq_length() == inputs["input_ids"].shape[1] + tq.GREEDY["max_new_tokens"] - 1
        records = method.last_selection
        ids = torch.cat([first.sequences, follow_up_ids(s.kind, len(s.indices))], 1)
        added = ids.shape[1] - inputs["input_ids"].shape[1]
        mask = F.pad(inputs["attention_mask"], (0, added), value=1)
        second = m.generate(
            input_ids=ids,
            attention_mask=mask,
            **{transformers_compat.cache_kwarg_name(m): cache},
            max_new_tokens=1,
            output_logits=True,
            return_dict_in_generate=True,
            do_sample=False,
        )
        assert method.last_selection is records  # no new prefill
    chosen = [[k.tolist() for k in record.kept] for record in records]
    fields = {k: v for k, v in s.fields.items() if k in ("layers", "keep", "positions", "budget_scope")}
    replay = FixedSelection(chosen=chosen, **fields)
    assert_decode_equals_uncached(m, inputs, first, replay, tq.GREEDY["max_new_tokens"])
    pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in pixels:  # M-RoPE families: the answer and the follow-up are text (type 0)
        pixels["mm_token_type_ids"] = F.pad(pixels["mm_token_type_ids"], (0, added))
    with torch.no_grad(), replay(m):
        expected = m(input_ids=ids, attention_mask=mask, use_cache=False, **pixels).logits[:, -1]
    torch.testing.assert_close(second.logits[0], expected, rtol=1e-4, atol=1e-4)


def test_every_registered_method_is_drawn():
    assert set(METHODS) == set(piofvlm.available_methods()) - {"none"}


# ------------------------------------------------------------------------------------------------ properties
# Each property runs on every family (pytest parameter ``kind``; Hypothesis seeds each family's draws apart).
# ``conftest.TWIN_FAMILIES`` (GLM-4.6V: GLM-4.1V's code) run in the slow suite only.
@pytest.mark.parametrize("kind", FAMILIES)
@FAST
@given(data=st.data())
def test_keep_all_is_identical_and_exit_leaves_the_model_unchanged(kind, data):
    check_keep_all_identity_and_clean_exit(data.draw(scenarios(families=[kind])))


@pytest.mark.parametrize("kind", FAMILIES)
@FAST
@given(data=st.data())
def test_counts_follow_the_budget_batch_equals_single_and_errors_leave_no_trace(kind, data):
    check_counts_batch_single_and_exit_on_error(data.draw(scenarios(families=[kind])))


@pytest.mark.parametrize("kind", FAMILIES)
@FAST
@given(data=st.data())
def test_a_reused_handle_equals_a_fresh_one(kind, data):
    check_reused_handle_equals_fresh(data.draw(scenarios(families=[kind])))


@pytest.mark.parametrize("kind", FAMILIES)
@FAST
@given(data=st.data())
def test_decoding_and_a_second_turn_on_the_returned_cache_equal_no_cache_references(kind, data):
    check_decoding_and_second_turn_equal_no_cache_references(data.draw(scenarios(names=SELECT_ONLY, families=[kind])))


# ------------------------------------------------------------------------------------------------- deep profile
@pytest.mark.slow
@pytest.mark.parametrize("kind", FAMILIES)
@DEEP
@given(data=st.data())
def test_deep_keep_all_is_identical_and_exit_leaves_the_model_unchanged(kind, data):
    check_keep_all_identity_and_clean_exit(data.draw(scenarios(families=[kind], dtypes=BOTH_DTYPES, attns=BOTH_ATTN)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAMILIES)
@DEEP
@given(data=st.data())
def test_deep_counts_follow_the_budget_batch_equals_single_and_errors_leave_no_trace(kind, data):
    check_counts_batch_single_and_exit_on_error(
        data.draw(scenarios(families=[kind], dtypes=BOTH_DTYPES, attns=BOTH_ATTN))
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAMILIES)
@DEEP
@given(data=st.data())
def test_deep_a_reused_handle_equals_a_fresh_one(kind, data):
    check_reused_handle_equals_fresh(data.draw(scenarios(families=[kind], attns=BOTH_ATTN)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAMILIES)
@DEEP
@given(data=st.data())
def test_deep_decoding_and_a_second_turn_on_the_returned_cache_equal_no_cache_references(kind, data):
    scenario = scenarios(names=SELECT_ONLY, families=[kind], attns=BOTH_ATTN)
    check_decoding_and_second_turn_equal_no_cache_references(data.draw(scenario))
