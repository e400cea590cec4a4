"""`fn-analyze evaluate --pruned DIR`: a pruned model next to the model it was pruned from and to
random prunings of the same count per layer.

The three are scored on the same rows: answer loss, and accuracy where the data (multiple choice) or
--exact-match gives one. The random prunings (--draws, seeded by --seed) keep uniformly drawn neurons,
as many per layer as the folder's model, and are compensated as it was (with the means it recorded),
so the comparison isolates which neurons were kept.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fn_analyze.config import EvaluateConfig
from fn_analyze.evaluate import ACCURACY_FIELDS
from fn_analyze.prune import choose_at_random, prune_model
from fn_analyze.scoring import load_eval_set
from fn_analyze.tuned import _scores
from shared import __version__
from shared.constants import EVALUATION_SCHEMA_VERSION, PRUNE_NEURONS_NAME, PRUNE_RECORD_NAME
from shared.device import choose_device, choose_dtype
from shared.errors import UserError
from shared.jsonio import write_json_atomic
from shared.models import load_causal_lm, load_tokenizer, model_info


def read_prune_record(folder: Path) -> dict[str, Any]:
    """The provenance of a folder written by `fn-analyze prune`."""
    path = Path(folder) / PRUNE_RECORD_NAME
    if not path.is_file():
        raise UserError(f"--pruned {folder} holds no {PRUNE_RECORD_NAME}; give a folder written by `fn-analyze prune`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); prune again") from exc


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate_pruned(config: EvaluateConfig) -> dict[str, Any]:
    """Score the original, the pruned folder and random prunings on --dataset; write the results JSON at
    `config.out` and return it."""
    assert config.pruned is not None
    started = time.perf_counter()
    record = read_prune_record(config.pruned)
    with np.load(config.pruned / PRUNE_NEURONS_NAME) as stored:
        n_keep = int(stored["kept"].shape[1])
        means = stored["means"] if record["compensation"] else None
    base_name = record["base_model"]
    tokenizer = load_tokenizer(base_name)
    tokenizer.padding_side = "right"
    eval_set = load_eval_set(
        config.dataset, tokenizer, config.split, config.data_format, config.template_format, config.limit,
        config.max_length,
    )  # fmt: skip
    device = choose_device(config.device)
    dtype = choose_dtype(config.dtype, device.type)
    original = load_causal_lm(base_name, dtype, device)
    info = model_info(original, base_name)
    if info.fingerprint != record["base_fingerprint"]:
        raise UserError(
            f"{config.pruned} was pruned from a model of fingerprint {record['base_fingerprint']}, but {base_name!r} "
            f"now loads as {info.fingerprint}; evaluate where the original model is the one that was pruned"
        )
    rows = [
        {"name": "original", "parameters": _parameters(original), **_scores(original, tokenizer, [eval_set], config)[0]}
    ]
    pruned = load_causal_lm(str(config.pruned), dtype, device)
    rows.append(
        {"name": "pruned", "parameters": _parameters(pruned), **_scores(pruned, tokenizer, [eval_set], config)[0]}
    )
    del pruned
    draws = []
    for draw in range(config.draws):
        model = copy.deepcopy(original)
        kept = choose_at_random(info.n_layers, info.intermediate_size, n_keep, {}, config.seed, draw).kept
        prune_model(model, kept, means)
        draws.append(_scores(model, tokenizer, [eval_set], config)[0])
    losses = [d["loss"] for d in draws]
    random_row: dict[str, Any] = {
        "name": "random pruning",
        "parameters": rows[1]["parameters"],
        "draws": len(draws),
        "losses": losses,
        "loss": float(np.mean(losses)),
        "loss_std": float(np.std(losses)),
    }
    random_row.update({name: float(np.mean([d[name] for d in draws])) for name in ACCURACY_FIELDS if name in draws[0]})
    rows.append(random_row)
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
        "rows": rows,
        "seed": config.seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(config.out, results)
    return results


def format_pruned_table(results: dict[str, Any]) -> str:
    """One row per model: parameters, answer loss (random: mean +- std over the draws) and accuracy."""
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
    return "\n".join(lines)
