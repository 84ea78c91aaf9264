"""The opt-in compiled post-prune prefill (``method.apply(model, compile_prefill=...)``, ``core/compiled_prefill.py``):
equal to eager for pio and random on a padded batch of 2, the layers after the prune point compiled once per shape,
the model unmodified after the block. Dynamo with a counting backend (graph capture without code generation) runs in
the fast suite for random (pio: slow, ~15 s here); inductor is slow on a CPU (slow tests)."""

from __future__ import annotations

import copy

import pytest
import torch

import piofvlm
from conftest import make_inputs
from piofvlm.core.compiled_prefill import compile_options
from piofvlm.tiny import llava as toy

GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "output_logits": True}
GREEDY |= {"return_dict_in_generate": True}


def _state(m):
    """Every module's own attributes that a handle could leave behind: instance forwards and hooks."""
    return [
        (name, "forward" in vars(module), len(module._forward_pre_hooks), len(module._forward_hooks))
        for name, module in m.named_modules()
    ]


def _run(m, inputs):
    with torch.no_grad():
        logits = m(**inputs).logits
        out = m.generate(**inputs, **GREEDY)
    return logits, out.sequences, torch.stack(out.logits, 1)


class CountingBackend:
    """A dynamo backend that runs the captured graph as is (same arithmetic as eager) and counts the graphs."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):  # noqa: ANN001 - dynamo's backend signature
        self.graphs += 1
        return graph_module.forward


@pytest.mark.parametrize("name", [pytest.param("pio", marks=pytest.mark.slow), "random"])
def test_compiled_post_prune_prefill_equals_eager_and_leaves_the_model_as_it_was(name):
    m = toy.build_llava(num_layers=4, seed=3)
    inputs = make_inputs("llava", indices=(0, 2))  # batch 2, left padding (61 and 66 tokens)
    assert not bool(inputs["attention_mask"].all())
    unhooked = _run(m, inputs)
    before = _state(m)
    method = piofvlm.get_method(name, layers=[1], keep=0.25)
    with method(m):
        eager = _run(m, inputs)
        kept_eager = [k.tolist() for k in method.last_selection[0].kept]
    backend = CountingBackend()
    with method(m, compile_prefill={"backend": backend, "fullgraph": True}):
        assert all("forward" in vars(m.model.language_model.layers[i]) for i in (1, 2, 3))
        assert "forward" not in vars(m.model.language_model.layers[0])  # before the prune point: not wrapped
        compiled = _run(m, inputs)
        assert [k.tolist() for k in method.last_selection[0].kept] == kept_eager
        assert backend.graphs == 3  # one graph per layer after the prune point, shared by every prefill of a shape
        again = _run(m, inputs)
        assert backend.graphs == 3  # same batch and kept length: no recompile
        with pytest.raises(RuntimeError, match="cannot be deep-copied or pickled"):
            copy.deepcopy(m.model.language_model.layers[2])  # a copy would carry a forward bound to this layer
    assert torch.equal(compiled[0], eager[0])  # the prefill's logits
    assert torch.equal(compiled[1], eager[1])  # generated tokens
    assert torch.equal(compiled[2], eager[2])  # their logits (decoding stays eager on the pruned cache)
    assert all(torch.equal(a, b) for a, b in zip(again, eager, strict=True))
    assert not torch.equal(eager[2], unhooked[2])  # pruning changed the answer: the comparison can fail
    assert _state(m) == before  # no forward, no hook left behind
    after = _run(m, inputs)
    assert all(torch.equal(a, b) for a, b in zip(after, unhooked, strict=True))


def test_a_new_kept_length_compiles_once_more_and_a_reapplied_method_reuses_the_code():
    m = toy.build_llava(num_layers=3, seed=4)
    backend = CountingBackend()
    options = {"backend": backend, "fullgraph": True}
    method = piofvlm.get_method("random", layers=[2], keep=0.25)
    with method(m, compile_prefill=options), torch.no_grad():
        m(**make_inputs("llava", indices=(1,)))
        assert backend.graphs == 1  # layer 2 only
        m(**make_inputs("llava", indices=(0,)))  # another prompt length: another kept length
        assert backend.graphs == 2
    with method(m, compile_prefill=options), torch.no_grad():
        m(**make_inputs("llava", indices=(1,)))
    assert backend.graphs == 2  # the compiled code is kept per layer and options


def test_compile_prefill_refuses_bad_options_and_layers_with_a_forward_of_their_own():
    with pytest.raises(ValueError, match="compile_prefill must be True, False or a dict"):
        compile_options("yes")
    with pytest.raises(ValueError, match=r"unknown torch.compile option\(s\) \['cudagraphs'\]"):
        compile_options({"cudagraphs": True})
    assert compile_options(False) is None
    assert compile_options(True) == {"dynamic": False}
    assert compile_options({"mode": "reduce-overhead"}) == {"dynamic": False, "mode": "reduce-overhead"}
    m = toy.build_llava(num_layers=3, seed=5)
    method = piofvlm.get_method("random", layers=[1], keep=0.25)
    with pytest.raises(ValueError, match="compile_prefill must be"):
        method.apply(m, compile_prefill="yes")
    layer = m.model.language_model.layers[2]
    layer.forward = layer.forward  # e.g. accelerate's offloading hook
    before = _state(m)
    with pytest.raises(ValueError, match=r"decoder layer\(s\) \[2\] already have a forward of their own"):
        method.apply(m, compile_prefill=True)
    assert _state(m) == before  # refused before anything stayed on the model
    with piofvlm.get_method("none")(m, compile_prefill=True):  # nothing pruned: nothing compiled, accepted
        pass


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pio", "random"])
def test_inductor_compiled_post_prune_prefill_equals_eager(name):
    m = toy.build_llava(num_layers=4, seed=6)
    inputs = make_inputs("llava", indices=(0, 2))
    method = piofvlm.get_method(name, layers=[1], keep=0.25)
    with method(m):
        eager = _run(m, inputs)
    before = _state(m)
    with method(m, compile_prefill=True):
        compiled = _run(m, inputs)
    assert _state(m) == before
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=1e-5)  # inductor fuses: not bit for bit
    assert torch.equal(compiled[1], eager[1])
    torch.testing.assert_close(compiled[2], eager[2], rtol=0, atol=1e-5)


def test_the_graphed_path_copies_its_outputs_and_equals_eager(monkeypatch):
    """Under CUDA graphs (``mode="reduce-overhead"``) the dispatcher copies the layer's output and its cache entries
    out of the graphs' pool. No CUDA graphs on a CPU: the same path is forced with the counting backend."""
    from piofvlm.core import compiled_prefill

    monkeypatch.setattr(compiled_prefill, "_GRAPHED_MODES", (None,))
    m = toy.build_llava(num_layers=3, seed=7)
    inputs = make_inputs("llava", indices=(0, 2))
    method = piofvlm.get_method("random", layers=[1], keep=0.25)
    with method(m):
        eager = _run(m, inputs)
    backend = CountingBackend()
    with method(m, compile_prefill={"backend": backend}) as handle:
        assert handle._compiled.graphed
        compiled = _run(m, inputs)
    assert backend.graphs == 2
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True))
