"""Tiny random models built from configs (nothing downloaded), for the tests, ``piofvlm doctor`` and ``piofvlm show``.

* :mod:`~piofvlm.tiny.llava` - the tiny LLaVA-1.5 (word-level tokenizer, processor; ``piofvlm demo``'s fallback);
* :mod:`~piofvlm.tiny.qwen` - the tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA-OneVision models and their inputs;
* :mod:`~piofvlm.tiny.families` - every other family: ``FAMILIES`` (a builder, three standard samples, their counts);
* :mod:`~piofvlm.tiny.cases` - ``TINY_CASES``: the one registry of a tiny model + inputs per supported ``model_type``;
* :mod:`~piofvlm.tiny.pictures` - the pictures ``piofvlm show --family`` draws on.
"""
