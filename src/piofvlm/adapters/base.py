"""The contract between the shared pruning mechanism and one model family.

An adapter is the only place that knows a family's module tree (where the decoder layers, final norm, LM head and
rotary embedding live), where the visual tokens are in each sample, and how positions are gathered or renumbered
after tokens are dropped. Methods and the mechanism never look at ``config.model_type`` themselves.

:class:`ModelAdapter` composes one class per concern (:mod:`piofvlm.adapters.contract`): the module tree, the
visual tokens, positions, per-layer-type masks, hybrid stacks, fast-proxy support, the vision tower and overlays,
and checks; the mechanism's hooks call :meth:`ModelAdapter.attach`. A family overrides members by name; small
reusable facts live in :mod:`piofvlm.adapters.parts`, common-layout families are data (:mod:`piofvlm.adapters.facts`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from piofvlm.adapters.contract.checks import SUPPORTED_ATTENTION, Checks, check_supported_attention
from piofvlm.adapters.contract.hybrid import HybridStack
from piofvlm.adapters.contract.layer_types import LayerTypeMasks
from piofvlm.adapters.contract.positions import Positions
from piofvlm.adapters.contract.proxy import LLAMA_STYLE_TEXT_MODELS, FastProxySupport, llama_layer_output
from piofvlm.adapters.contract.tokens import VisualTokens, items_in_prompt_order, prompt_items
from piofvlm.adapters.contract.tree import ModuleTree
from piofvlm.adapters.contract.vision import Overlays, VisionTower

if TYPE_CHECKING:
    from piofvlm.core.handle import PruningHandle

__all__ = [
    "LLAMA_STYLE_TEXT_MODELS",
    "SUPPORTED_ATTENTION",
    "ModelAdapter",
    "check_supported_attention",
    "items_in_prompt_order",
    "llama_layer_output",
    "prompt_items",
]


class ModelAdapter(
    ModuleTree, VisualTokens, Positions, LayerTypeMasks, HybridStack, FastProxySupport, VisionTower, Overlays, Checks
):
    """Knows one model family (keyed by ``config.model_type``).

    Subclasses set :attr:`model_types` and override what differs from the common layout (each member is documented
    in its concern's module under :mod:`piofvlm.adapters.contract`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ------------------------------------------------------------------------------------------------ hooks
    def attach(self, handle: PruningHandle) -> None:
        """Called once the mechanism's hooks are in place, before the method's own ``attach``.

        For family-specific inputs that must follow the rebuilt sequence (e.g. Qwen3-VL's deepstack features); extra
        hooks go through ``handle.add_hook``. Default: nothing.
        """
