"""torch.compile with a method applied: compiled static-cache decoding, a forward compiled before the method was
applied, inductor. Compiling is slow on a CPU: the models are tiny and the tests are marked slow."""

from __future__ import annotations

import pytest
import torch

import conftest
import piofvlm
import test_qwen
from conftest import make_inputs
from piofvlm.core.prefill import _sample_keys
from piofvlm.tiny import llava as toy
from piofvlm.tiny.cases import TINY_CASES
from piofvlm.transformers_compat import compile_config

pytestmark = pytest.mark.slow

GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "output_logits": True}
GREEDY |= {"return_dict_in_generate": True, "cache_implementation": "static"}


def generate(m, inputs, backend=None):
    extra = {} if backend is None else {"compile_config": compile_config(backend=backend, mode=None)}
    with torch.no_grad():
        out = m.generate(**inputs, **GREEDY, **extra)
    return out.sequences, torch.stack(out.logits, 1)


def assert_same(a, b):
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-5)


def test_compiled_decode_equals_eager_and_hooks_follow_apply_and_remove():
    """dynamo traces the hooks (backend "eager": the graph capture without code generation). A decode compiled before
    the method was applied is traced again with it; after removal the unhooked graph comes back."""
    m = toy.build_llava(num_layers=4, seed=3)
    inputs = make_inputs("llava", indices=(0, 2))
    unhooked = generate(m, inputs)
    assert_same(generate(m, inputs, "eager"), unhooked)  # compiled before any method
    method = piofvlm.get_method("pio", layers=[1, 3], keep=[0.5, 0.25])
    with method(m):
        eager = generate(m, inputs)
        compiled = generate(m, inputs, "eager")
        assert [len(k) for k in method.last_selection[-1].kept] == [12, 12]
    assert not torch.equal(eager[1], unhooked[1])  # pruning changes the answer's logits
    assert_same(compiled, eager)
    assert_same(generate(m, inputs, "eager"), unhooked)  # the hooked graph is not run after removal
    with piofvlm.get_method("random", layers=[2], keep=1.0)(m):  # keep-all, compiled
        assert_same(generate(m, inputs, "eager"), unhooked)


def test_forward_compiled_by_the_user_before_the_method_still_prunes():
    m = toy.build_llava(num_layers=2, seed=4)
    inputs = make_inputs("llava", indices=(1,))
    method = piofvlm.get_method("random", layers=[1], keep=0.25)
    with torch.no_grad():
        with method(m):
            expected = m(**inputs).logits
        m.forward = torch.compile(m.forward, backend="eager")
        try:
            unhooked = m(**inputs).logits
            with method(m):
                pruned = m(**inputs).logits
                assert method.last_selection, "the compiled forward ran without the hooks"
            after = m(**inputs).logits
        finally:
            del m.forward
    assert pruned.shape == expected.shape != unhooked.shape
    torch.testing.assert_close(pruned, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(after, unhooked, rtol=0, atol=1e-5)


def test_sample_keys_under_inductor():
    ids = torch.randint(0, 50_000, (3, 40))
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[0, :5] = False
    compiled = torch.compile(lambda i, v: _sample_keys(i, v) + 1)
    assert torch.equal(compiled(ids, valid) - 1, _sample_keys(ids, valid))


def test_inductor_compiled_decode_equals_eager():
    m = toy.build_llava(num_layers=2, seed=5)
    inputs = make_inputs("llava", indices=(0,))
    method = piofvlm.get_method("pio", layers=[1], keep=0.25)
    with method(m):
        eager = generate(m, inputs)
        compiled = generate(m, inputs, "inductor")
    assert_same(compiled, eager)


#: Compiled decoding runs on a static cache, which Qwen3.5 (linear-attention layers) and Gemma 3 / 4 (sliding-window
#: layers) refuse (tests/test_qwen3_5.py, tests/test_gemma3.py, tests/test_static_cache.py), as do PaliGemma (its
#: prefix mask) and Llama 4 (chunked layers) (tests/test_paligemma.py, tests/test_llama4.py).
NO_STATIC_CACHE = ("qwen3_5", "gemma3", "gemma4", "qwen3_5_moe", "shieldgemma2", "paligemma", "llama4")


@pytest.mark.parametrize(
    "kind", [kind for kind in TINY_CASES if kind not in conftest.TWIN_FAMILIES and kind not in NO_STATIC_CACHE]
)
def test_compiled_decode_equals_eager_on_every_family(kind):
    """Each family's decode hooks (masks for the shorter caches; M-RoPE positions) traced by dynamo (backend
    "eager") decode a pruned static cache as eager decoding does; keep-all compiled equals the unhooked model.
    (Twin families run their twin's code: not compiled again, 10-50 s each on a CPU.)"""
    if kind in ("llava", "llava_next"):
        m, inputs = conftest.model(kind), conftest.make_inputs(kind, indices=(0, 1))
    else:
        m, inputs = test_qwen.model(kind), test_qwen.make_inputs(kind, indices=(0, 1))
    unhooked = generate(m, inputs)
    method = piofvlm.get_method("pio", layers=[1, 3], keep=[0.5, 0.25])
    with method(m):
        eager = generate(m, inputs)
        compiled = generate(m, inputs, "eager")
    assert not torch.equal(eager[1], unhooked[1])
    assert_same(compiled, eager)
    with piofvlm.get_method("random", layers=[0, 2], keep=[1.0, 1.0])(m):
        assert_same(generate(m, inputs, "eager"), unhooked)
