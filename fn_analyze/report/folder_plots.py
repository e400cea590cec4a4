"""PNG figures of `evaluate --tuned` and `evaluate --pruned`: each model's figures, and the differences
between them with their intervals (filled where shown), drawn from the results JSON alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fn_analyze.report.plots import LAYER_COLOR, MAGNITUDE_COLOR, better, plot_differences
from shared.chance import at_chance
from shared.figures import NETWORK_COLOR
from shared.figures import agg_figure as _figure
from shared.figures import save_png as _save

BASE_COLOR = "#616161"


def _values_panel(ax: Any, names: list[str], values: list[float], spreads: list[float] | None, title: str) -> None:
    y = np.arange(len(names))[::-1].astype(float)
    colors = [BASE_COLOR, *([NETWORK_COLOR, MAGNITUDE_COLOR, LAYER_COLOR] * len(names))[: len(names) - 1]]
    shown_spreads = spreads if spreads is not None and any(spreads) else None  # no bar for a spread of none
    ax.barh(y, values, 0.7, xerr=shown_spreads, color=colors, capsize=3)
    ax.set_yticks(y, names, fontsize=7)
    ax.set_title(title, fontsize=9, loc="left")


def _chance_line(ax: Any, chance: dict[str, Any] | None) -> str:
    """The chance level as a dotted line on an accuracy panel; the words its title adds."""
    if chance is None:
        return ""
    ax.axvline(chance["chance"], color="red", linestyle=":", linewidth=1.2)
    return "; red dotted: chance" + (" (base AT CHANCE: differences are noise)" if at_chance(chance) else "")


def plot_tuned(results: dict[str, Any], path: Path) -> None:
    """One row of panels per dataset and figure (loss, accuracy): the base's and each folder's value, and
    each folder minus the base and minus each other folder, paired by row, with its interval."""
    panels = []
    for data in results["datasets"]:
        for figure in dict.fromkeys(c["figure"] for c in data["comparisons"]):
            panels.append((data, figure))
    pairs = max(sum(c["figure"] == figure for c in data["comparisons"]) for data, figure in panels)
    fig = _figure(figsize=(12, 1.4 + (0.9 + 0.3 * max(pairs, 1 + len(results["labels"]))) * len(panels)),
                  layout="constrained")  # fmt: skip
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for (ax, difference_ax), (data, figure) in zip(axes, panels, strict=True):
        names = ["base", *(t["folder"] for t in data["tuned"])]
        values = [data["base"][figure], *(t[figure] for t in data["tuned"])]
        extra = _chance_line(ax, data["chance"]) if figure != "loss" else ""
        _values_panel(ax, names, values, None, f"{data['role']} {figure} ({better(figure)}){extra}")
        plot_differences(difference_ax, [c for c in data["comparisons"] if c["figure"] == figure],
                          f"{data['role']} {figure}")  # fmt: skip
    fig.suptitle(
        f"evaluate --tuned: {', '.join(results['labels'])} (base {results['base_model']})\n"
        "right: differences paired by row, 95% intervals; filled: shown after Holm's correction; "
        "one training run per folder",
        fontsize=9,
    )
    _save(fig, path)


def plot_pruned(results: dict[str, Any], path: Path) -> None:
    """The models' loss (random prunings: mean and sd over the draws) and accuracy, the prefill tokens/s of
    the original and the pruned model, and the pruned model minus each control with its interval."""
    rows = results["rows"]
    figures = ["loss", *(name for name in ("accuracy", "contains") if name in rows[0])]
    fig = _figure(figsize=(12, 1.6 + 2.0 * (len(figures) + 1)), layout="constrained")
    axes = fig.subplots(len(figures) + 1, 2, squeeze=False)
    for (ax, difference_ax), figure in zip(axes, figures, strict=False):
        names = [row["name"] + (f" ({row['draws']} draws)" if "draws" in row else "") for row in rows]
        spreads = [row.get(f"{figure}_std", 0.0) for row in rows]
        extra = _chance_line(ax, results.get("chance")) if figure != "loss" else ""
        _values_panel(ax, names, [row[figure] for row in rows], spreads, f"{figure} ({better(figure)}){extra}")
        compared = [c for c in results["comparisons"] if c["figure"] == figure]
        if compared:
            plot_differences(difference_ax, [{**c, "shown": c["p_value"] < 1 - c["confidence"]} for c in compared],
                              figure)  # fmt: skip
        else:
            difference_ax.set_visible(False)
    speed_ax, note_ax = axes[-1]
    speed = results["prefill_speed"]
    rates = speed["tokens_per_second"]
    _values_panel(speed_ax, list(rates), list(rates.values()), None, "prefill tokens/s (higher is better)")
    batch = speed["batch"]
    speed_ax.set_xlabel(
        f"{batch['sequences']} x {batch['positions']} batch, {speed['device']} {speed['dtype']}; median of "
        f"{speed['rounds']} interleaved rounds; pruned {speed['speedup']['pruned']:.2f}x",
        fontsize=8,
    )
    note_ax.set_visible(False)
    sizes = results["intermediate_size"]
    fig.suptitle(
        f"evaluate --pruned: {results['pruned']} ({sizes['before']} -> {sizes['after']} MLP neurons per layer) vs "
        f"{results['base_model']} on {results['dataset']['source']} ({results['dataset']['rows']} rows)\n"
        "right: the pruned model minus each control, paired by row, 95% intervals (filled: shown)",
        fontsize=9,
    )
    _save(fig, path)
