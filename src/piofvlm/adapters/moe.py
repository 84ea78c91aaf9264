"""The mixture-of-experts flagships of supported families: Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``:
Qwen3-VL-30B-A3B, 235B-A22B), Qwen3.5-MoE (``Qwen3_5MoeForConditionalGeneration``) and GLM-4.5V
(``Glm4vMoeForConditionalGeneration``).

Each runs its dense sibling's multimodal mechanism unchanged (read from transformers 5.24: the same
``get_rope_index``, placeholder masks, deepstack for Qwen3-VL-MoE, hybrid Gated DeltaNet / gated attention layers for
Qwen3.5-MoE, ``mm_token_type_ids`` for GLM's videos); only the decoder layers' feed-forward differs: ``layer.mlp`` is
a sparse MoE block (a router picking ``num_experts_per_tok`` experts per token, plus shared experts for Qwen3.5-MoE
(sigmoid-gated) and GLM-4.5V; GLM-4.5V's first ``first_k_dense_replace`` layers stay dense). So each adapter
subclasses its sibling's and names the MoE modeling module's own rotary function. What the MoE block means for
pruning:

These stay code, not data entries of ``adapters/facts.py``: their siblings are not the common layout (M-RoPE, hybrid
stacks, sandwich norms), and each one differs from its sibling only by the module its rotary function comes from
(and GLM-4.5V's Llama layer tail, ``llama_layer_output``), a three-line subclass.

* **Routing is per token.** Router and experts act on each row alone (no capacity limit, no token dropping in
  transformers' implementations), so a kept token is routed exactly as it would be in a no-cache forward of the kept
  sequence: cached decode == no-cache forward, batch == single hold as for the dense siblings.
* **PIO's proxy through an MoE layer is exact.** The fast proxy (closed form or autograd) calls ``layer.mlp`` on the
  loss rows only; a per-token MoE block at those rows (router logits, top-k, the chosen experts' weighted sum, shared
  experts) equals the block on the whole sequence taken at those rows, and its gradient flows through the routing
  weights and the chosen experts as autograd does in the reference (whole-layer) forward. Tested against the
  reference path and an independent autograd computation (``tests/test_moe.py``).
* **GLM-4.5V's decoder layer is Llama's pre-norm block**, not GLM-4.1V's sandwich norms
  (``Glm4vMoeTextDecoderLayer`` has no ``post_self_attn_layernorm`` / ``post_mlp_layernorm``), and its attention
  rotates the first ``rotary_dim`` dims in Llama's halves (``rotate_half``), not GLM-4.1V's interleaved pairs.
* ``output_router_logits=True`` (the auxiliary load-balancing loss with ``labels=``) is untested with pruning: after
  a prune point the layers route fewer tokens than the attention mask the loss reads has.
"""

from __future__ import annotations

import torch
from torch import nn

from piofvlm import transformers_compat
from piofvlm.adapters.base import llama_layer_output
from piofvlm.adapters.glm4v import Glm4vAdapter
from piofvlm.adapters.qwen3_5 import Qwen3_5Adapter
from piofvlm.adapters.qwen_vl import Qwen3VLAdapter
from piofvlm.adapters.registry import register_adapter


@register_adapter
class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: Qwen3-VL's mechanism (interleaved M-RoPE, q/k norms, deepstack) with sparse MoE feed-forwards."""

    model_types = ("qwen3_vl_moe",)

    def rotary_fn(self):  # noqa: D102 - documented in the base class
        return transformers_compat.rotary_function("qwen3_vl_moe")


@register_adapter
class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """Qwen3.5-MoE: Qwen3.5's hybrid linear / gated full-attention decoder with an MoE block (and a sigmoid-gated
    shared expert) in every layer."""

    model_types = ("qwen3_5_moe",)

    def rotary_fn(self):  # noqa: D102 - documented in the base class
        return transformers_compat.rotary_function("qwen3_5_moe")


@register_adapter
class Glm4vMoeAdapter(Glm4vAdapter):
    """GLM-4.5V: GLM-4.1V's multimodal mechanism on a pre-norm decoder with MoE feed-forwards."""

    model_types = ("glm4v_moe",)

    def rotary_fn(self):  # noqa: D102 - documented in the base class
        return transformers_compat.rotary_function("glm4v_moe")

    def decoder_layer_output(self, layer: nn.Module, hidden: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        """``Glm4vMoeTextDecoderLayer`` is Llama's pre-norm block (no sandwich norms)."""
        return llama_layer_output(layer, hidden, attn_output)
