"""The adapter contract (:class:`~piofvlm.adapters.base.ModelAdapter`), one concern per module: each class here holds
the members of one concern with their defaults (the common layout), and ``ModelAdapter`` composes them.

* :mod:`.tree`: the module tree (multimodal model, language model, decoder layers, final norm, LM head, configs);
* :mod:`.tokens`: the visual tokens (ids, per-item counts, modality, prompt order);
* :mod:`.positions`: position ids and rotary tables (layouts, renumbering);
* :mod:`.layer_types`: per-layer-type masks and rotary tables, per-token layer inputs;
* :mod:`.hybrid`: hybrid stacks (linear-attention layers, KV-shared layers);
* :mod:`.proxy`: what the fast PIO proxy and the explicit-attention methods recompute of a decoder layer;
* :mod:`.vision`: the vision tower (encoder-side methods) and overlays (token boxes);
* :mod:`.checks`: what a family refuses (attention implementations, methods).

Adapters override members by their names (unchanged); a concern's default never calls another concern's override
through a parent class by name.
"""
