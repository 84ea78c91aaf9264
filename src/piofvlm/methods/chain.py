"""Chaining an encoder-side method with an in-LLM method: PIO-FVLM's "encoder-involved" mode (w/ VE).

PIO-FVLM (arXiv 2602.04657) reports results with the vision encoder compressing first (the authors' code uses
VScan's encoder stage) and PIO pruning again inside the LLM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from piofvlm.budget import Keep
from piofvlm.core.context import Selection, StageContext
from piofvlm.core.handle import PruningHandle
from piofvlm.methods.base import TokenPruner
from piofvlm.registry import register_method


def _build(value: Any, role: str) -> TokenPruner:
    if isinstance(value, dict):
        from piofvlm.registry import get_method

        fields = dict(value)
        if "method" not in fields:
            raise ValueError(f"chain {role}: a dict needs a 'method' key, got {value!r}")
        value = get_method(fields.pop("method"), **fields)
    if not isinstance(value, TokenPruner):
        raise ValueError(f"chain {role} must be a TokenPruner (or a dict with 'method'), got {value!r}")
    return value


@register_method
@dataclass
class Chain(TokenPruner):
    """Run ``encoder``'s stages, then ``llm``'s, as one method with one set of hooks.

    ``layers`` and ``keep`` are derived (``encoder.layers + llm.layers``, ``encoder.keep + llm.keep``); every keep
    ratio counts the *original* visual tokens, so the LLaVA-1.5 w/ VE 64-token setting is ``encoder`` keeping 96 and
    ``llm`` keeping 32 after layer 16. ``positions`` and ``budget_scope`` of the chain apply to every stage (those of
    the parts must agree on ``budget_scope``). The parts keep their own hyperparameters; they see stage numbers
    counted within themselves.

    Example:
        >>> Chain(encoder=VScan(keep=96), llm=PIO(layers=[16], keep=32), positions="renumber")
    """

    name: ClassVar[str] = "chain"

    layers: list[int] | None = None  # derived from the parts; if given, it must equal the derived value
    keep: list[Keep] | Keep | None = None  # likewise
    encoder: Any = None
    llm: Any = None

    def __post_init__(self) -> None:
        self.encoder = _build(self.encoder, "encoder")
        self.llm = _build(self.llm, "llm")
        given = {"layers": self.layers, "keep": self.keep}
        if self.encoder.budget_scope != self.llm.budget_scope:
            raise ValueError(
                f"chain parts must count budgets the same way: encoder budget_scope={self.encoder.budget_scope!r}, "
                f"llm budget_scope={self.llm.budget_scope!r}"
            )
        if self.encoder.layers[-1] >= self.llm.layers[0]:
            raise ValueError(
                f"the encoder part's prune points {self.encoder.layers} must come before the llm part's "
                f"{self.llm.layers}"
            )
        self.layers = [*self.encoder.layers, *self.llm.layers]
        self.keep = [*self.encoder.keep, *self.llm.keep]
        for key, value in given.items():
            derived = getattr(self, key)
            if value is not None and (list(value) if isinstance(value, (list, tuple)) else [value]) != derived:
                raise ValueError(
                    f"chain {key}={value!r} disagrees with its parts ({key}={derived!r}): a chain's layers and keep "
                    f"come from encoder and llm; set them there, e.g. llm={{'method': 'pio', 'layers': [2], "
                    f"'keep': 0.111}}"
                )
        self.budget_scope = self.encoder.budget_scope
        super().__post_init__()

    def _part(self, stage: int) -> tuple[TokenPruner, int]:
        first = len(self.encoder.layers)
        return (self.encoder, stage) if stage < first else (self.llm, stage - first)

    def check_model(self, adapter: Any) -> None:
        super().check_model(adapter)
        self.encoder.check_model(adapter)
        self.llm.check_model(adapter)

    def attach(self, handle: PruningHandle) -> None:
        self.encoder.attach(handle)
        self.llm.attach(handle)

    def select(self, ctx: StageContext) -> Selection:
        part, stage = self._part(ctx.stage)
        return part.select(dataclasses.replace(ctx, stage=stage))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "encoder": self.encoder.to_dict(),
            "llm": self.llm.to_dict(),
            "positions": self.positions,
            "budget_scope": self.budget_scope,
        }
