"""Budgets: what a ``keep`` value counts, per-stage schedules, and the paper's average-retention accounting.

A stage's ``keep`` is either

* a ratio (``float`` in ``(0, 1]``) of the visual tokens each budget group had *before any pruning*, rounded to the
  nearest integer and at least 1; or
* a count (``int >= 1``) of visual tokens each group keeps.

A budget group is one image or one video (``budget_scope="image"``, the default), all visual tokens of a sample
(``budget_scope="sample"``), or per sample all its image tokens and, separately, all its video tokens
(``budget_scope="modality"``). Visual tokens are all the image placeholder tokens of the prompt, so for LLaVA-NeXT an
image's count includes its base view, its high-resolution tiles and its ``image_newline`` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Keep = float | int


def is_ratio(keep: Keep) -> bool:
    return isinstance(keep, float)


def validate_schedule(layers: Sequence[int], keep: Sequence[Keep]) -> None:
    """Raise ``ValueError`` (quoting the bad value) unless ``layers``/``keep`` form a valid schedule."""
    if len(layers) == 0:
        raise ValueError("layers must name at least one prune point, got []")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layers must be integers >= 0 (prune after that many decoder layers), got {layer!r}")
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"layers must be strictly increasing, got {list(layers)!r}")
    if len(keep) != len(layers):
        raise ValueError(f"keep needs one value per stage: {len(layers)} layers {list(layers)!r}, keep {list(keep)!r}")
    for value in keep:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"keep values are ratios (float in (0, 1]) or counts (int >= 1), got {value!r}")
        if is_ratio(value) and not 0.0 < value <= 1.0:
            raise ValueError(f"a keep ratio must be in (0, 1], got {value!r} (use an int for a token count)")
        if not is_ratio(value) and value < 1:
            raise ValueError(f"a keep count must be >= 1, got {value!r}")
    if len({is_ratio(v) for v in keep}) > 1:
        raise ValueError(f"keep must be all ratios or all counts, got {list(keep)!r}")
    if any(later > earlier for earlier, later in zip(keep[:-1], keep[1:], strict=True)):
        raise ValueError(f"keep must not grow from one stage to the next, got {list(keep)!r}")


def ratio_to_count(ratio: float, total: torch.Tensor) -> torch.Tensor:
    """Round ``ratio * total`` half up, at least 1 where ``total > 0``."""
    count = torch.floor(total.double() * ratio + 0.5).long()
    return torch.where(total > 0, count.clamp(min=1), 0)


def stage_budget(keep: Keep, original_counts: torch.Tensor) -> torch.Tensor:
    """Tokens to keep per group at a stage: ``(B, G)`` from the groups' original sizes ``(B, G)``.

    Raises ``ValueError`` if a count is larger than a group's visual tokens.
    """
    if is_ratio(keep):
        return ratio_to_count(float(keep), original_counts)
    exists = original_counts > 0
    too_big = exists & (original_counts < keep)
    if bool(too_big.any()):
        b, g = (int(i) for i in too_big.nonzero()[0])
        raise ValueError(
            f"keep={keep} visual tokens is more than group {g} of sample {b} has ({int(original_counts[b, g])}); "
            "use a count <= the visual tokens of every image (or budget_scope='sample'), or a ratio"
        )
    return torch.where(exists, torch.full_like(original_counts, int(keep)), 0)


def average_retention(layers: Sequence[int], keep_ratios: Sequence[float], num_layers: int) -> float:
    """Mean fraction of visual tokens over all decoder layers (the paper's "11.1%" accounting, spec A.2).

    Layers before ``layers[0]`` see every visual token; layers from ``layers[s]`` on see ``keep_ratios[s]``.
    """
    bounds = [*layers, num_layers]
    total = float(layers[0])
    for stage, ratio in enumerate(keep_ratios):
        total += (bounds[stage + 1] - bounds[stage]) * ratio
    return total / num_layers


def schedule_for_average_retention(
    target: float, layers: Sequence[int], num_layers: int, decay: float = 0.5
) -> list[float]:
    """Per-stage keep ratios whose :func:`average_retention` equals ``target``.

    Stage ``s`` keeps ``c * decay**s``; ``c`` is solved for. For example, on a 32-layer model
    ``schedule_for_average_retention(0.111, [2], 32)`` gives ``[0.0518...]``: the two first layers see all tokens.

    Raises ``ValueError`` if the target cannot be reached (it must exceed ``layers[0] / num_layers``, and the first
    stage may not keep more than everything).
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target average retention must be in (0, 1], got {target!r}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay!r}")
    validate_schedule(layers, [1.0] * len(layers))
    if layers[-1] >= num_layers:
        raise ValueError(f"prune points must be < num_layers={num_layers}, got layers={list(layers)!r}")
    bounds = [*layers, num_layers]
    weight = sum((bounds[s + 1] - bounds[s]) * decay**s for s in range(len(layers)))
    scale = (target * num_layers - layers[0]) / weight
    if scale <= 0:
        raise ValueError(
            f"target {target} is unreachable: the {layers[0]} layers before the first prune point alone give "
            f"{layers[0] / num_layers:.4f}; prune earlier or aim higher"
        )
    if scale > 1.0:
        raise ValueError(f"target {target} needs the first stage to keep {scale:.3f} > 1 of the tokens; aim lower")
    ratios = [scale * decay**s for s in range(len(layers))]
    if not math.isclose(average_retention(layers, ratios, num_layers), target, rel_tol=1e-9):
        raise AssertionError("schedule solver is inconsistent")  # pragma: no cover - arithmetic guard
    return ratios
