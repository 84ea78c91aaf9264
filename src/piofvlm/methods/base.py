"""Base classes of every method: a dataclass of hyperparameters that hooks onto a model instance."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from piofvlm.adapters import get_adapter
from piofvlm.budget import Keep, stage_budget, validate_schedule
from piofvlm.core.context import Selection, StageContext, StageRecord
from piofvlm.core.selection import topk_per_group
from piofvlm.core.session import PruningHandle

BUDGET_SCOPES = ("image", "sample", "modality")
POSITION_MODES = ("keep", "renumber")


class Method:
    """Anything that can be applied to a model: ``with method(model): ...`` or ``method.apply(model)``."""

    name: ClassVar[str] = ""

    def apply(self, model: nn.Module) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[Any]:
        """Hooks on ``model`` for the duration of the ``with`` block; removed even if the block raises."""
        handle = self.apply(model)
        try:
            yield handle
        finally:
            handle.remove()

    @property
    def last_selection(self) -> list[StageRecord]:
        """Per stage, what the last prefill kept (see :class:`~piofvlm.core.context.StageRecord`)."""
        return getattr(self, "_last_selection", [])

    def to_dict(self) -> dict[str, Any]:
        """Hyperparameters (and the method name) as plain data."""
        return {"method": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]


@dataclass
class TokenPruner(Method):
    """A method that drops visual tokens inside the language model, at one or more prune points.

    Subclasses implement :meth:`score` (higher = keep) or override :meth:`select`.

    Attributes:
        layers: prune points: stage ``s`` runs after ``layers[s]`` decoder layers (0 = before the first layer).
        keep: per stage, a ratio (float in (0, 1]) of each budget group's original visual tokens, or a count (int).
            A single value is allowed with a single prune point. See :mod:`piofvlm.budget`.
        budget_scope: ``"image"``: each image, and each video (all its frames), keeps its own budget;
            ``"sample"``: one budget over all visual tokens of a sample, images and videos together (a count is then
            per sample, a ratio of the sample's visual tokens); ``"modality"``: per sample, one budget over its
            images and a separate one over its videos (a count is then per sample and modality).
        positions: ``"keep"``: kept tokens keep their original RoPE positions and decoding continues at the
            unpruned length; ``"renumber"``: positions are compacted after each stage and decoding is shifted by the
            number of dropped tokens (the authors' LLaVA behaviour).
    """

    layers: list[int] = field(default_factory=lambda: [2])
    keep: list[Keep] | Keep = 0.111
    budget_scope: str = "image"
    positions: str = "keep"

    def __post_init__(self) -> None:
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
        if not isinstance(self.layers, (list, tuple)):
            raise ValueError(f"layers must be an int or a list of ints, got {self.layers!r}")
        self.layers = list(self.layers)
        if not self.layers:
            raise ValueError("layers must name at least one prune point, got []")
        if isinstance(self.keep, (int, float)) and not isinstance(self.keep, bool):
            if len(self.layers) != 1:
                raise ValueError(
                    f"keep={self.keep!r} is a single value but layers={self.layers!r} has {len(self.layers)} "
                    "prune points; give one keep value per stage"
                )
            self.keep = [self.keep]
        if not isinstance(self.keep, (list, tuple)):
            raise ValueError(
                f"keep must be a ratio (float in (0, 1]), a count (int >= 1) or a list of them, got {self.keep!r}"
            )
        self.keep = list(self.keep)
        validate_schedule(self.layers, self.keep)
        if self.budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"budget_scope must be one of {BUDGET_SCOPES}, got {self.budget_scope!r}")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")

    # -------------------------------------------------------------------------------------------- selection
    def stage_budgets(self, stage: int, original_counts: torch.Tensor) -> torch.Tensor:
        """``(B, G)`` tokens to keep per group at ``stage``, from the groups' original visual-token counts."""
        return stage_budget(self.keep[stage], original_counts)

    def score(self, ctx: StageContext) -> torch.Tensor:
        """``(B, S)`` importance of each slot (only visual slots are read). Higher is kept first."""
        raise NotImplementedError(f"{type(self).__name__} must implement score() or select()")

    def select(self, ctx: StageContext) -> Selection:
        """Keep the top ``budgets`` visual tokens of each group by :meth:`score`."""
        scores = self.score(ctx)
        return Selection(keep=topk_per_group(scores, ctx.groups, ctx.budgets), scores=scores)

    # ----------------------------------------------------------------------------------------------- apply
    def check_model(self, adapter: Any) -> None:
        """Raise ``ValueError`` if this configuration cannot run on the adapted model."""
        adapter.check_attention()
        if self.layers[-1] >= adapter.num_layers:
            raise ValueError(
                f"layers={self.layers!r}: a prune point must be < the number of decoder layers ({adapter.num_layers})"
            )
        if self.positions == "renumber" and not adapter.supports_renumber:
            raise ValueError(f"positions='renumber' is not defined for {adapter.model_type} models; use 'keep'")

    def attach(self, handle: PruningHandle) -> None:
        """Called once the mechanism's hooks are in place; register extra hooks with ``handle.add_hook``.

        For methods that need more than the decoder's hidden states (e.g. vision-tower attention). Default: nothing.
        """

    def apply(self, model: nn.Module) -> PruningHandle:
        """Put this method's hooks on ``model`` (this instance only). Call ``.remove()`` on the handle to undo."""
        adapter = get_adapter(model)
        self.check_model(adapter)
        return PruningHandle(self, model, adapter)


@dataclass
class NoReduction(Method):
    """The unpruned model: applying it changes nothing (the baseline row of every table)."""

    name: ClassVar[str] = "none"

    def apply(self, model: nn.Module) -> _NullHandle:
        get_adapter(model)  # same model-type check as real methods
        self._last_selection = []
        return _NullHandle()


class _NullHandle:
    records: list[StageRecord] = []

    def remove(self) -> None:
        return None
