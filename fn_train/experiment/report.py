"""The experiment's report: first the answers (each masked arm against its controls and plain LoRA,
paired by seed, with intervals and corrected p-values: `comparisons`), then each arm's figures as
mean ± sd over seeds, as a table (printed and in table.txt) and a figure (results.png); every number
the table prints is in results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fn_train.experiment.arms import RunSpec
from fn_train.experiment.comparisons import compare
from shared.chance import AT_CHANCE, against_chance, at_chance, chance_text
from shared.constants import EXPERIMENT_FIGURE_NAME, EXPERIMENT_RESULTS_NAME, EXPERIMENT_TABLE_NAME
from shared.jsonio import write_text_atomic

RESULTS_NAME, TABLE_NAME, FIGURE_NAME = EXPERIMENT_RESULTS_NAME, EXPERIMENT_TABLE_NAME, EXPERIMENT_FIGURE_NAME

# (figure, column heading, decimals printed) of every run, after each scored set's loss and accuracy.
RUN_METRICS: tuple[tuple[str, str, int], ...] = (
    ("train_loss", "train loss", 4),
    ("train_seconds", "train s", 1),
    ("trainable_parameters", "trainable", 0),
    ("peak_memory_mb", "peak MiB", 0),
)
BEFORE = "base model (before)"


def metrics(results: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(figure, heading, decimals) in the table's order: each scored set's loss and accuracy (the task,
    then each retention set), then the training's own figures."""
    scored = []
    for key in results.get("datasets", {"task": {}, "retention": {}}):
        label = key.replace("_", " ")
        scored += [(f"{key}_loss", f"{label} loss", 4), (f"{key}_accuracy", f"{label} acc", 3)]
    return [*scored, *RUN_METRICS]


def summarize(results: dict[str, Any], runs: list[RunSpec]) -> dict[str, dict[str, Any]]:
    """Per arm (in the plan's order): the seeds recorded, and each figure's mean and sample sd
    over them (sd 0 with one seed)."""
    summary: dict[str, dict[str, Any]] = {}
    planned = {run.name for run in runs}  # runs recorded by an earlier plan with more arms or seeds are left out
    for group in dict.fromkeys(run.group for run in runs):
        records = [r for name, r in results["runs"].items() if r["group"] == group and name in planned]
        if not records:
            continue
        figures = {}
        for name, _, _ in metrics(results):
            values = [r["figures"][name] for r in records if r["figures"].get(name) is not None]
            if values:
                sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                figures[name] = {"mean": float(np.mean(values)), "sd": sd}
        summary[group] = {"seeds": sorted(r["seed"] for r in records), "n": len(records), "figures": figures}
    return summary


def report(results: dict[str, Any], runs: list[RunSpec]) -> None:
    """The summary, the base model against each multiple-choice set's chance level, and the comparisons of
    the recorded runs, into `results`."""
    results["summary"] = summarize(results, runs)
    results["chance"] = chance_levels(results)
    results["comparisons"] = compare(results, runs)


def chance_levels(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per multiple-choice set (by key): its chance level and the base model's acc next to it
    (`shared.chance`), from the figures scored before training."""
    before = results.get("before", {})
    return {
        key: against_chance(data["chance"], data["choice_records"], before[f"{key}_accuracy"]).to_dict()
        for key, data in results.get("datasets", {}).items()
        if "chance" in data and f"{key}_accuracy" in before
    }


def format_verdicts(results: dict[str, Any]) -> list[str]:
    """The answers, one line per comparison, under a line that says how they were made."""
    made = results.get("comparisons") or {}
    comparisons = made.get("comparisons") or []
    if not comparisons:
        return []
    seeds = max(c["n_seeds"] for c in comparisons)
    at_chance_figures = {f"{key}_accuracy" for key, level in results.get("chance", {}).items() if at_chance(level)}
    return [
        f"answers: each arm minus its control, paired by seed (up to {seeds}) and row; {made['confidence']:.0%} "
        f"interval (not adjusted) and p-value from {made['method']}; p corrected by {made['correction']} over the "
        f"{made['count']} comparisons",
        *(c["verdict"] + (f" [{AT_CHANCE}]" if c["figure"] in at_chance_figures else "") for c in comparisons),
        "",
    ]


def format_table(results: dict[str, Any]) -> str:
    """Arms x figures, mean ± sd over seeds, below the base model's scores."""
    summary = results.get("summary", {})
    shown = [
        (name, heading, decimals)
        for name, heading, decimals in metrics(results)
        if name in results.get("before", {}) or any(name in row["figures"] for row in summary.values())
    ]
    width = {name: max(len(heading), 2 * (8 + decimals)) for name, heading, decimals in shown}
    label = max([len(BEFORE), *(len(group) for group in summary)]) + 2
    config = results["config"]
    seeds = ", ".join(str(seed) for seed in config["seeds"])
    lines = [
        *format_verdicts(results),
        f"fn-train experiment: {config['model']} on {config['train_data']}, {config['steps']} steps, "
        f"seeds {seeds}; mean ± sd over seeds (n: seeds recorded)",
        "arm".ljust(label) + "n".rjust(3) + "  " + "  ".join(h.rjust(width[m]) for m, h, _ in shown),
    ]
    before = results.get("before", {})
    cells = [f"{before[m]:.{d}f}".rjust(width[m]) if m in before else "-".rjust(width[m]) for m, _, d in shown]
    lines.append(BEFORE.ljust(label) + "-".rjust(3) + "  " + "  ".join(cells))
    for group, row in summary.items():
        cells = []
        for name, _, decimals in shown:
            figure = row["figures"].get(name)
            text = "-" if figure is None else f"{figure['mean']:.{decimals}f} ± {figure['sd']:.{decimals}f}"
            cells.append(text.rjust(width[name]))
        lines.append(group.ljust(label) + str(row["n"]).rjust(3) + "  " + "  ".join(cells))
    datasets = results.get("datasets", {})
    for role, data in datasets.items():
        if data.get("plain_text"):
            accuracy = "none (plain text: the loss is on every token)"
        else:
            accuracy = data["accuracy"] or "no accuracy (short answers without generate: true)"
        lines.append(f"{role}: {data['source']} ({data['rows']} rows; accuracy: {accuracy})")
        level = results.get("chance", {}).get(role)
        if level is not None:
            lines.append(f"  {chance_text(level)}" + (f"; warning: {AT_CHANCE}" if level["at_chance"] else ""))
    if "peak_memory" in results:
        lines.append(f"peak MiB: {results['peak_memory']}, during training")
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path) -> str:
    """table.txt and results.png in `out`; returns the table."""
    from fn_analyze.report.plots import plot_experiment

    table = format_table(results)
    write_text_atomic(out / TABLE_NAME, table + "\n")
    plot_experiment(results, [(name, heading) for name, heading, _ in metrics(results)], out / FIGURE_NAME)
    return table
