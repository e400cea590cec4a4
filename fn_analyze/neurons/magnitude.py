"""Per-neuron statistics of the MLP neurons' activations (the down-projection input) over real
tokens, in one pass: max |activation| (magnitude, for magnitude-matched controls), mean (for mean
ablation, `shared.ablation`) and mean square (with the mean, the moments pruning ranks neurons by,
`fn_analyze.prune.importance`). A pass computes only the statistics asked for.

A few MLP neurons carry "massive activations" (max |activation| in the thousands where most stay
below ten); switching one off can hurt a model whatever network it is in.

The statistics come from an activations folder (one streamed pass over its shards that keeps
per-neuron maxima and float64 sums, never the matrix) or from a forward pass over data.

The cache: a folder's statistics are kept under FN_CACHE_DIR/neuron-stats/, one file per statistic,
named by what was measured: the digest of the folder's manifest (which tokens, on which model) and
the statistic (`<digest>-mean.npy`). Every call reads the cache; only a call with `cache=True` writes
what it computed (the commands: evaluate, prune, fn-train's --means-from, the experiment), so a
library fit (NetworkICA) writes nothing. A forward pass is not cached: its data and model vary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fn_analyze.record.activations import open_activations
from shared.ablation import NeuronMeans
from shared.arch import DownProjection
from shared.constants import MANIFEST_NAME
from shared.digests import file_digest
from shared.errors import UserError
from shared.hooks import captured_down_proj_inputs
from shared.jsonio import atomic_file
from shared.masks import ModelInfo
from shared.models import cache_dir

log = logging.getLogger(__name__)

BLOCK_ROWS = 2048  # token rows per block read from the shards

Statistic = Literal["max_abs", "mean", "mean_square"]
STATISTICS: tuple[Statistic, ...] = ("max_abs", "mean", "mean_square")


@dataclass(frozen=True)
class NeuronMagnitude:
    max_abs: np.ndarray  # (n_layers, intermediate_size) float64; NaN for layers not measured
    source: str  # where it was measured, for the report
    n_tokens: int

    def measured_layers(self) -> list[int]:
        return [layer for layer in range(self.max_abs.shape[0]) if not np.isnan(self.max_abs[layer]).any()]

    def top(self, n: int) -> set[tuple[int, int]]:
        """The `n` largest-magnitude (layer, neuron) pairs over all measured layers."""
        flat = np.nan_to_num(self.max_abs, nan=-1.0).ravel()
        order = np.argsort(flat, kind="stable")[::-1][:n]
        width = self.max_abs.shape[1]
        return {(int(i) // width, int(i) % width) for i in order if flat[i] >= 0}

    def bins(self, width: float) -> np.ndarray:
        """Per-neuron bin of log10 magnitude, `width` decades wide (dead neurons share one bin)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log10(np.nan_to_num(self.max_abs, nan=0.0))
        bins = np.floor(logs / width)
        return np.where(np.isfinite(bins), bins, np.iinfo(np.int32).min).astype(np.int64)


@dataclass(frozen=True)
class NeuronStats:
    """Statistics of every neuron over the real tokens of some data, each (n_layers, intermediate_size)
    float64 with NaN for layers not measured; a statistic not asked for is None."""

    max_abs: np.ndarray | None
    mean: np.ndarray | None
    mean_square: np.ndarray | None
    source: str  # where they were measured, for the report and the provenance records
    n_tokens: int

    def need(self, statistic: Statistic) -> np.ndarray:
        values = getattr(self, statistic)
        if values is None:
            raise ValueError(f"{statistic} was not measured; ask for it in the pass that made these statistics")
        return values

    def magnitude(self) -> NeuronMagnitude:
        return NeuronMagnitude(self.need("max_abs"), self.source, self.n_tokens)

    def means(self) -> NeuronMeans:
        """The means as mean ablation takes them (`shared.ablation`)."""
        return NeuronMeans(self.need("mean").astype(np.float32), self.source, self.n_tokens)

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.need("mean_square") - self.need("mean") ** 2, 0.0)


def _stats(values: dict[Statistic, np.ndarray], source: str, n_tokens: int) -> NeuronStats:
    return NeuronStats(values.get("max_abs"), values.get("mean"), values.get("mean_square"), source, n_tokens)


def stats_from_activations(
    folder: Path, model: ModelInfo, wanted: Iterable[Statistic], *, cache: bool = False
) -> NeuronStats:
    """The statistics `wanted` over an activations folder recorded on `model`: those in the cache read
    from it, the others from one streamed pass over the shards (written to the cache with `cache`)."""
    acts = open_activations(folder)
    if acts.model.fingerprint != model.fingerprint:
        raise UserError(
            f"activations {folder} were recorded on {acts.model.name!r} (fingerprint {acts.model.fingerprint}), "
            f"not on {model.name!r} ({model.fingerprint}); give activations of {model.name!r}"
        )
    digest = file_digest(acts.folder / MANIFEST_NAME).split(":", 1)[1]
    cached = {name: cache_dir() / "neuron-stats" / f"{digest}-{name}.npy" for name in STATISTICS}
    wanted = list(dict.fromkeys(wanted))
    found = {name: np.load(cached[name]) for name in wanted if cached[name].is_file()}
    for name in found:
        log.info("neuron %s from cache %s", name, cached[name])
    missing = [name for name in wanted if name not in found]
    if missing:
        sums = {name: np.zeros(acts.n_neurons, dtype=np.float64) for name in missing}
        for block in acts.blocks(BLOCK_ROWS):
            if "max_abs" in sums:
                np.maximum(sums["max_abs"], np.abs(block).max(axis=0), out=sums["max_abs"])
            if "mean" in sums or "mean_square" in sums:
                wide = block.astype(np.float64)
                if "mean" in sums:
                    sums["mean"] += wide.sum(axis=0)
                if "mean_square" in sums:
                    sums["mean_square"] += (wide * wide).sum(axis=0)
        count = max(acts.n_tokens, 1)
        for name, flat in sums.items():
            full = np.full((model.n_layers, model.intermediate_size), np.nan)
            per_token = flat if name == "max_abs" else flat / count
            full[acts.layers] = per_token.reshape(len(acts.layers), acts.intermediate_size)  # the manifest's order
            if cache:
                with atomic_file(cached[name]) as handle:
                    np.save(handle, full)
            found[name] = full
    return _stats(found, f"activations {folder} ({acts.n_tokens} tokens)", acts.n_tokens)


def stats_from_forward(
    backbone: nn.Module, projections: list[DownProjection], batches: Iterable[Any], source: str,
    wanted: Iterable[Statistic],
) -> NeuronStats:  # fmt: skip
    """The statistics `wanted` over the real tokens of `batches` (anything with input_ids and
    attention_mask; padding is left out), in one pass of `backbone`."""
    wanted = set(wanted)
    device = next(backbone.parameters()).device
    shape = (len(projections), projections[0].in_features)
    sums = {name: torch.zeros(shape, dtype=torch.float64) for name in STATISTICS if name in wanted}
    n_tokens = 0
    with captured_down_proj_inputs(projections) as store, torch.inference_mode():
        for batch in batches:
            real = batch.attention_mask.bool().to(device)
            backbone(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
            for p in projections:
                rows = store[p.layer][real]
                if "max_abs" in sums:
                    peak = rows.abs().amax(dim=0).double().cpu()
                    sums["max_abs"][p.layer] = torch.maximum(sums["max_abs"][p.layer], peak)
                if "mean" in sums or "mean_square" in sums:
                    wide = rows.double()
                    if "mean" in sums:
                        sums["mean"][p.layer] += wide.sum(dim=0).cpu()
                    if "mean_square" in sums:
                        sums["mean_square"][p.layer] += (wide * wide).sum(dim=0).cpu()
            store.clear()
            n_tokens += int(real.sum())
    if n_tokens == 0:
        raise UserError(f"{source} holds no token to measure the neurons on; give more data")
    values = {name: (total if name == "max_abs" else total / n_tokens).numpy() for name, total in sums.items()}
    return _stats(values, f"{source} ({n_tokens} tokens)", n_tokens)


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def stats_from_sequences(
    model: nn.Module,
    projections: list[DownProjection],
    sequences: list[list[int]],
    source: str,
    wanted: Iterable[Statistic],
    batch_size: int = 8,
    pad_id: int = 0,
) -> NeuronStats:
    """The statistics `wanted` over token-id sequences (e.g. the tokenized training rows), right-padded
    into batches; the model runs in eval mode (no dropout) and is put back."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        batches.append(TokenBatch(ids, mask))
    was_training = model.training
    model.eval()
    try:
        return stats_from_forward(model, projections, batches, source, wanted)
    finally:
        model.train(was_training)
