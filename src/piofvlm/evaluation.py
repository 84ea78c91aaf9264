"""Accuracy retention of methods x budgets on the testbed (``piofvlm eval``)."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

import piofvlm
from piofvlm.registry import get_method

logger = logging.getLogger(__name__)


@dataclass
class Entry:
    """One row of the table: a method with one budget."""

    label: str
    method_name: str
    keep: float | int | None
    fields: dict[str, Any]

    def build(self) -> Any:
        fields = dict(self.fields)
        if self.method_name == "chain":
            # The row's budget and prune points are the LLM stage's; the encoder part comes from --set encoder=...
            llm = fields.pop("llm", None) or {"method": "pio"}
            if not isinstance(llm, dict):
                raise ValueError(f"chain llm must be a dict with a 'method' key here, got {llm!r}")
            fields["llm"] = {
                **llm,
                "keep": self.keep,
                **({"layers": fields.pop("layers")} if "layers" in fields else {}),
            }
        elif self.method_name != "none":
            fields["keep"] = self.keep
        return get_method(self.method_name, **fields)


def build_entries(
    methods: Sequence[str], keeps: Sequence[float | int], layers: Sequence[int], fields: dict[str, Any]
) -> list[Entry]:
    """``none`` once, every other method once per budget; each entry is validated by building it."""
    entries = []
    for name in methods:
        if name == "none":
            entries.append(Entry("none", "none", None, {}))
            continue
        for keep in keeps:
            entry = Entry(f"{name}@{keep}", name, keep, {"layers": list(layers), **fields})
            entry.build()
            entries.append(entry)
    return entries


def evaluate(
    model: torch.nn.Module,
    processor: Any,
    samples: Sequence[dict[str, Any]],
    entries: Sequence[Entry],
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Accuracy per task and overall for every entry (greedy answers, exact match of the first word)."""
    from piofvlm.testbed.model import generate_answers, score

    rows = []
    bar = tqdm(total=len(entries) * len(samples), disable=not progress, desc="eval", unit="sample")
    for entry in entries:
        method = entry.build()
        answers: list[str] = []
        start = time.perf_counter()
        with method(model):
            for i in range(0, len(samples), batch_size):
                chunk = samples[i : i + batch_size]
                answers += generate_answers(model, processor, chunk, batch_size=batch_size)
                bar.update(len(chunk))
        rows.append(
            {
                "label": entry.label,
                "method": method.to_dict(),
                "keep": entry.keep,
                "accuracy": score(samples, answers),
                "seconds": time.perf_counter() - start,
            }
        )
    bar.close()
    full = next((row["accuracy"] for row in rows if row["label"] == "none"), None)
    for row in rows:
        row["retention"] = (
            {task: (acc / full[task] if full[task] else float("nan")) for task, acc in row["accuracy"].items()}
            if full
            else None
        )
    return rows


def run_info() -> dict[str, Any]:
    """Versions, machine and git commit, stored with every result."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "piofvlm": piofvlm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "processor": platform.processor(),
        "git_commit": commit,
    }


def markdown_table(rows: Sequence[dict[str, Any]], chance: dict[str, float]) -> str:
    """Accuracy (and % of the unpruned model) per task and overall."""
    tasks = [t for t in rows[0]["accuracy"] if t != "all"] + ["all"]
    header = "| method | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks) + "\n"
    lines = []
    for row in rows:
        cells = []
        for task in tasks:
            cell = f"{100 * row['accuracy'][task]:.1f}"
            if row["retention"] and row["label"] != "none":
                cell += f" ({100 * row['retention'][task]:.0f}%)"
            cells.append(cell)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    chance_cells = [f"{100 * chance.get(task, float('nan')):.1f}" for task in tasks]
    lines.append("| chance | " + " | ".join(chance_cells) + " |")
    return header + "\n".join(lines) + "\n"


def plot_title(rows: Sequence[dict[str, Any]], config: dict[str, Any] | None) -> str:
    """What an accuracy plot was measured on: samples, split, prune layer(s) (from the rows' methods)."""
    layers = sorted({str(row["method"].get("layers")) for row in rows if row["label"] != "none"})
    parts = ["testbed"]
    if config is not None:
        parts.append(f"{config.get('split', '?')} split, {config.get('num_samples', '?')} samples")
    if layers:
        parts.append(f"pruned after layer(s) {', '.join(layers)}")
    return ", ".join(parts)


def plot(
    rows: Sequence[dict[str, Any]],
    path: Path,
    chance: dict[str, float] | None = None,
    config: dict[str, Any] | None = None,
) -> bool:
    """Accuracy vs kept fraction per method (needs matplotlib: ``pip install piofvlm[plot]``), titled with the
    sample count, split and prune layer(s), with the chance line when ``chance`` is given."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written (pip install 'piofvlm[plot]')")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row["label"] == "none":
            ax.axhline(100 * row["accuracy"]["all"], color="black", linestyle="--", label="none (all tokens)")
        elif isinstance(row["keep"], float):
            by_method.setdefault(row["method"]["method"], []).append((row["keep"], 100 * row["accuracy"]["all"]))
    for name, points in sorted(by_method.items()):
        points.sort()
        ax.plot([100 * p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    if chance is not None and "all" in chance:
        ax.axhline(100 * chance["all"], color="grey", linestyle=":", label=f"chance ({100 * chance['all']:.1f}%)")
    ax.set_title(plot_title(rows, config), fontsize=9)
    ax.set_xlabel("visual tokens kept per stage (%)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(out: Path, config: dict[str, Any], rows: list[dict[str, Any]], chance: dict[str, float]) -> dict:
    """``results.json``, ``results.md`` and ``accuracy.png`` in ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, chance)
    (out / "results.md").write_text(table)
    payload = {"config": config, "run": run_info(), "chance": chance, "rows": rows}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    paths = {"json": out / "results.json", "table": out / "results.md"}
    if plot(rows, out / "accuracy.png", chance=chance, config=config):
        paths["plot"] = out / "accuracy.png"
    return paths
