"""Token rows that are never stored: the ICA's passes run the model over the data instead of
reading an activations folder back.

At 1-8B parameters the recorded rows are 0.26-0.92 MB per token, and the reduction reads them
15-20 times; on a GPU a forward pass over the same tokens costs less than reading them back, and
nothing but the reduced matrices touches the disk (what EleutherAI's sparsify does). The rows are
the ones `collect` would record from the same arguments: the same records, batches, token sample
and budget, rounded to float16 as collect stores them, so the ICA finds what collect-then-ica finds.

The reduction sums over "shards": here each is a run of `RUN_BATCHES` batches of records, whose
rows are recomputed on every pass (the moments', each product's, the set-aside's magnitudes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fn_analyze.config import CollectConfig
from fn_analyze.record.collect import CollectPlan, Recorder, Recording, load_recording, plan_records
from shared.masks import ModelInfo
from shared.models import check_model_reachable

RUN_BATCHES = 16  # batches of records per run (the unit each pass sums over, as a shard is for a folder)


@dataclass(frozen=True, eq=False)
class RecordRun:
    """A run of whole batches of records and the rows recorded from them, recomputed on each read."""

    recorder: Recorder
    chosen: list[int]  # record indices, in order
    n_tokens: int
    n_columns: int
    _records: np.ndarray
    _positions: np.ndarray
    _token_ids: np.ndarray
    value_bytes = 2  # float16, as collect would write them

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        """Each batch's rows (float16, on the host), in record order; `block_rows` is the model's
        batch size here: a batch is computed whole."""
        copier = self.recorder.copier
        with copier.installed(), torch.inference_mode():
            for rows, _ in self.recorder.device_rows(self.chosen, 0, len(self.chosen), self.n_tokens):
                yield rows.cpu().numpy()

    def records(self) -> np.ndarray:
        return self._records

    def positions(self) -> np.ndarray:
        return self._positions

    def token_ids(self) -> np.ndarray:
        return self._token_ids


@dataclass(frozen=True, eq=False)
class ModelRows:
    """A model and a dataset, read as token rows x (layers x intermediate neurons), layer-major as
    in an activations folder."""

    plan: CollectPlan
    recording: Recording
    runs: tuple[RecordRun, ...]

    @property
    def model(self) -> ModelInfo:
        return self.recording.info

    @property
    def layers(self) -> list[int]:
        return self.recording.layers

    @property
    def intermediate_size(self) -> int:
        return self.recording.info.intermediate_size

    @property
    def n_neurons(self) -> int:
        return self.recording.n_columns

    @property
    def n_tokens(self) -> int:
        return sum(run.n_tokens for run in self.runs)

    def column_to_neuron(self, column: int) -> tuple[int, int]:
        """(layer, neuron) of a column."""
        return self.layers[column // self.intermediate_size], column % self.intermediate_size

    def describe(self) -> str:
        return f"model {self.model.name} over {self.plan.config.dataset}"

    def record(self) -> dict[str, Any]:
        """What a mask file's `source.activations` says of the rows: the dataset as a manifest says
        it, the token sample, and that no folder was written."""
        return {
            "recomputed_from_model": True,
            "n_tokens": self.n_tokens,
            "layers": self.layers,
            "sample": self.plan.sample.to_dict(),
            "max_tokens": self.plan.config.max_tokens,
            "max_length": self.plan.config.max_length,
            "dataset": self.plan.dataset_record,
        }


def model_rows(config: CollectConfig, model: torch.nn.Module | None = None, tokenizer: Any = None) -> ModelRows:
    """The rows `collect(config)` would record, as a source the ICA reads without a folder
    (`config.out` is not used). The model is loaded here unless given, and the records are
    tokenized and their tokens chosen once, without running the model."""
    if model is None or tokenizer is None:
        check_model_reachable(config.model)
    plan = plan_records(config, tokenizer)
    recording = load_recording(plan, model)
    recorder = recording.recorder
    everything = list(range(len(plan.sequences)))
    per_run = RUN_BATCHES * recorder.batch_size
    runs, taken = [], 0
    for first in range(0, len(everything), per_run):
        budget = None if config.max_tokens is None else config.max_tokens - taken
        if budget is not None and budget <= 0:
            break
        chosen = everything[first : first + per_run]
        picked = list(recorder.selections(chosen, 0, len(chosen), budget))
        if not picked:
            continue
        records, positions, ids = (
            np.concatenate([getattr(p, name) for p in picked]) for name in ("record", "position", "ids")
        )
        runs.append(
            RecordRun(recorder, chosen, len(records), recording.n_columns, records.astype(np.int64), positions, ids)
        )
        taken += len(records)
    return ModelRows(plan, recording, tuple(runs))
