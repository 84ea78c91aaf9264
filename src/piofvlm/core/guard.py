"""Hooks that refuse to be copied: a module carrying a piofvlm method refuses ``copy.deepcopy`` and pickling."""

from __future__ import annotations

from typing import Any

COPY_REFUSED = (
    "a model (or module) carrying a piofvlm method cannot be deep-copied or pickled: the copy would carry the "
    "method's hooks. Copy or save it before applying the method or after removing it (leave the `with` block or call "
    "handle.remove()); model.save_pretrained(dir) and torch.save(model.state_dict()) work at any time"
)


class GuardedHook:
    """A hook function that refuses to be deep-copied or pickled (with the module it is registered on).

    ``copy.deepcopy(model)`` would otherwise give the copy hooks bound to this handle that no API removes, and
    ``torch.save(model)`` would fail on a local function with an unhelpful message. Every hook piofvlm registers is
    wrapped in this class (see :func:`guarded`)."""

    __slots__ = ("function",)

    def __init__(self, function: Any) -> None:
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> GuardedHook:
        raise RuntimeError(COPY_REFUSED)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise RuntimeError(COPY_REFUSED)


def guarded(function: Any) -> GuardedHook:
    """Wrap a hook so that the module it is registered on refuses ``copy.deepcopy`` and pickling (``torch.save``)."""
    return GuardedHook(function)
