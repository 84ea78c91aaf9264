"""Base classes of every method: a dataclass of hyperparameters that hooks onto a model instance."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from piofvlm.adapters import get_adapter
from piofvlm.budget import Keep, stage_budget, validate_schedule
from piofvlm.core.context import Selection, StageContext, StageRecord
from piofvlm.core.handle import PruningHandle
from piofvlm.methods.shared.selection import topk_per_group

BUDGET_SCOPES = ("image", "sample", "modality")
POSITION_MODES = ("keep", "renumber")
#: Field annotations checked (and numpy scalars converted) for every method, before its own ``__post_init__`` checks.
_SIMPLE_TYPES = {"bool": bool, "int": int, "float": float, "str": str}
_SELECTIONS_LOCK = threading.Lock()  # guards every method's per-thread record of its last selection


def plain_number(value: Any) -> Any:
    """A numpy scalar (``np.int64(5)``, ``np.float32(0.5)``, ``np.bool_``) as the Python value; anything else as is."""
    if isinstance(value, np.generic) and isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return value


def check_field_types(method: Any) -> None:
    """Raise ``ValueError`` (quoting the value) for a field annotated ``bool``/``int``/``float``/``str`` (or one of
    those ``| None``) whose value is not of that type; numpy scalars are converted, an int is accepted as a float.

    Without this, ``nms="no"`` would be truthy and run NMS, ``seed="a"`` would fail only at the first call."""
    for f in dataclasses.fields(method):
        annotation = str(f.type).replace(" ", "")
        optional = annotation.endswith("|None")
        expected = _SIMPLE_TYPES.get(annotation.removesuffix("|None"))
        if expected is None:
            continue
        value = plain_number(getattr(method, f.name))
        if value is None and optional:
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
        if not ok:
            what = {bool: "True or False", int: "an int", float: "a number", str: "a string"}[expected]
            raise ValueError(
                f"{type(method).__name__}.{f.name} must be {what}{' or None' if optional else ''}, got {value!r}"
            )
        setattr(method, f.name, value)


class Method:
    """Anything that can be applied to a model: ``with method(model): ...`` or ``method.apply(model)``."""

    name: ClassVar[str] = ""

    def apply(self, model: nn.Module, *, compile_prefill: bool | dict[str, Any] = False) -> Any:  # pragma: no cover
        raise NotImplementedError

    @contextmanager
    def __call__(self, model: nn.Module, *, compile_prefill: bool | dict[str, Any] = False) -> Iterator[Any]:
        """Hooks on ``model`` for the duration of the ``with`` block; removed even if the block raises.
        ``compile_prefill``: see :meth:`TokenPruner.apply`."""
        handle = self.apply(model, compile_prefill=compile_prefill)
        try:
            yield handle
        finally:
            handle.remove()

    @property
    def last_selection(self) -> list[StageRecord]:
        """Per stage, what the last prefill made by the calling thread kept (see
        :class:`~piofvlm.core.context.StageRecord`); each thread sees its own last call (``docs/threads.md``)."""
        return self.__dict__.get("_selections", {}).get(threading.get_ident(), [])

    def remember_selection(self, records: list[StageRecord]) -> None:
        """Make ``records`` the calling thread's :attr:`last_selection` (called by the pruning handle at each
        prefill; the list is filled as the stages run). Entries of threads that have ended are dropped."""
        with _SELECTIONS_LOCK:
            selections = dict(self.__dict__.get("_selections", {}))
            if len(selections) > 8:
                alive = {thread.ident for thread in threading.enumerate()}
                selections = {ident: value for ident, value in selections.items() if ident in alive}
            selections[threading.get_ident()] = records
            self.__dict__["_selections"] = selections  # replaced, not mutated: readers never see it change

    def __setattr__(self, name: str, value: Any) -> None:
        """Hyperparameters (the dataclass fields) are read-only while the method is applied to a model: the hooks
        were set up from them (a new ``layers`` would be silently ignored while ``to_dict()`` reported it)."""
        if not name.startswith("_") and name in getattr(self, "__dataclass_fields__", {}) and self._is_applied():
            raise AttributeError(
                f"{type(self).__name__}.{name} cannot change while the method is applied to a model: remove it "
                f"(leave the `with` block or call handle.remove()), then change it and apply again, or apply "
                f"dataclasses.replace(method, {name}=...)"
            )
        super().__setattr__(name, value)

    def _is_applied(self) -> bool:
        from piofvlm.core.handle import _ACTIVE

        return any(handle.method is self for handle in list(_ACTIVE.values()))

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
        check_field_types(self)
        self.layers = plain_number(self.layers)
        self.keep = plain_number(self.keep)
        if isinstance(self.layers, (list, tuple)):
            self.layers = [plain_number(layer) for layer in self.layers]
        if isinstance(self.keep, (list, tuple)):
            self.keep = [plain_number(value) for value in self.keep]
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
        for index in self.attention_layers():
            adapter.check_attention_map(index, self.name)
        adapter.check_method(self)

    def attention_layers(self) -> list[int]:
        """Decoder layers whose attention map (queries and keys) this method reads; checked against the model (a
        hybrid stack's linear-attention layers have none). Default: none."""
        return []

    # Capabilities: what an adapter may ask of a method instead of naming it (``ModelAdapter.check_method``).
    @property
    def reads_attention(self) -> bool:
        """Whether this method recomputes a decoder layer's attention (queries x keys) from the layer's weights
        (``attention_layers()`` is not empty): a family whose attention is not modelled refuses it."""
        return bool(self.attention_layers())

    @property
    def runs_previous_layer(self) -> bool:
        """Whether this method runs, on its own, a decoder layer before its prune point (e.g. PIO's
        ``proxy_layer="previous"``): a family whose layers take per-layer inputs gone by then refuses it."""
        return False

    def attach(self, handle: PruningHandle) -> None:
        """Called once the mechanism's hooks are in place; register extra hooks with ``handle.add_hook``.

        For methods that need more than the decoder's hidden states (e.g. vision-tower attention). Default: nothing.
        """

    def apply(self, model: nn.Module, *, compile_prefill: bool | dict[str, Any] = False) -> PruningHandle:
        """Put this method's hooks on ``model`` (this instance only). Call ``.remove()`` on the handle to undo.

        ``compile_prefill`` (opt-in, off by default): in a pruned prefill, run the decoder layers after the first
        prune point through ``torch.compile`` (their input length is fixed by the budget: static shapes). ``True``
        compiles with inductor and ``dynamic=False``; a dict gives ``torch.compile`` options (``backend``, ``mode``,
        ``fullgraph``, ``dynamic``, ``options``), e.g. ``{"mode": "reduce-overhead"}`` for CUDA graphs on a GPU.
        Decoding, the selection and the layers before the prune point stay eager; removing the handle restores the
        layers' forwards. Each new batch size or kept length compiles once (``docs/benchmarks.md`` section 7.5b).
        """
        adapter = get_adapter(model)
        self.check_model(adapter)
        return PruningHandle(self, model, adapter, on_prefill=self.remember_selection, compile_prefill=compile_prefill)


@dataclass
class NoReduction(Method):
    """The unpruned model: applying it changes nothing (the baseline row of every table)."""

    name: ClassVar[str] = "none"

    def apply(self, model: nn.Module, *, compile_prefill: bool | dict[str, Any] = False) -> _NullHandle:
        """Nothing is pruned, so nothing is compiled (``compile_prefill`` is checked, then has no effect)."""
        from piofvlm.core.compiled_prefill import compile_options

        compile_options(compile_prefill)
        get_adapter(model)  # same model-type check as real methods
        self.remember_selection([])
        return _NullHandle()


class _NullHandle:
    records: list[StageRecord] = []

    def remove(self) -> None:
        return None
