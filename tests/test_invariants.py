"""Mechanism invariants on tiny LLaVA / LLaVA-NeXT: keep-all identity, counts, KV cache, decode, batching."""

from __future__ import annotations

import pytest
import torch

import piofvlm
from conftest import FixedSelection, make_inputs, model, single_inputs
from piofvlm import transformers_compat

KINDS = ["llava", "llava_next"]


def last_valid_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_keep_all_is_identical(kind, attn, batch, positions):
    m = model(kind, attn)
    inputs = make_inputs(kind, indices=tuple(range(batch)))
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = m(**inputs).logits
        reference_gen = m.generate(**inputs, max_new_tokens=6, do_sample=False)
        method = piofvlm.get_method("pio", layers=[1, 2], keep=[1.0, 1.0], positions=positions)
        with method(m):
            pruned = m(**inputs).logits
            pruned_gen = m.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert pruned.shape == reference.shape
    assert torch.equal(pruned[valid], reference[valid])
    assert torch.equal(pruned_gen, reference_gen)
    assert [len(k) for k in method.last_selection[0].kept] == (inputs["input_ids"] == 4).sum(1).tolist()


def visual_counts(inputs) -> list[int]:
    return (inputs["input_ids"] == 4).sum(1).tolist()


def expected_kept(ratio: float, count: int) -> int:
    return max(1, int(ratio * count + 0.5))


@pytest.mark.parametrize("kind", KINDS)
def test_exact_counts_and_cache_lengths(kind):
    m = model(kind)
    inputs = make_inputs(kind)
    method = piofvlm.get_method("pio", layers=[1, 3], keep=[0.5, 0.2])
    with torch.no_grad(), method(m):
        out = m(**inputs, use_cache=True)
    counts = visual_counts(inputs)
    records = method.last_selection
    assert [r.layer for r in records] == [1, 3]
    assert [len(k) for k in records[0].kept] == [expected_kept(0.5, n) for n in counts]
    assert [len(k) for k in records[1].kept] == [expected_kept(0.2, n) for n in counts]
    for record in records:
        for kept, candidates in zip(record.kept, record.candidates, strict=True):
            assert torch.equal(kept, kept.sort().values)  # original order
            assert bool(torch.isin(kept, candidates).all())
    # KV cache: layer 0 holds the whole prompt; layers after a prune point hold text + kept visual tokens (+ padding).
    lengths = inputs["attention_mask"].sum(1)
    text = lengths - torch.tensor(counts)
    stage1 = int((text + torch.tensor([expected_kept(0.5, n) for n in counts])).max())
    stage2 = int((text + torch.tensor([expected_kept(0.2, n) for n in counts])).max())
    cache = transformers_compat.output_cache(out)
    seq = inputs["input_ids"].shape[1]
    assert [cache.get_seq_length(i) for i in range(4)] == [seq, stage1, stage1, stage2]
    assert out.logits.shape[1] == stage2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_decode_continuity(kind, attn, positions):
    """Cached greedy decoding equals a no-cache forward of the same pruned sequence, token by token."""
    m = model(kind, attn)
    inputs = make_inputs(kind)
    method = piofvlm.get_method("pio", layers=[0, 2], keep=[0.6, 0.3], positions=positions)
    new_tokens = 5
    with torch.no_grad(), method(m):
        generated = m.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            suppress_tokens=[4],  # a random model may emit the image token id
        )
    chosen = [[k.tolist() for k in record.kept] for record in method.last_selection]
    fixed = FixedSelection(layers=[0, 2], keep=[0.6, 0.3], chosen=chosen, positions=positions)
    sequences = generated.sequences  # (B, S + new)
    mask = torch.cat([inputs["attention_mask"], torch.ones(sequences.shape[0], new_tokens, dtype=torch.long)], 1)
    full = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad(), fixed(m):
        logits = m(input_ids=sequences, attention_mask=mask, use_cache=False, **full).logits
    for step in range(new_tokens):
        cached = generated.logits[step]
        uncached = logits[:, -new_tokens - 1 + step]
        torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)
        assert torch.equal(cached.argmax(-1), uncached.argmax(-1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method_name", ["pio", "random"])
def test_batch_equals_single(kind, method_name):
    m = model(kind)
    inputs = make_inputs(kind)
    method = piofvlm.get_method(method_name, layers=[1, 2], keep=[0.4, 0.2])
    with torch.no_grad(), method(m):
        batch_logits = m(**inputs).logits[:, -1]
        batch_gen = m.generate(**inputs, max_new_tokens=4, do_sample=False)[:, -4:]
        batch_kept = [[k.tolist() for k in r.kept] for r in method.last_selection]
        for i in range(3):
            single = single_inputs(kind, i)
            torch.testing.assert_close(m(**single).logits[:, -1], batch_logits[i : i + 1], rtol=1e-4, atol=1e-5)
            assert [r.kept[0].tolist() for r in method.last_selection] == [kept[i] for kept in batch_kept]
            assert torch.equal(m.generate(**single, max_new_tokens=4, do_sample=False)[:, -4:], batch_gen[i : i + 1])


def test_several_images_per_prompt_budget_per_image():
    m = model("llava")
    prompts = [
        "USER : <image> left <image> right what is the colour ? ASSISTANT :",
        "USER : <image> how many ? ASSISTANT :",
    ]
    from conftest import processor
    from piofvlm.tiny.llava import random_image

    inputs = processor("llava")(
        images=[random_image(0), random_image(1), random_image(2)], text=prompts, return_tensors="pt", padding=True
    )
    method = piofvlm.get_method("pio", layers=[1], keep=7)
    with torch.no_grad(), method(m):
        m(**inputs)
    kept = method.last_selection[0].kept
    assert [len(k) for k in kept] == [14, 7]
    assert int((kept[0] < 49).sum()) == 7 and int((kept[0] >= 49).sum()) == 7  # 7 from each image
    sample = piofvlm.get_method("pio", layers=[1], keep=7, budget_scope="sample")
    with torch.no_grad(), sample(m):
        m(**inputs)
    assert [len(k) for k in sample.last_selection[0].kept] == [7, 7]


def test_model_untouched_and_hooks_removed_after_exception():
    m = model("llava")
    inputs = make_inputs("llava")
    with torch.no_grad():
        m(**inputs)  # transformers installs its own output-recorder hooks on the first forward
    modules = list(m.modules())
    before = [(len(mod._forward_pre_hooks), len(mod._forward_hooks)) for mod in modules]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    method = piofvlm.get_method("pio", keep=0.3)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), method(m):
            m(**inputs)
            raise RuntimeError("boom")
    after = [(len(mod._forward_pre_hooks), len(mod._forward_hooks)) for mod in modules]
    assert before == after
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    # a failure raised inside the hooks (a budget too large) also leaves nothing behind
    with pytest.raises(ValueError, match="more than"):
        with torch.no_grad(), piofvlm.get_method("pio", keep=500)(m):
            m(**inputs)
    assert before == [(len(mod._forward_pre_hooks), len(mod._forward_hooks)) for mod in modules]
    handle = method.apply(m)
    assert handle.active
    handle.remove()
    assert before == [(len(mod._forward_pre_hooks), len(mod._forward_hooks)) for mod in modules]


def test_inference_mode_matches_no_grad():
    m = model("llava")
    inputs = make_inputs("llava")
    method = piofvlm.get_method("pio", layers=[1], keep=0.3)
    with torch.no_grad(), method(m):
        expected = m(**inputs).logits
        kept = [k.tolist() for k in method.last_selection[0].kept]
    with torch.inference_mode(), method(m):
        got = m(**inputs).logits
    assert torch.equal(expected, got)
    assert [k.tolist() for k in method.last_selection[0].kept] == kept


def test_replacement_hidden_states_reach_the_kept_tokens():
    """A merging method's hidden states replace the kept tokens' ones; kept tokens keep their positions."""
    m = model("llava")
    inputs = make_inputs("llava", indices=(0,))
    chosen = [[[0, 10, 20]]]

    class Merge(FixedSelection):
        def select(self, ctx):
            selection = super().select(ctx)
            selection.hidden_states = torch.where(selection.keep[..., None], ctx.hidden_states * 2, ctx.hidden_states)
            return selection

    plain = FixedSelection(layers=[1], keep=3, chosen=chosen)
    merged = Merge(layers=[1], keep=3, chosen=chosen)
    with torch.no_grad():
        with plain(m):
            base = m(**inputs).logits
        with merged(m):
            changed = m(**inputs).logits
    assert base.shape == changed.shape
    assert not torch.allclose(base[:, -1], changed[:, -1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_adjacent_images_get_their_own_budgets(kind, call):
    """Two images with no text between them form one run of image tokens; each still keeps its own budget,
    in a plain forward (pixel inputs) and under generate() (which passes precomputed encoder outputs)."""
    from conftest import processor
    from piofvlm.tiny.llava import random_image

    m = model(kind)
    images = [random_image(0, (28, 28)), random_image(1, (40, 60))]
    inputs = processor(kind)(
        images=images, text=["USER : <image> <image> how many ? ASSISTANT :"], return_tensors="pt", padding=True
    )
    method = piofvlm.get_method("random", layers=[1], keep=3)
    with torch.no_grad(), method(m):
        if call == "forward":
            m(**inputs)
        else:
            m.generate(**inputs, max_new_tokens=2, do_sample=False)
    kept = method.last_selection[0].kept[0]
    first_image = 49 if kind == "llava" else 112
    assert len(kept) == 6
    assert int((kept < first_image).sum()) == 3
