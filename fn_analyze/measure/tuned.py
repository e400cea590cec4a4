"""`fn-analyze evaluate --tuned A [B ...]`: what fine-tuning changed and what it kept, in one command.

Each fine-tuned folder (a fn-train output: tune mode's neuron deltas, a LoRA adapter or a full model;
or any fine-tuned model folder) and their common base are scored on the same rows: the training task's
held-out rows (`--dataset`) and, with `--retention`, a second dataset the tuning should not have
changed. Per dataset: answer loss (and accuracy where the data or --exact-match gives one) of the
base and of each tuned model; each folder minus the base and each folder minus each later one, paired
by row (`shared.statistics.paired_difference`), with intervals and p-values Holm-corrected over all the
run's comparisons. Several folders are what a researcher compares: the networks tuned next to random
neurons tuned alike. Each folder is one training run, so the intervals hold the rows' noise, not the
spread between training seeds (`fn-train experiment` runs seeds for that).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from itertools import combinations
from pathlib import Path
from typing import Any

from torch import nn

from fn_analyze.config import ScoringParams, TunedEvalConfig
from fn_analyze.measure.evaluate import ACCURACY_FIELDS, row_figure, score_dict
from fn_analyze.measure.scoring import (
    EvalSet,
    Score,
    chance_record,
    check_rows_to_compare,
    load_eval_set,
    make_batches,
    score,
)
from shared import __version__
from shared.chance import AT_CHANCE, at_chance, chance_text
from shared.constants import ADAPTER_CONFIG_NAME, EVALUATION_SCHEMA_VERSION, MODEL_CONFIG_NAME
from shared.data import split_prefix
from shared.device import choose_device, choose_dtype
from shared.errors import UserError
from shared.folders import expect
from shared.jsonio import write_json_atomic
from shared.models import check_model_reachable, load_causal_lm, load_tokenizer, resolve_model_path
from shared.paths import check_writable_file
from shared.statistics import adjust, paired_difference
from shared.trained import load_trained, run_record


def base_of(folder: Path, default: str) -> str:
    """The base model a fine-tuned folder names (a tune run's fn_mask.json, a LoRA adapter's config),
    else `default` (--model): a full model folder does not say what it was tuned from."""
    record = run_record(folder)
    if record is not None and record.get("base_model"):
        return str(record["base_model"])
    adapter_config = Path(folder) / ADAPTER_CONFIG_NAME
    if adapter_config.is_file():
        named = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if named:
            return str(named)
    return default


TUNED_KINDS = {"fn-train run", "checkpoint", "lora adapter", "model", "pruned model"}


def _model_config(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MODEL_CONFIG_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def check_tuned(folder: Path, model: str) -> str:
    """Refuse, in one line and before any model loads, a --tuned folder that cannot be scored next to
    its base; return the base's name. A full model folder is accepted as fine-tuned (its weights cannot
    be told from the base's cheaply) unless it is --model itself; a model whose vocabulary or
    architecture differs from its base's is refused, as the base's tokenizer would feed it tokens it
    has no embedding for."""
    expect(
        folder, "--tuned", TUNED_KINDS, "a fine-tuned run",
        "give an fn-train output folder (or one of its checkpoints), a LoRA adapter or a fine-tuned model folder",
    )  # fmt: skip
    base_name = base_of(folder, model)
    if base_name != model:  # named by the folder (a LoRA adapter, a tune run): used instead of --model
        try:
            check_model_reachable(base_name)
        except UserError as exc:
            raise UserError(f"--tuned {folder} names its base {base_name}, which cannot be loaded: {exc}") from exc
    base_path = Path(resolve_model_path(base_name))
    if base_path.is_dir() and base_path.resolve() == Path(folder).resolve():
        raise UserError(
            f"--tuned {folder} is the base model itself (--model {model}); give an fn-train output folder "
            "or a model fine-tuned from it"
        )
    tuned_config, base_config = _model_config(folder), _model_config(base_path)
    if tuned_config is not None and base_config is not None:
        for key in ("model_type", "vocab_size"):
            if tuned_config.get(key) != base_config.get(key):
                raise UserError(
                    f"--tuned {folder} is a model with {key} {tuned_config.get(key)}, but its base {base_name} has "
                    f"{base_config.get(key)}: it was not tuned from it; give the model it was tuned from as --model"
                )
    return base_name


def score_sets(model: nn.Module, tokenizer, eval_sets: list[EvalSet], config: ScoringParams) -> list[Score]:
    """`model`'s score on each eval set, with its rows' own figures, as `config` asks (exact match or not)."""
    found = []
    for eval_set in eval_sets:
        batches = make_batches(eval_set, config.batch_size, tokenizer.pad_token_id)
        choices = None
        if eval_set.choices is not None:
            choices = (eval_set.choices, make_batches(eval_set.choices, config.batch_size, tokenizer.pad_token_id))
        with_generation = config.exact_match and eval_set.has_answers
        scored = score(model, tokenizer, batches, with_generation, config.max_new_tokens, choices)[0]
        found.append(scored)
    return found


CORRECTION = "holm"
ONE_RUN = "each folder is one training run: the intervals hold the rows' noise, not the spread between training seeds"


def _labels(folders: list[Path]) -> list[str]:
    """Each folder's name, or its path where two folders share a name (or one is called base)."""
    names = [folder.name for folder in folders]
    unique = len(set(names)) == len(names) and "base" not in names
    return names if unique else [str(folder) for folder in folders]


def check_tuned_folders(folders: list[Path], model: str) -> str:
    """`check_tuned` for each folder; return their base, refused in one line when they name different ones."""
    bases = [check_tuned(folder, model) for folder in folders]
    for folder, base in zip(folders[1:], bases[1:], strict=True):
        if base != bases[0]:
            raise UserError(
                f"--tuned {folders[0]} was tuned from {bases[0]} but {folder} from {base}: the folders are compared "
                "row by row on one base's tokens; give folders tuned from the same model"
            )
    return bases[0]


def evaluate_tuned(config: TunedEvalConfig) -> dict[str, Any]:
    """Score the base and every fine-tuned folder on --dataset (and --retention); compare each folder with
    the base and with the others; write the results JSON and its figure at `config.out` and return it."""
    check_writable_file(config.out, "--out", config.overwrite)
    started = time.perf_counter()
    base_name = check_tuned_folders(config.tuned, config.model)
    tokenizer = load_tokenizer(base_name)
    tokenizer.padding_side = "right"
    roles = [("task", config.dataset, config.split)] + (
        [("retention", config.retention, None)] if config.retention is not None else []
    )
    eval_sets = [
        load_eval_set(
            source, tokenizer, split, config.data_format, config.template_format, config.limit, config.max_length
        )
        for _, source, split in roles
    ]
    for eval_set in eval_sets:
        check_rows_to_compare(eval_set)
    device = choose_device(config.device)
    dtype = choose_dtype(config.dtype, device.type)
    before = score_sets(load_causal_lm(base_name, dtype, device), tokenizer, eval_sets, config)
    after = []
    for folder in config.tuned:  # one model in memory at a time
        after.append(score_sets(load_trained(folder, dtype, str(device)), tokenizer, eval_sets, config))
        gc.collect()
    labels = _labels(config.tuned)
    datasets = []
    for index, ((role, _, _), eval_set, base) in enumerate(zip(roles, eval_sets, before, strict=True)):
        tuned = [scores[index] for scores in after]
        chance = chance_record(eval_set, base)
        datasets.append(
            {"role": role, "source": eval_set.source, "split": eval_set.split, "rows": len(eval_set.rows),
             "base": score_dict(base), "chance": chance,
             "tuned": [{"folder": label, **score_dict(s)} for label, s in zip(labels, tuned, strict=True)],
             "comparisons": _comparisons(role, base, dict(zip(labels, tuned, strict=True)), chance)}
        )  # fmt: skip
    _correct(datasets)
    results = {
        "schema_version": EVALUATION_SCHEMA_VERSION,
        "created_by": f"functional-networks {__version__}",
        "kind": "tuned",
        "base_model": base_name,
        "tuned": [str(folder) for folder in config.tuned],
        "labels": labels,
        "datasets": datasets,
        "note": ONE_RUN,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(config.out, results)
    from fn_analyze.report.folder_plots import plot_tuned  # matplotlib is imported only when a plot is drawn

    plot_tuned(results, config.plot_path)
    return results


def _comparisons(
    role: str, base: Score, tuned: dict[str, Score], chance: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Each folder minus the base, then each folder minus each later one, on the loss and the headline
    accuracy, paired by row. Their p-values are corrected later, over the whole run (`_correct`)."""
    pairs = [(label, "base") for label in tuned] + list(combinations(tuned, 2))
    found = []
    for figure in ("loss", base.headline_accuracy_name):
        if figure is None:
            continue
        for arm, control in pairs:
            values, weights = row_figure(tuned[arm], figure)
            against = row_figure(base if control == "base" else tuned[control], figure)[0]
            difference = paired_difference(values[None, :], against[None, :], weights)
            found.append(
                {"arm": arm, "control": control, "figure": figure, "measure": f"{role} {figure}",
                 "estimate": difference.estimate, "low": difference.low, "high": difference.high,
                 "p_value": difference.p_value, "confidence": difference.confidence, "rows": difference.n_rows,
                 "method": difference.method, "spread": difference.spread,
                 "base_at_chance": figure != "loss" and at_chance(chance),
                 "difference": dataclasses.replace(difference, note=None)}
            )  # fmt: skip
    return found


def _correct(datasets: list[dict[str, Any]]) -> None:
    """Holm-correct the p-values of every comparison of the run together; add each one's verdict line."""
    comparisons = [c for data in datasets for c in data["comparisons"]]
    corrected = adjust([c["p_value"] for c in comparisons], CORRECTION)
    for comparison, p in zip(comparisons, corrected, strict=True):
        difference = comparison.pop("difference")
        comparison["p_adjusted"] = p
        comparison["shown"] = bool(p < 1 - comparison["confidence"] and comparison["spread"])
        line = difference.verdict(comparison["arm"], comparison["control"], comparison["measure"], p, "Holm")
        comparison["verdict"] = line + (f" [{AT_CHANCE}]" if comparison["base_at_chance"] else "")


def format_tuned_table(results: dict[str, Any]) -> str:
    """Per dataset, the base's and each folder's answer loss (and accuracies), the chance level on
    multiple choice; then the verdicts: each folder against the base and against each other."""
    labels = results["labels"]
    width = max(len("model"), len("base"), *(len(label) for label in labels))
    lines = [f"what tuning changed and kept: {', '.join(results['tuned'])} (base {results['base_model']})"]
    for data in results["datasets"]:
        accuracies = [name for name in ACCURACY_FIELDS if name in data["base"]]
        lines += [
            "",
            f"{data['role']}: {data['source']} ({split_prefix(data['source'], data['split'])}{data['rows']} rows)",
            f"  {'model':<{width}} {'loss':>8}" + "".join(f" {name:>13}" for name in accuracies),
        ]
        for label, scored in [("base", data["base"]), *((t["folder"], t) for t in data["tuned"])]:
            lines.append(
                f"  {label:<{width}} {scored['loss']:>8.4f}" + "".join(f" {scored[name]:>13.3f}" for name in accuracies)
            )
        if data["chance"] is not None:
            chance = data["chance"]
            lines.append(f"  {chance_text(chance)}")
            if chance["at_chance"]:
                lines.append(f"  warning: {AT_CHANCE}")
    comparisons = [c for data in results["datasets"] for c in data["comparisons"]]
    confidence = comparisons[0]["confidence"] if comparisons else 0.95
    lines += [
        "",
        f"verdicts: each folder minus the base, and minus each other folder, paired by row; {confidence:.0%} interval "
        f"(not adjusted), p Holm-corrected over the {len(comparisons)} comparisons:",
        *(f"  {c['verdict']}" for c in comparisons),
        *dict.fromkeys(f"interval: {c['method']}" for c in comparisons),
        f"note: {results['note']}",
    ]
    return "\n".join(lines)
