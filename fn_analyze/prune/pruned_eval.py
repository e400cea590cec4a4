"""`fn-analyze evaluate --pruned DIR`: a pruned model next to the model it was pruned from, to random
prunings of the same count per layer, and to the same count per layer kept by importance alone.

All are scored on the same rows: answer loss, and accuracy where the data (multiple choice) or
--exact-match gives one. The random prunings (--draws, seeded by --seed) keep uniformly drawn neurons,
as many per layer as the folder's model; the importance-only pruning keeps each layer's most important
neurons by the folder's own importance scores, the networks not put first. Both are compensated as the
folder was (with the means it recorded), so the comparisons isolate which neurons were kept: against
random prunings, whether the selection matters at all; against importance alone, whether keeping the
networks first adds anything to importance. Each comparison is the pruned model's figure minus the
control's, paired by rows, with its interval (`shared.statistics.paired_difference`): over the rows for
importance alone (one pruning each, nothing drawn), over the rows and the random draws for random prunings.
The prefill tokens/s of the original and the pruned model are measured in the same run, in alternating
rounds on the data's largest batch (`fn_analyze.prune.prefill_speed`), so "faster" is a figure of this
machine and this load, not a claim.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fn_analyze.config import PrunedEvalConfig
from fn_analyze.measure.evaluate import ACCURACY_FIELDS, row_figure, score_dict
from fn_analyze.measure.scoring import Score, chance_record, check_rows_to_compare, load_eval_set, make_batches
from fn_analyze.measure.tuned import score_sets
from fn_analyze.prune.prefill_speed import prefill_speed, speed_text
from fn_analyze.prune.pruning import choose_at_random, choose_by_importance, prune_model
from shared import __version__
from shared.chance import AT_CHANCE, at_chance, chance_text
from shared.constants import EVALUATION_SCHEMA_VERSION, PRUNE_NEURONS_NAME, PRUNE_RECORD_NAME
from shared.device import choose_device, choose_dtype
from shared.errors import UserError
from shared.folders import expect
from shared.jsonio import write_json_atomic
from shared.models import load_causal_lm, load_tokenizer, model_info
from shared.paths import check_writable_file
from shared.statistics import p_text, paired_difference

IMPORTANCE_ONLY = "importance only"
RANDOM = "random pruning"


def read_prune_record(folder: Path) -> dict[str, Any]:
    """The provenance of a folder written by `fn-analyze prune`."""
    expect(folder, "--pruned", {"pruned model"}, "a pruned model", "give a folder written by `fn-analyze prune`")
    path = Path(folder) / PRUNE_RECORD_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); prune again") from exc


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate_pruned(config: PrunedEvalConfig) -> dict[str, Any]:
    """Score the original, the pruned folder, random prunings and the importance-only pruning on --dataset;
    write the results JSON at `config.out` and return it."""
    check_writable_file(config.out, "--out", config.overwrite)
    started = time.perf_counter()
    record = read_prune_record(config.pruned)
    with np.load(config.pruned / PRUNE_NEURONS_NAME) as stored:
        folder_kept = stored["kept"]
        means = stored["means"] if record["compensation"] else None
        ranked = stored["importance"] if "importance" in stored else None
    n_keep = int(folder_kept.shape[1])
    base_name = record["base_model"]
    tokenizer = load_tokenizer(base_name)
    tokenizer.padding_side = "right"
    eval_set = load_eval_set(
        config.dataset, tokenizer, config.split, config.data_format, config.template_format, config.limit,
        config.max_length,
    )  # fmt: skip
    check_rows_to_compare(eval_set)
    device = choose_device(config.device)
    dtype = choose_dtype(config.dtype, device.type)
    original = load_causal_lm(base_name, dtype, device)
    info = model_info(original, base_name)
    if info.fingerprint != record["base_fingerprint"]:
        raise UserError(
            f"{config.pruned} was pruned from a model of fingerprint {record['base_fingerprint']}, but {base_name!r} "
            f"now loads as {info.fingerprint}; evaluate where the original model is the one that was pruned"
        )

    def scored(model) -> Score:
        return score_sets(model, tokenizer, [eval_set], config)[0]

    def pruned_copy(kept: np.ndarray) -> Score:
        model = copy.deepcopy(original)
        prune_model(model, kept, means)
        return scored(model)

    original_score = scored(original)
    pruned = load_causal_lm(str(config.pruned), dtype, device)
    parameters = _parameters(pruned)
    pruned_score = scored(pruned)
    batches = make_batches(eval_set, config.batch_size, tokenizer.pad_token_id)
    largest = max(batches, key=lambda batch: batch.input_ids.numel())
    speed = prefill_speed(
        {"original": original, "pruned": pruned}, largest.input_ids, largest.attention_mask, config.speed_rounds,
        "original",
    )  # fmt: skip
    del pruned
    rows = [
        {"name": "original", "parameters": _parameters(original), **score_dict(original_score)},
        {"name": "pruned", "parameters": parameters, **score_dict(pruned_score)},
    ]
    draws = [
        pruned_copy(choose_at_random(info.n_layers, info.intermediate_size, n_keep, {}, config.seed, draw).kept)
        for draw in range(config.draws)
    ]
    losses = [d.loss for d in draws]
    random_row: dict[str, Any] = {
        "name": RANDOM,
        "parameters": parameters,
        "draws": len(draws),
        "losses": losses,
        "loss": float(np.mean(losses)),
        "loss_std": float(np.std(losses)),
    }
    drawn = [score_dict(d) for d in draws]
    random_row.update({name: float(np.mean([d[name] for d in drawn])) for name in ACCURACY_FIELDS if name in drawn[0]})
    random_row.update(
        {f"{name}_std": float(np.std([d[name] for d in drawn])) for name in ACCURACY_FIELDS if name in drawn[0]}
    )
    rows.append(random_row)
    comparisons = _comparisons(pruned_score, RANDOM, draws)
    left_out = {}
    if ranked is None:
        left_out[IMPORTANCE_ONLY] = (
            "the folder was pruned at random, by no importance"
            if record["importance"] is None
            else f"the folder's {PRUNE_NEURONS_NAME} holds no importance scores; prune again to compare with them"
        )
    else:
        kept = choose_by_importance(ranked, {}, n_keep).kept
        alone = pruned_copy(kept)
        shared = sum(len(np.intersect1d(a, b)) for a, b in zip(kept, folder_kept, strict=True)) / folder_kept.size
        # share_kept_alike: of the neurons the folder keeps, the share importance alone keeps too
        rows.append({"name": IMPORTANCE_ONLY, "parameters": parameters, "share_kept_alike": shared,
                     **score_dict(alone)})  # fmt: skip
        comparisons = _comparisons(pruned_score, IMPORTANCE_ONLY, [alone]) + comparisons
    results = {
        "schema_version": EVALUATION_SCHEMA_VERSION,
        "created_by": f"functional-networks {__version__}",
        "kind": "pruned",
        "pruned": str(config.pruned),
        "base_model": base_name,
        "keep": record["keep"],
        "intermediate_size": {"before": info.intermediate_size, "after": n_keep},
        "selection": record["selection"],
        "compensation": record["compensation"],
        "dataset": {"source": eval_set.source, "split": eval_set.split, "rows": len(eval_set.rows)},
        "chance": chance_record(eval_set, original_score),
        "rows": rows,
        "comparisons": comparisons,
        "left_out": left_out,
        "prefill_speed": speed,
        "seed": config.seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(config.out, results)
    from fn_analyze.report.folder_plots import plot_pruned  # matplotlib is imported only when a plot is drawn

    plot_pruned(results, config.plot_path)
    return results


def _comparisons(pruned: Score, control: str, scores: list[Score]) -> list[dict[str, Any]]:
    """The pruned model minus `control` (one score, or one per random draw) on the loss and the headline
    accuracy, paired by rows: a row's figure under the pruned model against the same row's under each
    control model."""
    found = []
    for figure in ("loss", pruned.headline_accuracy_name):
        if figure is None:
            continue
        values, weights = row_figure(pruned, figure)
        controls = np.stack([row_figure(s, figure)[0] for s in scores])
        arm = np.broadcast_to(values, controls.shape)
        difference = paired_difference(arm, controls, weights)
        found.append(
            {
                "arm": "pruned",
                "control": control,
                "figure": figure,
                "estimate": difference.estimate,
                "low": difference.low,
                "high": difference.high,
                "p_value": difference.p_value,
                "confidence": difference.confidence,
                "draws": difference.n_seeds,
                "rows": difference.n_rows,
                "method": difference.method,
                # a single model against a single model is no draw: the rows are all there is to resample
                "note": difference.note if control == RANDOM else None,
            }
        )
    return found


def _difference_line(comparison: dict[str, Any], base_at_chance: bool) -> str:
    """One comparison: the difference, its interval and p-value, and what it shows (on accuracy, that it is
    noise when the original model is at chance)."""
    figure, estimate = comparison["figure"], comparison["estimate"]
    digits = 4 if figure == "loss" else 3
    head = (
        f"pruned - {comparison['control']}, {figure}: {estimate:+.{digits}f} "
        f"[{comparison['low']:+.{digits}f}, {comparison['high']:+.{digits}f}], " + p_text(comparison["p_value"])
    )
    flag = f" [{AT_CHANCE}]" if figure != "loss" and base_at_chance else ""
    if comparison["p_value"] >= 1 - comparison["confidence"]:
        return f"{head}: no difference shown{flag}"
    better = estimate < 0 if figure == "loss" else estimate > 0
    return f"{head}: the pruned model does {'better' if better else 'worse'}{flag}"


def format_pruned_table(results: dict[str, Any]) -> str:
    """One row per model: parameters, answer loss (random: mean +- std over the draws) and accuracy; then
    the pruned model against each control, with intervals."""
    sizes = results["intermediate_size"]
    lines = [
        f"pruned {results['pruned']} ({sizes['before']} -> {sizes['after']} MLP neurons per layer, "
        f"{results['selection']}, compensation {'on' if results['compensation'] else 'off'}) "
        f"vs {results['base_model']} on {results['dataset']['source']} ({results['dataset']['rows']} rows)",
        f"{'model':<26} {'parameters':>12} {'loss':>16}  accuracy",
    ]
    for row in results["rows"]:
        name = row["name"] + (f" ({row['draws']} draws)" if "draws" in row else "")
        loss = f"{row['loss']:.4f}" + (f" +- {row['loss_std']:.4f}" if "loss_std" in row else "")
        accuracy = ", ".join(f"{name} {row[name]:.3f}" for name in ACCURACY_FIELDS if name in row)
        lines.append(f"{name:<26} {row['parameters']:>12,} {loss:>16}  {accuracy or '-'}")
    alone = next((row for row in results["rows"] if row["name"] == IMPORTANCE_ONLY), None)
    if alone is not None:
        lines.append(
            f"{IMPORTANCE_ONLY}: each layer's most important neurons, the networks not kept first; "
            f"{alone['share_kept_alike']:.1%} of the neurons the folder keeps are kept by it too"
        )
    lines += [f"{name}: left out, {reason}" for name, reason in results["left_out"].items()]
    chance = results["chance"]
    if chance is not None:
        lines.append(chance_text(chance, "original"))
        if chance["at_chance"]:
            lines.append(f"warning: {AT_CHANCE}")
    lines.append(speed_text(results["prefill_speed"]))
    lines.append("")
    lines += [_difference_line(comparison, at_chance(chance)) for comparison in results["comparisons"]]
    methods = {
        f"interval ({c['confidence']:.0%}) against {c['control']}: {c['method']}"
        + (f"; {c['note']}" if c["note"] else ""): None
        for c in results["comparisons"]
    }
    lines += list(methods)
    return "\n".join(lines)
