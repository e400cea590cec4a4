"""The experiment's answers: every masked arm against each of its random controls, and against plain
LoRA, on every scored figure, as a difference paired by seed and row with its interval, a p-value
corrected for the number of comparisons, and a verdict line.

A comparison takes the seeds where both runs are recorded; each run scored the same rows, so the
per-row figures of arm and control form two (seeds x rows) arrays and `shared.statistics.
paired_difference` fits seeds and rows as crossed random effects. Where nothing is shown, the line
says the smallest difference the design could detect and how many seeds would detect the
config's `target_difference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fn_train.experiment.arms import NETWORKS, RunSpec
from shared.statistics import Difference, adjust, paired_difference

CORRECTION_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg"}
POWER = 0.8
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Pair:
    """Two groups of runs compared seed by seed: `arm` minus `control`."""

    arm: str  # a group of the summary (RunSpec.group), e.g. "tune"
    control: str  # e.g. "tune random-magnitude", or "lora"

    @property
    def label(self) -> tuple[str, str]:
        """(arm, control) as the verdict names them: `tune`, `random-magnitude`; `key`, `lora`."""
        return self.arm, self.control.removeprefix(f"{self.arm} ")


def planned_pairs(runs: list[RunSpec]) -> list[Pair]:
    """Each masked arm (with the networks) against each of its controls, then against plain LoRA."""
    groups = list(dict.fromkeys(run.group for run in runs))
    pairs: list[Pair] = []
    for run in runs:
        if run.neurons != NETWORKS or any(pair.arm == run.group for pair in pairs):
            continue
        controls = [g for g in groups if g.startswith(f"{run.group} random-")]
        pairs += [Pair(run.group, control) for control in controls]
        if "lora" in groups:
            pairs.append(Pair(run.group, "lora"))
    return pairs


def _rows(records: dict[int, dict[str, Any]], key: str, name: str, seeds: list[int]) -> np.ndarray:
    return np.array([records[seed]["rows"][key][name] for seed in seeds], dtype=np.float64)


def compare(results: dict[str, Any], runs: list[RunSpec]) -> dict[str, Any]:
    """The comparisons of the recorded runs, corrected together; {"method", "correction", "comparisons"}."""
    config = results["config"]
    planned = {run.name for run in runs}
    by_group: dict[str, dict[int, dict[str, Any]]] = {}
    for name, record in results["runs"].items():
        if name in planned and "rows" in record:
            by_group.setdefault(record["group"], {})[record["seed"]] = record
    made: list[tuple[Pair, str, str, Difference]] = []
    for pair in planned_pairs(runs):
        arm, control = by_group.get(pair.arm, {}), by_group.get(pair.control, {})
        seeds = sorted(set(arm) & set(control))
        if not seeds:
            continue
        for key in results.get("datasets", {}):
            for kind in ("loss", "accuracy"):
                if kind not in arm[seeds[0]]["rows"].get(key, {}):
                    continue
                weights = np.array(arm[seeds[0]]["rows"][key]["tokens"], dtype=np.float64) if kind == "loss" else None
                difference = paired_difference(
                    _rows(arm, key, kind, seeds), _rows(control, key, kind, seeds), weights, CONFIDENCE
                )
                made.append((pair, key, kind, difference))
    correction = config.get("correction", "holm")
    adjusted = adjust([d.p_value for *_, d in made], correction)
    targets = config.get("target_difference") or {}
    comparisons = [
        _record(pair, key, kind, difference, p, correction, targets.get(kind))
        for (pair, key, kind, difference), p in zip(made, adjusted, strict=True)
    ]
    return {
        "method": made[0][3].method if made else None,
        "correction": CORRECTION_NAMES[correction],
        "count": len(comparisons),
        "confidence": CONFIDENCE,
        "power": POWER,
        "comparisons": comparisons,
    }


def _record(
    pair: Pair, key: str, kind: str, difference: Difference, p_adjusted: float, correction: str, target: float | None
) -> dict[str, Any]:
    arm, control = pair.label
    figure = f"{key.replace('_', ' ')} {'loss' if kind == 'loss' else 'acc'}"
    verdict = difference.verdict(arm, control, figure, p_adjusted, CORRECTION_NAMES[correction], power=POWER)
    seeds_needed: int | None = None
    if target is not None and difference.spread and not p_adjusted < 0.05:
        verdict += "; " + _seeds_text(difference, target)
        if difference.n_seeds > 1:
            seeds_needed = difference.seeds_for(target, POWER)
    return {
        "arm": arm,
        "control": control,
        "figure": f"{key}_{kind}",
        "estimate": difference.estimate,
        "low": difference.low,
        "high": difference.high,
        "p_value": difference.p_value,
        "p_adjusted": p_adjusted,
        "shown": bool(p_adjusted < 0.05 and difference.spread),
        "detectable": difference.detectable(POWER) if difference.spread else None,
        "target_difference": target,
        "seeds_needed": seeds_needed,
        "n_seeds": difference.n_seeds,
        "n_rows": difference.n_rows,
        "note": difference.note,
        "verdict": verdict,
    }


def _seeds_text(difference: Difference, target: float) -> str:
    """How many seeds would detect `target`, in words."""
    if difference.n_seeds < 2:
        return f"one seed: how many seeds would detect {target:g} is unknown (run 2 or more)"
    needed = difference.seeds_for(target, POWER)
    if needed is None:
        return f"no number of seeds on these {difference.n_rows} rows would detect {target:g}: more rows are needed"
    return f"{needed} seeds would detect {target:g} ({POWER:.0%} power)"
