"""Regression tests of issue 12: multi-turn on a pruned cache, handle reuse, copies, odd inputs, clear refusals."""

from __future__ import annotations

import re

import pytest
import torch

import piofvlm
import test_qwen as tq
from conftest import FixedSelection, make_inputs, model
from piofvlm import cli, transformers_compat
from piofvlm.adapters import ADAPTERS
from piofvlm.tiny import llava as toy
from piofvlm.tiny.cases import TINY_CASES
from piofvlm.tiny.families import FAMILIES, glm4v_video_inputs
from piofvlm.tiny.qwen import IMAGE, OV_IMAGE, OV_VIDEO, QWEN_KINDS, VIDEO, add_videos, build_qwen, random_image
from test_methods_matrix import build
from test_properties import refuses

FOLLOW_UP = torch.tensor([[10, 11, 12, 13]])  # "what is the colour" in the toy vocabulary: no image token
GREEDY = {"do_sample": False, "suppress_tokens": [4]}


def extended_mask(inputs, ids):
    """The prompt's padding mask extended with ones over the tokens of ``ids`` after the prompt."""
    added = ids.shape[1] - inputs["input_ids"].shape[1]
    return torch.cat([inputs["attention_mask"], torch.ones(ids.shape[0], added, dtype=torch.long)], 1)


def reference_logits(m, inputs, ids, records, layers, keep, positions="keep"):
    """Last-position logits of a no-cache forward over ``ids`` keeping exactly what ``records`` kept."""
    chosen = [[k.tolist() for k in record.kept] for record in records]
    fixed = FixedSelection(layers=layers, keep=keep, chosen=chosen, positions=positions)
    pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    mask = extended_mask(inputs, ids)
    if "mm_token_type_ids" in pixels:  # M-RoPE families: the tokens after the prompt are text (type 0)
        added = ids.shape[1] - inputs["input_ids"].shape[1]
        pixels["mm_token_type_ids"] = torch.nn.functional.pad(pixels["mm_token_type_ids"], (0, added))
    with torch.no_grad(), fixed(m):
        return m(input_ids=ids, attention_mask=mask.long(), use_cache=False, **pixels).logits[:, -1]


def second_turn(m, inputs, cache, sequences, follow_up=FOLLOW_UP, greedy=GREEDY):
    """Generate one token after ``sequences`` + a follow-up question, continuing ``cache``."""
    ids = torch.cat([sequences, follow_up.expand(sequences.shape[0], -1)], 1)
    mask = extended_mask(inputs, ids)
    out = m.generate(
        input_ids=ids,
        attention_mask=mask.long(),
        **{transformers_compat.cache_kwarg_name(m): cache},
        max_new_tokens=1,
        output_logits=True,
        return_dict_in_generate=True,
        **greedy,
    )
    return ids, out.logits[0]


def pruned_conversation(m, inputs, method, follow_up=FOLLOW_UP, greedy=GREEDY, **first_turn):
    """Under ``method``: a 3-token generation, then :func:`second_turn` on the cache it returned. Checks that the
    cache reports the unpruned length (prompt + the 2 tokens fed back; transformers reads it from layer 0) and that
    the second turn ran no new prefill. Returns the first turn's selection records, the second turn's ids and logits.
    """
    with torch.no_grad(), method(m):
        first = m.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, **first_turn, **greedy)
        cache = transformers_compat.output_cache(first)
        assert cache.get_seq_length() == inputs["input_ids"].shape[1] + 2
        records = method.last_selection
        ids, logits = second_turn(m, inputs, cache, first.sequences, follow_up, greedy)
    assert method.last_selection is records  # the second turn was no new prefill
    return records, ids, logits


# ------------------------------------------------------------------------------------------------ 1. multi-turn
@pytest.mark.parametrize("layers", [[0], [1], [0, 2]])
@pytest.mark.parametrize("keep", [45, 0.3])
@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_second_turn_on_the_returned_cache_equals_no_cache_reference(layers, keep, positions):
    m = model("llava")
    inputs = make_inputs("llava", indices=(0, 2))
    keep = [keep] * len(layers) if len(layers) > 1 else keep
    method = piofvlm.get_method("random", layers=layers, keep=keep, positions=positions)
    records, ids, logits = pruned_conversation(m, inputs, method)
    expected = reference_logits(m, inputs, ids, records, layers, keep, positions)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_continuing_an_earlier_cache_after_another_prompt_uses_that_cache_layout():
    """Handle reuse: prompt A, then prompt B, then A's second turn: A's cache keeps A's layout (not B's)."""
    m = model("llava")
    a, b = make_inputs("llava", indices=(0, 2)), make_inputs("llava", indices=(2, 2))  # no padding
    method = piofvlm.get_method("random", layers=[1], keep=0.3)
    with torch.no_grad(), method(m):
        first = m.generate(**a, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
        records = method.last_selection
        m.generate(**b, max_new_tokens=3, **GREEDY)
        ids, logits = second_turn(m, a, transformers_compat.output_cache(first), first.sequences)
    torch.testing.assert_close(logits, reference_logits(m, a, ids, records, [1], 0.3), rtol=1e-4, atol=1e-4)


def test_a_cache_pruned_under_one_handle_continues_under_another():
    m = model("llava")
    inputs = make_inputs("llava", indices=(1,))
    with torch.no_grad():
        method = piofvlm.get_method("random", layers=[0], keep=0.3)
        with method(m):
            first = m.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
        records = method.last_selection
        with piofvlm.get_method("random", layers=[2], keep=0.5)(m):
            ids, logits = second_turn(m, inputs, transformers_compat.output_cache(first), first.sequences)
    torch.testing.assert_close(logits, reference_logits(m, inputs, ids, records, [0], 0.3), rtol=1e-4, atol=1e-4)


def tiny(kind: str, indices: tuple[int, ...]):
    """A family's tiny model (4 decoder layers) and its standard samples ``indices``, left-padded."""
    if kind in ("llava", "llava_next"):
        return model(kind), make_inputs(kind, indices=indices)
    return tq.model(kind), tq.make_inputs(kind, indices=indices)


def follow_up_ids(kind: str) -> torch.Tensor:
    """``(1, 4)``: "what is the colour" in the family's vocabulary (no visual token)."""
    tokenizer = toy.build_processor(kind).tokenizer if kind in ("llava", "llava_next") else tq.tokenizer(kind)
    return torch.tensor([tokenizer.convert_tokens_to_ids(["what", "is", "the", "colour"])])


QUICK_SECOND_TURNS = [(kind, [0], "keep") for kind in ("internvl", "qwen2_5_vl", "glm4v")]


def second_turn_cases() -> list:
    """(kind, layers, positions) on every family; ``renumber`` where the adapter supports it. Quick (the property
    suite draws second turns on every family): pruned before layer 0 (layer 0's cache is padded back to the prompt
    length, which transformers reads) with positions kept, on a 1-D RoPE, a Qwen and a GLM family."""
    return [
        pytest.param(
            kind,
            layers,
            positions,
            marks=[] if (kind, layers, positions) in QUICK_SECOND_TURNS else pytest.mark.slow,
            id=f"{kind}-layers{'+'.join(map(str, layers))}-{positions}",
        )
        for kind in TINY_CASES
        for layers in ([0], [1, 3])
        for positions in (("keep", "renumber") if ADAPTERS[kind].supports_renumber else ("keep",))
    ]


@pytest.mark.parametrize(("kind", "layers", "positions"), second_turn_cases())
def test_second_turn_on_every_family_equals_no_cache_reference(kind, layers, positions):
    """Images and videos, dynamic resolution, left padding: a follow-up turn on the returned cache equals a no-cache
    forward over the whole conversation keeping the same visual tokens."""
    m, inputs = tiny(kind, (0, 1))
    keep = [0.4, 0.2][: len(layers)]
    greedy = {"do_sample": False, "suppress_tokens": tq.SUPPRESS}
    method = piofvlm.get_method("pio", layers=layers, keep=keep, positions=positions)
    records, ids, logits = pruned_conversation(m, inputs, method, follow_up_ids(kind), greedy, min_new_tokens=3)
    expected = reference_logits(m, inputs, ids, records, layers, keep, positions)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- 2, 3. handle reuse, encoder side
def image_only(kind):
    image = random_image(3, (56, 56))
    placeholder = OV_IMAGE if kind == tq.ONEVISION else IMAGE
    prompt = f"USER : {placeholder} what is the colour ? ASSISTANT :"
    return add_videos(kind, tq.processor(kind), [prompt], [[image]] if kind == tq.ONEVISION else [image], [])


def video_only(kind):
    placeholder = OV_VIDEO if kind == tq.ONEVISION else VIDEO
    return add_videos(kind, tq.processor(kind), [f"USER : {placeholder} how many ? ASSISTANT :"], None, [(2, 4, 4)])


@pytest.mark.parametrize("kind", [*QWEN_KINDS, tq.ONEVISION])
@pytest.mark.parametrize("name", ["visionzip", "vscan", "pool"])
def test_reused_handle_equals_fresh_handle_across_image_and_video_prompts(kind, name):
    assert_reused_handle_equals_fresh(
        tq.model(kind), [image_only(kind), video_only(kind), image_only(kind)], build(name, 4)
    )


def assert_reused_handle_equals_fresh(m, calls, method) -> None:
    """``calls`` generated one after another under one application of ``method`` == each under a fresh one: the same
    tokens and the same kept tokens."""
    with torch.no_grad():
        reused = []
        with method(m):
            for inputs in calls:
                tokens = m.generate(**inputs, **tq.GREEDY)
                reused.append((tokens, [r.kept[0].tolist() for r in method.last_selection]))
        for inputs, (tokens, kept) in zip(calls, reused, strict=True):
            with method(m):
                assert torch.equal(m.generate(**inputs, **tq.GREEDY), tokens)
                assert [r.kept[0].tolist() for r in method.last_selection] == kept


def mixed_prompts(kind: str) -> list[dict]:
    """Three prompts of a ``tiny.families`` family, each alone: one image; an image and a video (or a second image,
    or frames written as images); the first again. GLM-4.xV takes a video only alone: its second prompt is a video;
    LLaVA-NeXT-Video's encoder-side methods refuse videos: its second prompt is two images."""
    second = tq.make_inputs(kind, indices=(2 if kind == "llava_next_video" else 1,))
    if kind in ("glm4v", "glm46v", "glm4v_moe"):
        second = glm4v_video_inputs((0,))
    return [tq.make_inputs(kind, indices=(0,)), second, tq.make_inputs(kind, indices=(0,))]


def _newer_family_reuse_cases() -> list:
    """(kind, name) of the newer families with an encoder-side method they run (``refuses``: the REFUSED table);
    quick: ``pool`` on InternVL (frames as images), LLaVA-NeXT-Video and GLM-4.1V (a video prompt)."""
    quick = [("internvl", "pool"), ("llava_next_video", "pool"), ("glm4v", "pool")]
    return [
        pytest.param(kind, name, marks=[] if (kind, name) in quick else pytest.mark.slow)
        for kind in FAMILIES
        for name in ("visionzip", "vscan", "pool")
        if not refuses(kind, name, has_video=False)  # no prompt of mixed_prompts has a LLaVA-NeXT-Video video
    ]


@pytest.mark.parametrize(("kind", "name"), _newer_family_reuse_cases())
def test_reused_handle_equals_fresh_handle_on_the_newer_families(kind, name):
    assert_reused_handle_equals_fresh(tq.model(kind), mixed_prompts(kind), build(name, 4))


# ---------------------------------------------------------------------------------------------- 4. copies, saving
def module_state(m):
    """Hooks, instance attributes that shadow methods, and weights: what a fresh model must equal."""
    hooks = [(len(x._forward_pre_hooks), len(x._forward_hooks)) for x in m.modules()]
    shadows = [name for x in m.modules() for name in vars(x) if name.startswith("get_") and callable(vars(x)[name])]
    return hooks, shadows, {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("kind", ["llava", "qwen3_vl"])
def test_deepcopy_and_pickling_a_hooked_model_are_refused_and_work_after_removal(kind, tmp_path):
    import copy
    import io
    import pickle

    # A fresh model: other tests' output_hidden_states calls leave transformers' own (unpicklable) hooks behind.
    m = toy.build_llava() if kind == "llava" else build_qwen(kind)
    inputs = make_inputs("llava", indices=(0,)) if kind == "llava" else tq.make_inputs(kind, indices=(1,))
    with torch.no_grad():
        m(**inputs)  # transformers adds its own recorder hooks on the first forward
    hooks, shadows, weights = module_state(m)
    method = build("visionzip", 0.3)  # hooks on the vision tower, the decoder and an instance-level wrapper
    parts = [m, m.model, m.model.language_model, m.model.language_model.layers[1]]
    with method(m):
        for part in parts:
            with pytest.raises(RuntimeError, match="cannot be deep-copied or pickled.*state_dict"):
                copy.deepcopy(part)
            with pytest.raises(RuntimeError, match="cannot be deep-copied or pickled"):
                torch.save(part, io.BytesIO())
        with pytest.raises(RuntimeError, match="cannot be deep-copied or pickled"):
            pickle.dumps(m)
        torch.save(m.state_dict(), tmp_path / "weights.pt")  # the advertised alternatives work under the method
        m.save_pretrained(tmp_path / "saved")
    clone = copy.deepcopy(m)  # after removal: a clean copy, as if the method had never been applied
    assert module_state(clone)[:2] == (hooks, shadows) == module_state(m)[:2]
    for name, value in weights.items():
        assert torch.equal(clone.state_dict()[name], value)
        assert torch.equal(torch.load(tmp_path / "weights.pt")[name], value)
    with torch.no_grad(), method(clone):  # a method applies to the copy and prunes it
        clone(**inputs)
        assert len(method.last_selection) == 1


# --------------------------------------------------------------------------------------------- 5. odd prompts
def test_sparsevlm_refuses_a_prompt_without_text_and_names_the_sample():
    m = model("llava")
    prompts = ["USER : <image> how many ? ASSISTANT :", "<image>"]
    inputs = make_inputs("llava", indices=(0, 1), prompts=prompts)
    method = piofvlm.get_method("sparsevlm", layers=[1, 2], keep=[0.4, 0.2])
    with torch.no_grad(), method(m):
        with pytest.raises(ValueError, match=r"sample\(s\) \[1\] have none.*add the question"):
            m(**inputs)
        m(**make_inputs("llava", indices=(0,), prompts=["USER : <image>"]))  # text before the image is enough
        assert [len(k) for k in method.last_selection[-1].kept] == [10]


# ------------------------------------------------------------------------------------------ 7. field types
@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [
        ("pio", {"nms": "no"}, "PIO.nms must be True or False, got 'no'"),
        ("pio", {"fast_proxy": "yes"}, "PIO.fast_proxy must be True or False, got 'yes'"),
        ("pio", {"include_last": 1}, "PIO.include_last must be True or False, got 1"),
        ("pio", {"tau": "0.8"}, "PIO.tau must be a number, got '0.8'"),
        ("pio", {"num_loss_positions": 2.0}, "PIO.num_loss_positions must be an int, got 2.0"),
        ("cdpruner", {"negate": "x"}, "CDPruner.negate must be True or False, got 'x'"),
        ("random", {"seed": "a"}, "RandomPrune.seed must be an int, got 'a'"),
        ("random", {"seed": 1.5}, "RandomPrune.seed must be an int, got 1.5"),
        ("vscan", {"global_layer": 1.0}, "VScan.global_layer must be an int or None, got 1.0"),
        ("fastv", {"query": 3}, "FastV.query must be a string, got 3"),
    ],
)
def test_fields_of_the_wrong_type_are_refused(name, fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        piofvlm.get_method(name, **fields)


def test_numpy_scalars_are_accepted_as_the_python_values():
    import numpy as np

    method = piofvlm.get_method("pio", layers=[np.int64(1), 2], keep=[np.int64(20), np.int32(5)], nms=np.bool_(False))
    assert method.layers == [1, 2] and method.keep == [20, 5] and method.nms is False
    assert all(type(v) is int for v in [*method.layers, *method.keep])
    ratio = piofvlm.get_method("random", keep=np.float32(0.5), seed=np.int64(3))
    assert ratio.keep == [0.5] and type(ratio.keep[0]) is float and type(ratio.seed) is int
    m = model("llava")
    inputs = make_inputs("llava", indices=(0,))
    with torch.no_grad(), method(m):  # the counts work as counts
        m(**inputs)
    assert [len(r.kept[0]) for r in method.last_selection] == [20, 5]


# ---------------------------------------------------------------------------------------- 8. CLI and messages
@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy-llava")
    toy.save_toy_llava(directory)
    return directory


def test_cli_reports_bad_files_devices_attention_and_flags_without_a_traceback(saved_llava, tmp_path, capsys):
    image = tmp_path / "image.png"
    toy.random_image(3).save(image)
    not_image = tmp_path / "notimage.png"
    not_image.write_text("hello")
    argv = ["run", "--model", str(saved_llava), "--prompt", "how many ?"]
    cases = [
        (["--image", str(not_image)], "--image '.*notimage.png' is not an image file PIL can read"),
        (["--image", str(image), "--device", "nonsense"], "device 'nonsense' is not a torch device"),
        (["--image", str(image), "--method", "none", "--keep", "0.5"], "--keep do not apply to --method none"),
        (["--image", str(image), "--method", "none", "--layers", "1"], "--layers do not apply to --method none"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--image", str(image), "--device", "cuda"], "sees no CUDA device; use 'cpu'"))
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        cases.append((["--image", str(image), "--attn", "flash_attention_2"], "'flash_attention_2' cannot be used"))
    for extra, message in cases:
        assert cli.main([*argv, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("piofvlm: error: ") and re.search(message, err), (extra, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1


def test_cli_eval_refuses_empty_runs(tmp_path, capsys):
    for flag in ("--num-samples", "--batch-size"):
        assert cli.main(["eval", flag, "0", "--out", str(tmp_path / "x")]) == 2
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_eval_sets_left_padding_itself(tmp_path, capsys):
    import json
    import shutil

    from piofvlm.testbed.model import CHECKPOINT_DIR

    right = tmp_path / "right-padded"
    shutil.copytree(CHECKPOINT_DIR, right)
    config = json.loads((right / "tokenizer_config.json").read_text())
    (right / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "right"}))
    results = []
    for directory in (CHECKPOINT_DIR, right):
        out = tmp_path / directory.name
        argv = ["eval", "--model", str(directory), "--methods", "pio", "--keep", "0.111", "--num-samples", "6"]
        assert cli.main([*argv, "--batch-size", "6", "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
        results.append([row["accuracy"] for row in json.loads((out / "results.json").read_text())["rows"]])
    assert results[0] == results[1]


def test_attention_switched_to_flex_after_applying_is_refused_at_the_call():
    m = toy.build_llava(num_layers=2)
    inputs = make_inputs("llava", indices=(0,))
    with torch.no_grad(), piofvlm.get_method("pio", layers=[1], keep=0.3)(m):
        m.set_attn_implementation("flex_attention")
        with pytest.raises(ValueError, match="'flex_attention' is not supported.*attn_implementation='sdpa'"):
            m(**inputs)


def test_a_batch_row_of_padding_only_is_refused_and_named():
    m = model("llava")
    inputs = make_inputs("llava", indices=(0, 1))
    inputs["attention_mask"][1] = 0
    with torch.no_grad(), piofvlm.get_method("pio", layers=[1], keep=0.3)(m):
        with pytest.raises(ValueError, match=r"sample\(s\) \[1\] have image tokens where attention_mask is 0"):
            m(**inputs)


def test_stage_records_print_in_one_line():
    m = model("llava")
    method = piofvlm.get_method("pio", layers=[1, 2], keep=[25, 5])
    with torch.no_grad(), method(m):
        m(**make_inputs("llava"))
    text = repr(method.last_selection)
    assert text == (
        "[StageRecord(stage=0, layer=1, kept=[25, 25, 25] of [49, 49, 49] per sample, scored), "
        "StageRecord(stage=1, layer=2, kept=[5, 5, 5] of [25, 25, 25] per sample, scored)]"
    )


# ------------------------------------------------------------------------------- fidelity: the authors' Qwen head
def test_output_head_input_embeddings_scores_with_the_embedding_matrix():
    """The authors' Qwen2.5-VL proxy ends in ``embed_tokens`` (as output head): scores equal a direct autograd
    computation with that head, differ from the LM head's (the toy's embeddings are untied), and the fast path
    equals the reference path."""
    import torch.nn.functional as F

    kind = "qwen2_5_vl"
    m = tq.model(kind)
    assert not torch.equal(m.lm_head.weight, m.get_input_embeddings().weight)
    inputs = tq.make_inputs(kind, indices=(1,))
    layer = 2
    with torch.no_grad():
        hidden = m(**inputs, output_hidden_states=True).hidden_states[layer]
        positions, _ = m.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            video_grid_thw=inputs["video_grid_thw"],
        )
    lm = m.model.language_model
    visual = torch.isin(inputs["input_ids"][0], torch.tensor(tq.placeholder_ids(kind)))
    expected = {}
    for head, weight in (("input_embeddings", m.get_input_embeddings().weight), ("lm_head", m.lm_head.weight)):
        x = hidden.clone().requires_grad_(True)
        with torch.enable_grad():
            out = lm.layers[layer - 1](x, attention_mask=None, position_embeddings=lm.rotary_emb(x, positions))
            window = F.linear(lm.norm(out), weight)[0, -5:-1].float()
            (grad,) = torch.autograd.grad(F.cross_entropy(window, window.argmax(-1)), x)
        expected[head] = grad[0, visual].norm(dim=-1)
    for head in expected:
        for fast in (True, False):
            fields = {"proxy_layer": "previous", "output_head": head, "fast_proxy": fast, "budget_scope": "sample"}
            method = piofvlm.get_method("pio", layers=[layer], keep=0.3, **fields)
            with torch.no_grad(), method(m):
                m(**inputs)
            torch.testing.assert_close(method.last_selection[0].scores[0], expected[head], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(expected["input_embeddings"], expected["lm_head"], rtol=1e-2)


def test_qwen_preset_reproducing_the_authors_uses_the_embedding_head():
    from piofvlm.presets import PRESETS

    qwen = [name for name in PRESETS if name.startswith("pio-qwen25vl-")]
    assert qwen
    for name in qwen:
        assert piofvlm.get_preset(name).llm.output_head == "input_embeddings"
    assert piofvlm.get_preset("pio-llava15-64").output_head == "lm_head"  # LLaVA's head is the real one
    with pytest.raises(ValueError, match="output_head must be one of .*'embed'"):
        piofvlm.get_method("pio", output_head="embed")


# ------------------------------------------------------------------------- found by the property suite (cdpruner)
def test_cdpruner_batch_equals_single_when_the_budget_exceeds_the_kernel_rank():
    """A budget above the feature size (64 here) exhausts the DPP kernel; the remaining picks must follow the index,
    not rounding noise that differs between a batch and a single sample."""
    m = model("llava_next")
    inputs = make_inputs("llava_next", indices=(0, 2, 1))
    method = piofvlm.get_method("cdpruner", keep=100)
    assert m.config.text_config.hidden_size < 100
    with torch.no_grad(), method(m):
        batch = m(**inputs).logits[:, -1]
        kept = [k.tolist() for k in method.last_selection[0].kept]
        for i, index in enumerate((0, 2, 1)):
            single = m(**make_inputs("llava_next", indices=(index,))).logits[:, -1]
            assert method.last_selection[0].kept[0].tolist() == kept[i]
            torch.testing.assert_close(single, batch[i : i + 1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- modes table: beams, compile
def test_beam_search_under_a_keep_all_method_equals_the_unhooked_model():
    m = model("llava")
    inputs = make_inputs("llava", indices=(0, 2))
    beams = {"max_new_tokens": 4, "num_beams": 3, "do_sample": False, "suppress_tokens": [4]}
    with torch.no_grad():
        reference = m.generate(**inputs, **beams)
        with piofvlm.get_method("random", layers=[0, 2], keep=[1.0, 1.0])(m):
            assert torch.equal(m.generate(**inputs, **beams), reference)
        with piofvlm.get_method("pio", layers=[1], keep=0.3)(m):  # pruned: runs, one beam per row and step
            assert m.generate(**inputs, **beams).shape == (2, inputs["input_ids"].shape[1] + 4)


@pytest.mark.slow
def test_torch_compile_runs_with_a_method_applied():
    """Hooks make graph breaks; the compiled model (eager backend: no compiler toolchain needed) prunes the same."""
    m = model("llava")
    inputs = make_inputs("llava", indices=(0, 1))
    method = piofvlm.get_method("pio", layers=[1], keep=0.3)
    with torch.no_grad():
        with method(m):
            expected = m(**inputs).logits
        compiled = torch.compile(m, backend="eager")
        with method(m):
            assert torch.equal(compiled(**inputs).logits, expected)


# -------------------------------------------------------------- found by the property suite (fp64 merging methods)
def _fp64_cases() -> list:
    """(name, kind): every merging method on every family that runs it (on its standard samples 2, 0, 1); the quick
    suite runs Qwen2-VL, where the bug was found."""
    return [
        pytest.param(name, kind, marks=[] if kind == "qwen2_vl" else pytest.mark.slow)
        for kind in TINY_CASES
        for name in ("visionzip", "vscan", "pool")
        if not refuses(kind, name, has_video=kind in FAMILIES and FAMILIES[kind].has_video)  # sample 1's video
    ]


@pytest.mark.parametrize(("name", "kind"), _fp64_cases())
def test_merging_methods_keep_fp64_precision(name, kind):
    """Merged values were averaged in fp32 and cast back: an fp64 model lost its precision (keep-all not identical,
    batch != single beyond fp64 rounding)."""
    if kind in ("llava", "llava_next"):
        m, inputs = model(kind, dtype=torch.float64), make_inputs(kind, indices=(2, 0, 1))
    else:
        m, inputs = tq.model(kind, dtype=torch.float64), tq.make_inputs(kind, indices=(2, 0, 1))
    for key in ("pixel_values", "pixel_values_videos", "high_res_pixel_values"):
        if key in inputs:
            inputs[key] = inputs[key].to(torch.float64)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = m(**inputs).logits
        with build(name, 1.0)(m):
            assert torch.equal(m(**inputs).logits[valid], reference[valid])


def test_pio_runs_on_fp64_models():
    """``vector_norm(..., dtype=float32)`` refuses fp64 input: PIO crashed on fp64 models (found by the deep suite)."""
    from piofvlm.methods.pio import proxy_loss
    from test_pio import capture_context

    m = model("llava", dtype=torch.float64)
    inputs = make_inputs("llava", indices=(0, 1))
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.float64)
    ctx = capture_context(m, inputs, layer=1)
    expected = proxy_loss.proxy_gradient(ctx, 1).norm(dim=-1)
    method = piofvlm.get_method("pio", layers=[1], keep=0.3)
    with torch.no_grad(), method(m):
        m(**inputs)
    assert method.score(ctx).dtype == torch.float64
    for b, record_scores in enumerate(method.last_selection[0].scores):  # records hold fp32 copies
        torch.testing.assert_close(record_scores, expected[b][ctx.groups[b] >= 0].float())
    assert [len(k) for k in method.last_selection[0].kept] == [15, 15]


# ------------------------------------------------------------------- issue 23: a pruned cache after the removal
QUICK_REMOVED = ("llava", "gemma4", "qwen3_5")


@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=[] if k in QUICK_REMOVED else pytest.mark.slow) for k in TINY_CASES]
)
def test_a_pruned_cache_continued_after_the_method_is_removed_is_refused(kind):
    """Its layers hold fewer slots than the prompt; without the hooks the model decoded it silently with other
    tokens on some families (Gemma 4, LLaVA with one unpadded sample under sdpa). Refused with what to do; under any
    method applied again it continues (and equals the continuation under the original method)."""
    m, inputs = TINY_CASES[kind]()
    greedy = {"do_sample": False, "suppress_tokens": tq.SUPPRESS}
    with torch.no_grad():
        method = piofvlm.get_method("random", layers=[0], keep=0.5)
        with method(m):
            first = m.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True, **greedy)
        cache = transformers_compat.output_cache(first)
        follow_up = first.sequences[:, -1:].expand(-1, 2)
        length = cache.get_seq_length()
        with pytest.raises(RuntimeError, match="pruned by piofvlm and is continued with no method applied"):
            second_turn(m, inputs, cache, first.sequences, follow_up, greedy)
        assert cache.get_seq_length() == length  # refused before any layer wrote into it
        with piofvlm.get_method("pio", layers=[1], keep=0.3)(m):  # another method: the cache's own layout decodes
            ids, logits = second_turn(m, inputs, cache, first.sequences, follow_up, greedy)
    expected = reference_logits(m, inputs, ids, method.last_selection, [0], 0.5)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------- issue 23: generate(use_cache=False) under encoder-side methods
QUICK_NO_CACHE = {"llava", "qwen2_5_vl", "gemma4", "qwen3_5"}


def no_cache_cases() -> list:
    from test_methods_matrix import ENCODER_SIDE, REFUSED

    return [
        pytest.param(kind, name, marks=[] if kind in QUICK_NO_CACHE else pytest.mark.slow, id=f"{kind}-{name}")
        for kind in TINY_CASES
        for name in ENCODER_SIDE
        if (name, kind) not in REFUSED
    ]


@pytest.mark.parametrize(("kind", "name"), no_cache_cases())
def test_generate_without_cache_equals_cached_decoding(kind, name):
    """``generate(use_cache=False)`` runs the whole sequence at every step with the features it encoded once: the
    encoder-side captures of that encoding must serve every step (they were dropped after the first: a crash). The
    encoder-side selection does not depend on the text after the prompt, so every step equals cached decoding
    (``chain``'s decoder stage selects again at each no-cache step, over the longer text: its first step, the
    same prompt, equals the cached one)."""
    from test_methods_matrix import build

    m, inputs = TINY_CASES[kind]()
    greedy = {"do_sample": False, "max_new_tokens": 3, "min_new_tokens": 3, "suppress_tokens": tq.SUPPRESS}
    runs = {}
    with torch.no_grad():
        for use_cache in (True, False):
            method = build(name, 0.5)
            with method(m):
                out = m.generate(
                    **inputs, use_cache=use_cache, output_logits=True, return_dict_in_generate=True, **greedy
                )
            runs[use_cache] = (out, [[k.tolist() for k in r.kept] for r in method.last_selection])
    (cached, cached_kept), (uncached, uncached_kept) = runs[True], runs[False]
    steps = 1 if name == "chain" else 3
    for step in range(steps):
        torch.testing.assert_close(uncached.logits[step], cached.logits[step], rtol=1e-4, atol=1e-4)
    if name != "chain":
        assert torch.equal(uncached.sequences, cached.sequences)
        assert uncached_kept == cached_kept  # the last no-cache step kept what the cached prefill kept
