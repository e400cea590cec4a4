"""`fn-analyze evaluate --tuned DIR`: what fine-tuning changed and what it kept, in one command.

The fine-tuned folder (a fn-train output: tune mode's neuron deltas, a LoRA adapter or a full model;
or any fine-tuned model folder) and its base are scored on the same rows: the training task's
held-out rows (`--dataset`) and, with `--retention`, a second dataset the tuning should not have
changed. Per dataset: answer loss (and accuracy where the data or --exact-match gives one) of the
base and of the tuned model, and the change.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from torch import nn

from fn_analyze.config import ScoringParams, TunedEvalConfig
from fn_analyze.measure.evaluate import ACCURACY_FIELDS, score_dict
from fn_analyze.measure.scoring import EvalSet, Score, load_eval_set, make_batches, score
from shared import __version__
from shared.constants import ADAPTER_CONFIG_NAME, EVALUATION_SCHEMA_VERSION, MODEL_CONFIG_NAME
from shared.device import choose_device, choose_dtype
from shared.errors import UserError
from shared.folders import expect
from shared.jsonio import write_json_atomic
from shared.models import check_model_reachable, load_causal_lm, load_tokenizer, resolve_model_path
from shared.paths import check_writable_file
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


def evaluate_tuned(config: TunedEvalConfig) -> dict[str, Any]:
    """Score the base and the fine-tuned folder on --dataset (and --retention); write the results JSON
    at `config.out` and return it."""
    check_writable_file(config.out, "--out", config.overwrite)
    started = time.perf_counter()
    base_name = check_tuned(config.tuned, config.model)
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
    device = choose_device(config.device)
    dtype = choose_dtype(config.dtype, device.type)
    before = [score_dict(s) for s in score_sets(load_causal_lm(base_name, dtype, device), tokenizer, eval_sets, config)]
    after = [
        score_dict(s) for s in score_sets(load_trained(config.tuned, dtype, str(device)), tokenizer, eval_sets, config)
    ]
    datasets = []
    for (role, _, _), eval_set, base, tuned in zip(roles, eval_sets, before, after, strict=True):
        change = {"loss": tuned["loss"] - base["loss"]}
        change.update({name: tuned[name] - base[name] for name in ACCURACY_FIELDS if name in base})
        datasets.append(
            {"role": role, "source": eval_set.source, "split": eval_set.split, "rows": len(eval_set.rows),
             "base": base, "tuned": tuned, "change": change}
        )  # fmt: skip
    results = {
        "schema_version": EVALUATION_SCHEMA_VERSION,
        "created_by": f"functional-networks {__version__}",
        "kind": "tuned",
        "base_model": base_name,
        "tuned": str(config.tuned),
        "datasets": datasets,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(config.out, results)
    return results


def format_tuned_table(results: dict[str, Any]) -> str:
    """One row per dataset: base and tuned answer loss (and accuracy), and the change."""
    width = max(len("dataset"), *(len(row["source"]) for row in results["datasets"]))
    lines = [
        f"what tuning changed and kept: {results['tuned']} (base {results['base_model']})",
        f"{'dataset':<{width}} {'role':<10} {'rows':>5} {'base loss':>10} {'tuned loss':>11} {'change':>8}  accuracy",
    ]
    for row in results["datasets"]:
        accuracy = ", ".join(
            f"{name} {row['base'][name]:.3f} -> {row['tuned'][name]:.3f}"
            for name in ACCURACY_FIELDS
            if name in row["base"]
        )
        lines.append(
            f"{row['source']:<{width}} {row['role']:<10} {row['rows']:>5} {row['base']['loss']:>10.4f} "
            f"{row['tuned']['loss']:>11.4f} {row['change']['loss']:>+8.4f}  {accuracy or '-'}"
        )
    return "\n".join(lines)
