"""What each run is measured by: the project's scoring on the task's held-out rows and on each
retention set (figures and each row's own, for the paired comparisons), the trainable parameters the
Trainer saw, and the peak memory of the training alone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from fn_analyze.measure.scoring import Batch, ChoiceSet, EvalSet, make_batches, score
from shared.chance import chance_of

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class ScoredSet:
    """A dataset ready to score: its rows in batches (and its choices', for multiple choice)."""

    key: str  # the figures' prefix: task, retention (one retention set) or retention_<file stem>
    eval_set: EvalSet
    batches: list[Batch]
    choices: tuple[ChoiceSet, list[Batch]] | None
    generate: bool  # accuracy of short answers by greedy generation

    @classmethod
    def of(cls, key: str, eval_set: EvalSet, batch_size: int, pad_id: int, generate: bool) -> ScoredSet:
        choices = None
        if eval_set.choices is not None:
            choices = (eval_set.choices, make_batches(eval_set.choices, batch_size, pad_id))
        batches = make_batches(eval_set, batch_size, pad_id)
        return cls(key, eval_set, batches, choices, generate and eval_set.has_answers and choices is None)

    def measure(self, model: nn.Module, tokenizer, max_new_tokens: int) -> tuple[dict[str, float], dict[str, Any]]:
        """({loss, accuracy}, the same row by row): accuracy is acc for multiple choice, answer contained
        in the greedy generation with `generate`, absent otherwise. Rows: `loss` and `tokens` per row,
        `accuracy` per row (or multiple-choice record), rounded for the record."""
        scored = score(model, tokenizer, self.batches, self.generate, max_new_tokens, self.choices)[0]
        assert scored.rows is not None
        figures = {"loss": scored.loss}
        rows: dict[str, Any] = {"loss": [round(v, 6) for v in scored.rows.loss], "tokens": list(scored.rows.tokens)}
        accuracy = scored.headline_accuracy_name
        if accuracy is not None:
            figures["accuracy"] = getattr(scored, accuracy)
            rows["accuracy"] = list(getattr(scored.rows, accuracy))
        return figures, rows

    def describe(self) -> dict[str, Any]:
        if self.choices is not None:
            accuracy = "acc"
        elif self.generate:
            accuracy = "answer contained"
        else:
            accuracy = None
        plain = not self.eval_set.has_answers
        described = {"source": self.eval_set.source, "split": self.eval_set.split, "rows": len(self.eval_set.rows),
                     "accuracy": accuracy, "plain_text": plain}  # fmt: skip
        if self.choices is not None:
            counts = self.choices[0].counts
            described.update(chance=chance_of(counts), choice_records=len(counts))
        return described


def measure_model(
    model: nn.Module, tokenizer, sets: list[ScoredSet], max_new_tokens: int
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """`<key>_loss` and `<key>_accuracy` of every set, and each set's rows' own figures by key."""
    figures: dict[str, float] = {}
    rows: dict[str, dict[str, Any]] = {}
    for scored_set in sets:
        measured, rows[scored_set.key] = scored_set.measure(model, tokenizer, max_new_tokens)
        for name, value in measured.items():
            figures[f"{scored_set.key}_{name}"] = value
    return figures, rows


class TrainableCount(TrainerCallback):
    """The parameters that train, counted as training begins (LoRA, tune mode's deltas or the whole model)."""

    def __init__(self) -> None:
        self.count: int | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        if model is not None:
            self.count = sum(p.numel() for p in model.parameters() if p.requires_grad)


def reset_peak_memory(device: torch.device) -> None:
    """Start a run's peak afresh: CUDA's allocator statistics, or the process's peak resident set
    (Linux resets VmHWM to the current RSS when "5" is written to clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _PROC_CLEAR_REFS.exists():
        _PROC_CLEAR_REFS.write_text("5")


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(the peak since `reset_peak_memory` in MiB, what it measures)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    match = re.search(r"VmHWM:\s+(\d+) kB", _PROC_STATUS.read_text()) if _PROC_STATUS.exists() else None
    if match:
        return int(match.group(1)) / 1024, "peak resident set of the process (VmHWM)"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak resident set since the process began"
