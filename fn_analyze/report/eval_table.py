"""The printed report of `fn-analyze evaluate`: every figure in it is a field of the results JSON."""

from __future__ import annotations

import math
from typing import Any

from shared.chance import AT_CHANCE, at_chance, chance_text
from shared.data import split_prefix

RATIO_WIDTH = 20  # "2.19x [1.60, 3.10]"
VERDICT_CONTROL = "magnitude_matched"  # the stricter control: the verdicts are read against it


def _fmt_control(control: dict[str, Any] | None) -> str:
    if control is None:
        return "-"
    if control["draws"] == 1:  # no spread to show
        return f"{control['mean']:.3f} (1)"
    return f"{control['mean']:.3f} ± {control['std']:.3f} ({control['draws']})"


def _decimals(*values: float) -> int:
    """Decimals that give the largest of `values` three significant digits, at most two."""
    largest = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    return 2 if largest == 0 else min(2, max(0, 2 - math.floor(math.log10(largest))))


def ratio_text(ratio: dict[str, Any] | None) -> str:
    """A ratio with its interval, e.g. `2.19x [1.60, 3.10]`; `n/r` (not readable) where the random
    sets' harm is within noise of zero, so that no number stands for it; `-` where none was measured."""
    if ratio is None:
        return "-"
    if not ratio["readable"]:
        return "n/r"
    digits = _decimals(ratio["value"], ratio["low"], ratio["high"])
    return f"{ratio['value']:.{digits}f}x [{ratio['low']:.{digits}f}, {ratio['high']:.{digits}f}]"


def _interval_text(value: float, low: float, high: float) -> str:
    digits = max(3, _decimals(value, low, high))
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def verdict(name: str, mode: str, control: str, ratio: dict[str, Any], harm: str) -> str:
    """One line on a condition against a control: its ratio, interval and rank, and what they show.
    `harm` names the ratio's figure ("extra loss", "accuracy lost"). For key (switched off) above one
    is the networks mattering more than random neurons; for complement (kept alone) below one is them
    keeping the model better than random neurons do."""
    action = "off" if mode == "key" else "kept alone"
    head = f"{name} {action} vs {control.replace('_', '-')}"
    noise = _interval_text(ratio["denominator"], ratio["denominator_low"], ratio["denominator_high"])
    if not ratio["readable"]:
        return f"{head}: not readable: the random sets' {harm} is within noise of zero ({noise})"
    shown = (
        f"{head}: {ratio_text(ratio)} the random sets' {harm}, "
        f"{ratio['rank']} of {ratio['n_draws']} random sets with as much"
    )
    if ratio["denominator"] < 0:
        return f"{shown}: no comparison: the random sets' {harm} is below zero ({noise})"
    if ratio["low"] > 1:
        word = "more than random neurons of its size" if mode == "key" else "random neurons alone keep the model better"
        return f"{shown}: above one ({word})"
    if ratio["high"] < 1:
        word = (
            "less than random neurons of its size" if mode == "key" else "it alone keeps the model better than random"
        )
        return f"{shown}: below one ({word})"
    return f"{shown}: not shown (the interval holds one)"


def _verdicts(results: dict[str, Any], metric: str | None) -> list[str]:
    """A verdict on each condition's loss against the magnitude-matched random sets, and for the union
    rows on the accuracy too; then how the intervals were made."""
    lines = [f"verdicts, against the {VERDICT_CONTROL.replace('_', '-')} random sets:"]
    methods: dict[str, None] = {}
    confidence = 0.0
    for row in results["conditions"]:
        control = row["controls"].get(VERDICT_CONTROL)
        if control is None:
            continue
        lines.append("  " + verdict(row["name"], row["mode"], VERDICT_CONTROL, control["ratio"], "extra loss"))
        if metric is not None and row["kind"] == "union" and control.get("accuracy_ratio") is not None:
            ratio = control["accuracy_ratio"]
            line = verdict(row["name"], row["mode"], VERDICT_CONTROL, ratio, f"{metric} lost")
            lines.append("  " + line + (f" [{AT_CHANCE}]" if at_chance(results.get("chance")) else ""))
        for summary in row["controls"].values():
            for ratio in (summary["ratio"], summary.get("accuracy_ratio")):
                if ratio is not None:
                    methods[ratio["method"] + (f" ({ratio['note']})" if ratio["note"] else "")] = None
                    confidence = ratio["confidence"]
    if len(lines) == 1:
        return []
    lines += [f"interval ({confidence:.0%}): {method}" for method in methods]
    lines.append(
        "rank: how many random sets have at least the condition's extra loss (accuracy lost); "
        "n/r: not readable, the random sets' mean harm is within noise of zero (its interval holds zero), "
        "so its ratio is no number"
    )
    return lines


# Below this many rows a percentile bootstrap over the rows has too few distinct resamples (at most
# C(2n - 1, n)) and its intervals come out too narrow, whatever the detectable difference says.
MIN_ROWS = 20


def _enough_rows(results: dict[str, Any]) -> list[str]:
    """What the rows can detect, against what the random sets did to the union switched off (else the first
    condition); a warning when the rows are too few for the ratios to mean anything."""
    rows = results["dataset"]["rows"]
    conditions = results["conditions"]
    chosen = next(
        (c for c in conditions if c["kind"] == "union" and c["mode"] == "key"), conditions[0] if conditions else None
    )
    control = None if chosen is None else chosen["controls"].get(VERDICT_CONTROL)
    if control is None or control.get("detectable") is None:
        if rows < MIN_ROWS:
            return [f"warning: {rows} rows are too few for these figures to mean anything; score more rows"]
        return []
    detectable, power = control["detectable"]["extra_loss"], control["detectable"]["power"]
    harm = control["ratio"]["denominator"]
    line = (
        f"rows: the smallest extra loss these {rows} rows could detect ({power:.0%} power) is {detectable:.4f}; the "
        f"magnitude-matched random sets of {chosen['name']} add {harm:.4f}"
    )
    lines = [line]
    if rows < MIN_ROWS or detectable > abs(harm):
        why = (
            "a bootstrap over so few rows has few distinct resamples, and its intervals come out too narrow"
            if rows < MIN_ROWS
            else "the random sets' harm, each ratio's denominator, is below what they can detect"
        )
        lines.append(f"warning: {rows} rows are too few for these ratios to mean anything ({why}); score more rows")
    return lines


def format_table(results: dict[str, Any]) -> str:
    """The printed report; every figure in it is a field of `results`."""
    data, base, magnitude = results["dataset"], results["baseline"], results["magnitude"]
    em = "exact_match" in base
    metric = results.get("accuracy_metric")  # accuracy (multiple choice), contains (generation) or None
    top = f"top{magnitude['top_n']}"
    ablation = results.get("ablation", {"mode": "zero"})
    how = {
        "zero": "switched off (zeroed)",
        "mean": f"set to their mean activation (means from {ablation.get('means_source')})",
        "scale": f"scaled by {ablation.get('scale_factor')}",
    }[ablation["mode"]]
    accuracy_text = ""
    if "accuracy" in base:
        accuracy_text = (
            f", accuracy {base['accuracy']:.3f} (acc_norm {base['accuracy_norm']:.3f}; "
            f"{data['choice_records']} multiple-choice records)"
        )
    split = split_prefix(data["source"], data["split"])
    lines = [
        f"answer-token loss of {results['model']} on {data['source']} ({split}{data['rows']} rows, "
        f"{data['answer_tokens']} answer tokens)",
        f"baseline: loss {base['loss']:.3f}, perplexity {base['perplexity']:.2f}"
        + (f", exact match {base['exact_match']:.3f}, answer contained {base['contains']:.3f}" if em else "")
        + accuracy_text,
        f"ablation: the neurons of each condition and random set are {how}",
        f"magnitude: {magnitude['statistic']} from {magnitude['source']}; the {magnitude['top_n']} largest range "
        f"{magnitude['top_smallest']:.1f} to {magnitude['top_largest']:.1f}"
        + (" and are left out of every set" if magnitude["excluded"] else "")
        + (
            f"; the mask file's {magnitude['set_aside_left_out']} set-aside neurons are left out of the random sets"
            if magnitude.get("set_aside_left_out")
            else ""
        ),
        "ratio: extra loss over the random sets' mean extra loss; layer-matched random sets have the same count "
        "per layer, magnitude-matched ones the same count per layer and magnitude bin (shared: share of them "
        "that is the condition's own neurons)",
        "reading the ratio: for key (switched off), above one means the networks matter more than random neurons; "
        "for complement (only they kept), lower is better: below one means the networks alone preserve the "
        "model better than random neurons alone; [low, high]: its interval",
        f"{top}: the condition's neurons among the {magnitude['top_n']} largest-magnitude ones; "
        "(n) after a random sets' loss: how many sets were drawn (mean ± standard deviation over them)",
    ]
    if metric is not None:
        name = "acc (log-likelihood of each choice)" if metric == "accuracy" else "answer contained in the generation"
        lines.append(f"acc: {name}; drop: accuracy lost over the random sets' mean accuracy lost")
    chance = results.get("chance")
    if chance is not None:
        lines.append(f"{chance_text(chance)} (acc_norm's chance is the same)")
        if chance["at_chance"]:
            lines.append(f"warning: {AT_CHANCE}")
    if data["held_out"] is False:
        lines.append("warning: this is the data the networks were found on, not held-out data")
    lines += _enough_rows(results)
    lines += ["", *_verdicts(results, metric), ""]
    acc_head = f" {'acc':>5}" if metric else ""
    control_acc_head = f" {'acc':>5} {'drop':>{RATIO_WIDTH}}" if metric else ""
    header = (
        f"{'condition':<24} {'mode':<10} {'neurons':>7} {top:>6} {'loss':>7}"
        + (f" {'EM':>5}" if em else "")
        + acc_head
        + f" | {'layer-matched':<22} {'ratio':>{RATIO_WIDTH}}"
        + (f" {'EM':>5}" if em else "")
        + control_acc_head
        + f" | {'magnitude-matched':<22} {'ratio':>{RATIO_WIDTH}} {'shared':>6}"
        + (f" {'EM':>5}" if em else "")
        + control_acc_head
    )
    lines.append(header)
    lines.append("-" * len(header))

    def control_accuracy(control: dict[str, Any] | None) -> str:
        if not metric:
            return ""
        if control is None:
            return f" {'-':>5} {'-':>{RATIO_WIDTH}}"
        return f" {control[metric]:>5.3f} {ratio_text(control.get('accuracy_ratio')):>{RATIO_WIDTH}}"

    for row in results["conditions"]:
        layer, mag = row["controls"].get("layer_matched"), row["controls"].get("magnitude_matched")
        layer_ratio, mag_ratio = (ratio_text(c["ratio"] if c else None) for c in (layer, mag))
        line = (
            f"{row['name']:<24} {row['mode']:<10} {row['neurons']:>7} {row['top_magnitude_held']:>6} "
            f"{row['loss']:>7.3f}"
        )
        if em:
            line += f" {row['exact_match']:>5.3f}"
        if metric:
            line += f" {row[metric]:>5.3f}"
        line += f" | {_fmt_control(layer):<22} {layer_ratio:>{RATIO_WIDTH}}"
        if em:
            line += f" {layer['exact_match']:>5.3f}" if layer else f" {'-':>5}"
        line += control_accuracy(layer)
        line += f" | {_fmt_control(mag):<22} {mag_ratio:>{RATIO_WIDTH}} " + (
            f"{100 * mag['overlap']:>5.0f}%" if mag else f"{'-':>6}"
        )
        if em:
            line += f" {mag['exact_match']:>5.3f}" if mag else f" {'-':>5}"
        line += control_accuracy(mag)
        lines.append(line)
    for row in results["skipped"]:
        lines.append(f"{row['name']:<24} {row['mode']:<10} skipped: {row['reason']}")
    closed = next((row["closed_layers"] for row in results["conditions"] if row["closed_layers"]), None)
    if closed:
        effect = {"zero": "their MLP is off", "mean": "all their neurons are at their means"}.get(
            ablation["mode"], "all their neurons are scaled"
        )
        layers = f"layer {closed[0]} holds" if len(closed) == 1 else f"layers {','.join(map(str, closed))} hold"
        lines.append(f"complement: {layers} no selected neuron; {effect}")
    random = results.get("random_fraction")
    if random is not None:
        lines.append(
            f"random {100 * random['fraction']:.0f}% of all neurons ({random['neurons']}) masked: loss "
            f"{random['mean']:.3f} ± {random['std']:.3f} ({random['draws']})"
            + (f", {metric} {random[metric]:.3f}" if metric else "")
        )
    if metric:
        lines += ["", *_accuracy_table(results, metric)]
    return "\n".join(lines)


def _accuracy_table(results: dict[str, Any], metric: str) -> list[str]:
    """Liu et al.'s SST-2 table: accuracy at baseline, with the networks masked, with random
    neurons masked, and with only the networks kept."""
    base = results["baseline"]
    norm = "accuracy_norm" in base
    header = f"{'accuracy (as Liu et al.’s SST-2 table)':<46} {'neurons':>7} {metric[:8]:>8}" + (
        f" {'acc_norm':>8}" if norm else ""
    )
    lines = [header, "-" * len(header)]

    def line(label: str, neurons: Any, scored: dict[str, Any], spread: str = "") -> str:
        text = f"{label:<46} {neurons!s:>7} {scored[metric]:>8.3f}" + (
            f" {scored['accuracy_norm']:>8.3f}" if norm else ""
        )
        return text + spread

    lines.append(line("baseline (nothing masked)", 0, base))
    chance = results.get("chance")
    if chance is not None and metric == "accuracy":
        level = {metric: chance["chance"], "accuracy_norm": chance["chance"]}
        lines.append(line("chance (1/choices, mean over the records)", "-", level))
    unions = {row["mode"]: row for row in results["conditions"] if row["kind"] == "union"}
    if "key" in unions:
        row = unions["key"]
        lines.append(line(f"{row['name']} masked", row["neurons"], row))
        for control, label in (("layer_matched", "layer-matched"), ("magnitude_matched", "magnitude-matched")):
            if control in row["controls"]:
                summary = row["controls"][control]
                lines.append(line(f"  random, {label}, masked (mean of {summary['draws']})", row["neurons"], summary))
    random = results.get("random_fraction")
    if random is not None:
        lines.append(
            line(
                f"random {100 * random['fraction']:.0f}% of neurons masked (mean of {random['draws']})",
                random["neurons"],
                random,
            )
        )
    if "complement" in unions:
        row = unions["complement"]
        lines.append(line(f"{row['name']} kept, all else masked", row["neurons"], row))
        if "layer_matched" in row["controls"]:
            summary = row["controls"]["layer_matched"]
            lines.append(line(f"  random, layer-matched, kept (mean of {summary['draws']})", row["neurons"], summary))
    return lines
