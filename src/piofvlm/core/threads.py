"""Per-thread state of the hooks: what one call of the model owns lives with the thread making that call.

A stock transformers model may be called from several threads at once. The hooks of an applied method keep state
from one hook to the next within a call (the multimodal call's ``input_ids`` for the language model's hook, the
layout of the prefill for the decoder layers, the captures of a method); that state is per thread, so concurrent
calls never see each other's. Module forwards (and therefore their hooks) run on the calling thread.
See ``docs/threads.md``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class PerThread(Generic[T]):
    """A class attribute whose value, per instance, belongs to the calling thread.

    The owner sets ``self._per_thread = threading.local()`` in ``__init__``; each thread starts from
    ``default()``. Reading and writing look like plain attribute access, so ``self.hidden = {}`` in a hook
    resets only the calling thread's value.
    """

    def __init__(self, default: Callable[[], T]) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> T:
        if obj is None:
            return self  # type: ignore[return-value]
        local = obj._per_thread
        try:
            return getattr(local, self.name)
        except AttributeError:
            value = self.default()
            setattr(local, self.name, value)
            return value

    def __set__(self, obj: Any, value: T) -> None:
        setattr(obj._per_thread, self.name, value)


def new_state() -> threading.local:
    """The per-thread store an owner of :class:`PerThread` attributes keeps in ``self._per_thread``."""
    return threading.local()
