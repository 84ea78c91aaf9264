"""Contract tests: each transformers internal reached through ``piofvlm.transformers_compat`` still has the shape the
library relies on. A failure names the internal, the installed transformers version and the function to update."""

from __future__ import annotations

import pytest
import torch

from piofvlm import toy, transformers_compat

VERSION = transformers_compat.TRANSFORMERS_VERSION


def contract(holds: bool, internal: str, function: str) -> None:
    """Fail with the message a maintainer needs: which internal moved, in which release, what to change."""
    if not holds:
        pytest.fail(
            f"transformers {VERSION} changed {internal}; piofvlm.transformers_compat.{function} must learn it",
            pytrace=False,
        )


def test_dynamic_cache_layers_can_be_left_padded():
    """``generate()`` and the model read the cache length from layer 0; padding it must change that length, keep the
    cached entries at the end, and the next ``update`` must append after them."""
    from transformers.cache_utils import DynamicCache, StaticCache

    model = toy.build_llava(num_layers=2)
    with torch.no_grad():
        out = model.model.language_model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    cache = transformers_compat.output_cache(out)
    contract(transformers_compat.is_dynamic_cache(cache), "the cache the language model creates", "is_dynamic_cache")
    keys = cache.layers[0].keys.clone()
    transformers_compat.pad_cache_layer(cache, 0, 2)
    contract(
        cache.get_seq_length() == 5 and cache.get_seq_length(1) == 3,
        "DynamicLayer.keys/values or get_seq_length (the length must follow the keys tensor)",
        "pad_cache_layer",
    )
    same = torch.equal(cache.layers[0].keys[:, :, 2:], keys)
    contract(same, "DynamicLayer.keys layout (B, H, S, D)", "pad_cache_layer")
    cache.update(torch.ones(1, keys.shape[1], 1, keys.shape[3]), torch.ones(1, keys.shape[1], 1, keys.shape[3]), 0)
    contract(cache.get_seq_length() == 6, "DynamicLayer.update (appends on the sequence axis)", "pad_cache_layer")
    static = StaticCache(config=model.config.text_config, max_cache_len=8)
    assert not transformers_compat.is_dynamic_cache(static)
    assert transformers_compat.is_dynamic_cache(DynamicCache())
