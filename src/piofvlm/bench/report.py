"""A benchmark result as markdown tables and a speedup-vs-retention plot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from piofvlm.bench import flops as fl

logger = logging.getLogger(__name__)


def _ms(summary: dict[str, float]) -> str:
    return f"{summary['median'] * 1000:.0f} [{summary['min'] * 1000:.0f}-{summary['max'] * 1000:.0f}]"


def _x(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _decode(value: float | None) -> str:
    return "n/a (below noise)" if value is None or value <= 0 else f"{value:.1f}"


def header(result: dict[str, Any]) -> str:
    """One paragraph: model, shape, device, versions, load average."""
    cfg, model, env = result["config"], result["model"], result["environment"]
    shape = model["text_shape"]
    source = cfg["preset"] or cfg["model_path"]
    depth = f"{shape['num_layers']} of {model['full_layers']} layers"
    load = result["load_average"]
    return (
        f"**{cfg['name']}**: `{source}` ({depth}, width {shape['hidden_size']}, MLP {shape['intermediate_size']}, "
        f"{shape['num_heads']}/{shape['num_kv_heads']} heads, vocab {shape['vocab_size']}), "
        f"{model['visual_tokens']} visual tokens in a {result['prompt_tokens']}-token prompt, "
        f"{cfg['dtype']}, attn {cfg['attn']}, {cfg['new_tokens']} new tokens, {cfg['repeats']} repeats "
        f"(+{cfg['warmup']} warm-up). Device: {env['device']}, {cfg['dtype']}, {_threads(env['torch_threads'])}"
        f"{_choices(env)}; torch "
        f"{env['torch']}, transformers {env['transformers']}, piofvlm {env['piofvlm']} @ "
        f"{(env['git_commit'] or '?')[:8]}{' (dirty)' if env['git_dirty'] else ''}. Load average (1/5/15 min) at "
        f"start {load['start']}, end {load['end']}.\n"
    )


def _threads(count: int) -> str:
    return f"{count} thread{'s' if count != 1 else ''}"


def _choices(env: dict[str, Any]) -> str:
    notes = [env[key] for key in ("dtype_choice", "threads_choice") if env.get(key) and env[key] != "as asked"]
    return f" ({'; '.join(notes)})" if notes else ""


def markdown(result: dict[str, Any]) -> str:
    """Timing table and FLOPs/memory table (times: median [min-max] ms)."""
    lines = [header(result), ""]
    lines.append(
        "| variant | visual kept | prefill ms | speedup | FLOP-ideal (dense / causal attn) | meas/ideal | e2e ms | "
        "e2e speedup | "
        "decode ms/tok | select ms (proxy fwd / bwd / NMS) | overhead vs unpruned prefill |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for v in result["variants"]:
        r, s = v["ratios"], v["selection_ms"]
        split = "-"
        if "select" in s:
            parts = " / ".join(f"{s[k]:.1f}" if k in s else "-" for k in ("proxy_forward", "proxy_backward", "nms"))
            split = f"{s['select']:.1f} ({parts})"
        overhead = r.get("selection_overhead_of_unpruned_prefill")
        overhead_full = r.get("selection_overhead_of_unpruned_prefill_full_depth")
        over = "-" if overhead is None else f"{_pct(overhead, 2)} (full depth ~{_pct(overhead_full, 2)})"
        lines.append(
            f"| {v['label']} | {v['kept_visual']}/{v['visual_tokens']} | {_ms(v['prefill_s'])} | "
            f"{_x(r['prefill_speedup'])} | {_x(r.get('prefill_ideal'))} / {_x(r.get('prefill_ideal_causal'))} | "
            f"{_pct(r.get('prefill_measured_over_ideal'), 0)} / "
            f"{_pct(r.get('prefill_measured_over_ideal_causal'), 0)} | "
            f"{_ms(v['e2e_s'])} | {_x(r['e2e_speedup'])} | {_decode(v.get('decode_ms_per_token'))} | {split} | "
            f"{over} |"
        )
    lines += ["", "| variant | exact prefill TFLOP (model + selection, counted) | exact ratio | paper formula ratio "
              "(this depth / full depth / + proxy layer) | KV after prefill MB | KV ratio | peak mem MB "
              "(above start) | full-depth prefill speedup (extrapolated) |"]  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|---|")
    for v in result["variants"]:
        f, r = v["flops"], v["ratios"]
        sel = "n/a" if f["selection"] is None else f"{sum(f['selection'].values()) / 1e9:.2f} G"
        total = f["prefill_total"]
        exact = "n/a" if total is None else f"{total / 1e12:.3f} ({f['prefill_model'] / 1e12:.3f} + {sel})"
        mem = v["memory"]
        lines.append(
            f"| {v['label']} | {exact} | {_x(r.get('prefill_ideal'))} | {_x(r['paper_formula_ratio'])} / "
            f"{_x(r['paper_formula_ratio_full_depth'])} / "
            f"{_x(r['paper_formula_ratio_full_depth_with_proxy_layer'])} | "
            f"{v['kv_cache_bytes']['after_prefill'] / 2**20:.1f} | {_x(r['kv_ratio'])} | "
            f"{mem['peak_bytes'] / 2**20:.0f} ({max(mem['peak_above_start_bytes'], 0) / 2**20:.0f}) | "
            f"{_x(r.get('prefill_speedup_full_depth_extrapolated'))} |"
        )
    lines.append("")
    return "\n".join(lines)


def schedule_ideal(result: dict[str, Any], layer: int, retained: float) -> float:
    """Prefill FLOP ratio of keeping ``retained`` of the visual tokens from decoder layer ``layer`` on (no selection
    cost): the FLOP-ideal line of the plot."""
    shape = fl.TextShape(**result["model"]["text_shape"])
    prompt, visual = result["prompt_tokens"], result["model"]["visual_tokens"]
    pruned = prompt - visual + round(retained * visual)
    lengths = [prompt if i < layer else pruned for i in range(shape.num_layers)]
    return fl.prefill_flops(shape, [prompt] * shape.num_layers) / fl.prefill_flops(shape, lengths)


def plot(result: dict[str, Any], path: str | Path) -> bool:
    """Prefill speedup vs retained fraction per method, measured (solid) and FLOP-ideal (dashed). False if no
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written (pip install piofvlm[plot])")
        return False
    by_method: dict[str, list[dict[str, Any]]] = {}
    for v in result["variants"]:
        if v["method"]["method"] != "none":
            by_method.setdefault(v["method"]["method"], []).append(v)
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, (name, rows) in enumerate(sorted(by_method.items())):
        rows = sorted(rows, key=lambda v: v["retained"])
        x = [v["retained"] for v in rows]
        color = f"C{index}"
        ax.plot(x, [v["ratios"]["prefill_speedup"] for v in rows], "o-", color=color, label=f"{name} prefill")
        ax.plot(x, [v["ratios"]["e2e_speedup"] for v in rows], "s:", color=color, label=f"{name} end to end")
        ideal = [v["ratios"].get("prefill_ideal") for v in rows]
        if all(i is not None for i in ideal):
            ax.plot(x, ideal, "x--", color=color, alpha=0.6, label=f"{name} FLOP-ideal prefill (incl. selection)")
    for layer in sorted(
        {v["stages"][0]["layer"] for rows in by_method.values() for v in rows if len(v["stages"]) == 1}
    ):
        grid = [i / 100 for i in range(2, 101)]
        ax.plot(grid, [schedule_ideal(result, layer, r) for r in grid], "k-", alpha=0.35, linewidth=1,
                label=f"FLOP-ideal, schedule only (prune after layer {layer})")  # fmt: skip
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("visual tokens retained after the last stage (fraction)")
    ax.set_ylabel("speedup vs unpruned")
    cfg, model = result["config"], result["model"]
    ax.set_title(
        f"{cfg['preset'] or 'checkpoint'}: {model['text_shape']['num_layers']} layers, {model['visual_tokens']} "
        f"visual, {cfg['dtype']}, {result['environment']['device'][:28]}, "
        f"{result['environment']['torch_threads']} threads",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
