"""Methods by name."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

M = TypeVar("M", bound=type)

METHODS: dict[str, type] = {}


def register_method(cls: M) -> M:
    """Class decorator: register a method dataclass under its ``name`` (lowercase, unique)."""
    name = getattr(cls, "name", "")
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"a method name must be a non-empty lowercase identifier, got {name!r} for {cls.__name__}")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({METHODS[name].__name__})")
    METHODS[name] = cls
    return cls


def _load_builtin_methods() -> None:
    """Import :mod:`piofvlm.methods` (registers the built-in methods): ``import piofvlm`` no longer does it eagerly."""
    import piofvlm.methods  # noqa: F401


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    _load_builtin_methods()
    return sorted(METHODS)


def method_class(name: str) -> type:
    """The class registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    _load_builtin_methods()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}")
    return METHODS[name]


def method_fields(cls: type) -> set[str]:
    """Names of a method class's hyperparameters (its dataclass fields)."""
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def get_method(name: str, **fields: Any) -> Any:
    """Build the method registered as ``name`` with the given hyperparameters.

    Raises:
        ValueError: unknown name (the message lists the valid ones), or unknown / invalid hyperparameters.
    """
    cls = method_class(name)
    known = method_fields(cls)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for method {name!r}; "
            f"its fields are: {', '.join(sorted(known)) or '(none)'}"
        )
    return cls(**fields)
