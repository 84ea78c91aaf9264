"""What a family refuses: attention implementations whose masks cannot be rebuilt, methods it cannot run."""

from __future__ import annotations

from typing import Any

#: Attention implementations whose masks the mechanism can rebuild after tokens are dropped.
SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


def check_supported_attention(impl: str) -> None:
    """Raise a ``ValueError`` unless the mechanism can rebuild masks for attention implementation ``impl``."""
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {impl!r} is not supported: after tokens are dropped the mechanism rebuilds "
            f"the attention mask, which it can do for {', '.join(SUPPORTED_ATTENTION)}. Load the model with "
            "attn_implementation='sdpa' (or one of those)."
        )


class Checks:
    """Refusals at ``apply`` (:meth:`check_method`) and at each call (:meth:`check_attention`)."""

    def check_method(self, method: Any) -> None:
        """Raise a ``ValueError`` naming the method and the family if ``method`` (a configured ``TokenPruner``)
        cannot run on this family. Default: every method may (its own checks still apply)."""

    def check_attention(self) -> None:
        """Raise a ``ValueError`` if the model's attention implementation (or another setting) cannot be pruned.
        Default: the implementation must be one of :data:`SUPPORTED_ATTENTION`."""
        check_supported_attention(self.attn_implementation)  # type: ignore[attr-defined]
