"""PNG figures of evaluations, mask comparisons and networks.

The figures are matplotlib `Figure`s drawn on their own Agg canvas, never through pyplot:
no screen is needed, and the caller's backend (a notebook's inline one) is left as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.patches import Rectangle

from shared.figures import ANNOTATE_LIMIT, NETWORK_COLOR, networks_figure
from shared.figures import agg_figure as _figure
from shared.figures import save_png as _save
from shared.masks import MaskFile

LAYER_COLOR = "#9e9e9e"
MAGNITUDE_COLOR = "#e08214"


def plot_evaluation(results: dict[str, Any], path: Path) -> None:
    """Extra answer loss of each condition next to its random controls (left), and its loss ratio over
    each control with the ratio's interval (right); one row of panels per kind of condition. A ratio
    that is not readable is marked n/r, not drawn."""
    panels = [
        ("union", "key", "The networks switched off together (mode key): more loss = the model needs them"),
        ("union", "complement", "Only the networks kept, every other MLP neuron off (mode complement): less = enough"),
        ("network", "key", "Each network switched off on its own (mode key)"),
    ]
    panels = [p for p in panels if any((r["kind"], r["mode"]) == p[:2] for r in results["conditions"])]
    heights = [1 + sum((r["kind"], r["mode"]) == p[:2] for r in results["conditions"]) for p in panels]
    fig = _figure(figsize=(13, 1.6 + 0.6 * sum(heights)), layout="constrained")
    axes = fig.subplots(
        len(panels), 2, gridspec_kw={"height_ratios": heights, "width_ratios": [3, 2]}, squeeze=False, sharey="row"
    )
    base = results["baseline"]["loss"]
    series = (
        (None, NETWORK_COLOR, "the networks' neurons"),
        ("layer_matched", LAYER_COLOR, "random neurons, same count per layer (mean over draws, its interval)"),
        ("magnitude_matched", MAGNITUDE_COLOR, "random neurons, same count per layer and magnitude bin (the same)"),
    )
    bar = 0.26
    for (ax, ratio_ax), (kind, mode, title) in zip(axes, panels, strict=True):
        rows = [r for r in results["conditions"] if (r["kind"], r["mode"]) == (kind, mode)]
        y = np.arange(len(rows))[::-1].astype(float)
        for offset, (key, color, label) in enumerate(series):
            if key is None:
                values, spreads = [r["loss"] - base for r in rows], None
            else:
                ratios = [r["controls"][key]["ratio"] if key in r["controls"] else None for r in rows]
                values = [np.nan if q is None else q["denominator"] for q in ratios]
                spreads = np.array(
                    [[0.0, 0.0] if q is None else [q["denominator"] - q["denominator_low"],
                                                   q["denominator_high"] - q["denominator"]] for q in ratios]
                ).T  # fmt: skip
            ax.barh(y + bar * (1 - offset), values, bar, xerr=spreads, color=color, label=label, capsize=2)
            if key is not None:
                _ratio_points(ratio_ax, y + bar * (1 - offset), ratios, color)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ratio_ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        low, high = ratio_ax.get_xlim()
        ratio_ax.set_xlim(min(low, 0.0), max(high, 2.0))  # one, and random's side of it, always in view
        labels = [
            f"{r['name']}: {r['neurons']} neurons" + ("" if r["controls"] else "\nno random sets drawn") for r in rows
        ]
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xlabel(f"extra answer-token loss over the baseline ({base:.3f}, nothing switched off)", fontsize=8)
        ratio_ax.set_xlabel("ratio: the networks' extra loss / the random sets' (n/r: not readable)", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    data = results["dataset"]
    fig.suptitle(
        f"{results['model']} on {data['source']} ({data['rows']} rows): switching MLP neurons off\n"
        "error bars: intervals resampling the rows and the random sets; a ratio whose denominator is within "
        "noise of zero is not readable",
        fontsize=10,
    )
    fig.legend(handles, labels, loc="outside lower center", ncol=1, fontsize=8, frameon=False)
    _save(fig, path)


def _ratio_points(ax: Any, y: np.ndarray, ratios: list[dict[str, Any] | None], color: str) -> None:
    """Each readable ratio as a point with its interval; an unreadable one as the text n/r at one."""
    for position, ratio in zip(y, ratios, strict=True):
        if ratio is None:
            continue
        if not ratio["readable"]:
            ax.text(0.01, position, "n/r: not readable", va="center", fontsize=7, color=color,
                    transform=ax.get_yaxis_transform())  # fmt: skip
            continue
        error = [[ratio["value"] - ratio["low"]], [ratio["high"] - ratio["value"]]]
        ax.errorbar([ratio["value"]], [position], xerr=error, fmt="o", color=color, capsize=2, markersize=4)


def plot_iou(matrix: np.ndarray, ids_a: list[int], ids_b: list[int], name_a: str, name_b: str, path: Path) -> None:
    """Heatmap of the IoU of every pair of networks, each row's best match outlined."""
    fig = _figure(figsize=(2 + 0.4 * len(ids_b), 1.5 + 0.35 * len(ids_a)))
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="IoU of the two networks' neurons")
    ax.set_xticks(range(len(ids_b)), [str(i) for i in ids_b], fontsize=7)
    ax.set_yticks(range(len(ids_a)), [str(i) for i in ids_a], fontsize=7)
    ax.set_xlabel(f"networks of {name_b}")
    ax.set_ylabel(f"networks of {name_a}")
    if matrix.size:
        for row, col in enumerate(matrix.argmax(axis=1)):
            if matrix[row, col] > 0:
                ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    if max(matrix.shape) <= ANNOTATE_LIMIT:
        for (row, col), value in np.ndenumerate(matrix):
            if value >= 0.05:
                color = "black" if value > 0.6 else "white"
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6, color=color)
    ax.set_title("Network overlap (IoU); red: each row's best match", fontsize=10)
    _save(fig, path)


def plot_networks(mask: MaskFile, path: Path) -> None:
    """Neurons of each network in each layer (heatmap), with each network's size beside it."""
    _save(networks_figure(mask), path)


def plot_experiment(results: dict[str, Any], metrics: list[tuple[str, str]], path: Path) -> None:
    """One panel per figure of an `fn-train experiment` (metrics: (name, heading)): each arm's mean
    over seeds with its sd as error bar, the base model's value (before training) as a dashed line;
    then one panel per scored figure with each comparison's difference (arm minus control, paired by
    seed and row) and its 95% interval, filled where the corrected p-value shows a difference."""
    summary, before = results.get("summary", {}), results.get("before", {})
    shown = [(name, heading) for name, heading in metrics if any(name in row["figures"] for row in summary.values())]
    comparisons = (results.get("comparisons") or {}).get("comparisons") or []
    compared = list(dict.fromkeys(c["figure"] for c in comparisons))
    groups = list(summary)
    columns = 2
    rows = max(1, -(-len(shown) // columns))
    compared_rows = -(-len(compared) // columns)
    pairs = max([sum(c["figure"] == name for c in comparisons) for name in compared] or [0])
    height = 1.2 + (0.9 + 0.28 * len(groups)) * rows + (0.9 + 0.28 * pairs) * compared_rows
    fig = _figure(figsize=(11, height), layout="constrained")
    axes = fig.subplots(rows + compared_rows, columns, squeeze=False).ravel()
    colors = [
        MAGNITUDE_COLOR
        if "magnitude" in g
        else LAYER_COLOR
        if "layer" in g
        else NETWORK_COLOR
        if g != "lora"
        else "#2e7d32"
        for g in groups
    ]
    y = np.arange(len(groups))[::-1].astype(float)
    for ax, (name, heading) in zip(axes, shown, strict=False):
        means = [summary[g]["figures"].get(name, {}).get("mean", np.nan) for g in groups]
        sds = [summary[g]["figures"].get(name, {}).get("sd", 0.0) for g in groups]
        ax.barh(y, means, 0.7, xerr=sds, color=colors, capsize=3)
        if name in before:
            ax.axvline(before[name], color="black", linestyle="--", linewidth=1)
        ax.set_yticks(y, [f"{g} (n={summary[g]['n']})" for g in groups], fontsize=7)
        ax.set_title(f"{heading} ({better(name)})", fontsize=9, loc="left")
    for ax in axes[len(shown) : rows * columns]:
        ax.set_visible(False)
    headings = dict(metrics)
    for ax, name in zip(axes[rows * columns :], compared, strict=False):
        plot_differences(ax, [c for c in comparisons if c["figure"] == name], headings.get(name, name))
    for ax in axes[rows * columns + len(compared) :]:
        ax.set_visible(False)
    config = results["config"]
    fig.suptitle(
        f"fn-train experiment: {config['model']} on {config['train_data']}, {config['steps']} steps; "
        "mean ± sd over seeds (dashed: the base model, before)\n(green: plain LoRA; blue: the networks; grey: "
        "random, layer-matched; orange: random, magnitude-matched); below: differences with 95% intervals",
        fontsize=9,
    )
    _save(fig, path)


def better(figure: str) -> str:
    """Which way a figure improves: a loss (`loss`, `task_loss`) downwards, an accuracy or a rate upwards."""
    return "lower is better" if figure.endswith("loss") else "higher is better"


def plot_differences(ax, comparisons: list[dict[str, Any]], heading: str) -> None:
    """Each comparison's difference and interval on one figure; filled: shown after the correction."""
    y = np.arange(len(comparisons))[::-1].astype(float)
    for row, comparison in zip(y, comparisons, strict=True):
        estimate = comparison["estimate"]
        error = [[estimate - comparison["low"]], [comparison["high"] - estimate]]
        shown = comparison["shown"]
        ax.errorbar(
            estimate, row, xerr=error, fmt="o", color=NETWORK_COLOR if shown else "#616161",
            markerfacecolor=NETWORK_COLOR if shown else "white", capsize=3,
        )  # fmt: skip
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_yticks(y, [f"{c['arm']} - {c['control']}" for c in comparisons], fontsize=7)
    ax.set_ylim(-0.7, len(comparisons) - 0.3)
    ax.set_title(f"{heading}: arm - control, 95% interval (filled: shown)", fontsize=9, loc="left")
