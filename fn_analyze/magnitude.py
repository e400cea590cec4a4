"""Per-neuron activation statistics: magnitude (max |activation| over tokens), for
magnitude-matched controls, and mean, for mean ablation (`shared.ablation`).

A few MLP neurons carry "massive activations" (max |activation| in the thousands where
most stay below ten); switching one off can hurt a model whatever network it is in.
Both statistics come from an activations folder (one streamed pass over its shards that
keeps per-neuron maxima and float64 sums, never the matrix) or from a forward pass over data.
A folder's statistics are cached by manifest digest under FN_CACHE_DIR, so that the runs that
ask (`cache=True`: evaluate, fn-train's --means-from, the experiment) read it once; the cache is
read by every call and written only by those, so a library fit (NetworkICA) writes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fn_analyze.activations import open_activations
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


def magnitude_from_activations(folder: Path, model: ModelInfo, *, cache: bool = False) -> NeuronMagnitude:
    """Max |activation| per neuron over an activations folder recorded on `model` (cached with `cache`)."""
    return activation_stats(folder, model, want_means=False, cache=cache)[0]


def means_from_activations(folder: Path, model: ModelInfo, *, cache: bool = False) -> NeuronMeans:
    """Mean activation per neuron over an activations folder recorded on `model` (cached with `cache`)."""
    means = activation_stats(folder, model, want_magnitude=False, cache=cache)[1]
    assert means is not None
    return means


def activation_stats(
    folder: Path, model: ModelInfo, want_magnitude: bool = True, want_means: bool = True, *, cache: bool = False
) -> tuple[NeuronMagnitude | None, NeuronMeans | None]:
    """The statistics asked for, from the cache or from one streamed pass over the shards, whose
    results are written to the cache only with `cache`."""
    acts = open_activations(folder)
    if acts.model.fingerprint != model.fingerprint:
        raise UserError(
            f"activations {folder} were recorded on {acts.model.name!r} (fingerprint {acts.model.fingerprint}), "
            f"not on {model.name!r} ({model.fingerprint}); give activations of the mask file's model"
        )
    digest = file_digest(acts.folder / MANIFEST_NAME).split(":", 1)[1]
    cached = {"max_abs": cache_dir() / "magnitudes" / f"{digest}.npy", "mean": cache_dir() / "means" / f"{digest}.npy"}
    wanted = [name for name, want in (("max_abs", want_magnitude), ("mean", want_means)) if want]
    found = {name: np.load(cached[name]) for name in wanted if cached[name].is_file()}
    for name in found:
        log.info("neuron %s from cache %s", name, cached[name])
    missing = [name for name in wanted if name not in found]
    if missing:
        peak = np.zeros(acts.n_neurons, dtype=np.float32)
        total = np.zeros(acts.n_neurons, dtype=np.float64)
        for block in acts.blocks(BLOCK_ROWS):
            if "max_abs" in missing:
                np.maximum(peak, np.abs(block).max(axis=0), out=peak)
            if "mean" in missing:
                total += block.sum(axis=0, dtype=np.float64)
        for name, flat in (("max_abs", peak), ("mean", total / max(acts.n_tokens, 1))):
            if name in missing:
                full = np.full((model.n_layers, model.intermediate_size), np.nan)
                full[acts.layers] = flat.reshape(len(acts.layers), acts.intermediate_size)
                if cache:
                    with atomic_file(cached[name]) as handle:
                        np.save(handle, full)
                found[name] = full
    source = f"activations {folder} ({acts.n_tokens} tokens)"
    magnitude = NeuronMagnitude(found["max_abs"], source, acts.n_tokens) if want_magnitude else None
    means = NeuronMeans(found["mean"].astype(np.float32), source, acts.n_tokens) if want_means else None
    return magnitude, means


def magnitude_from_forward(
    backbone: nn.Module, projections: list[DownProjection], batches, intermediate_size: int, source: str
) -> NeuronMagnitude:
    """Max |activation| per neuron over the real tokens of `batches` (input_ids, attention_mask)."""
    return stats_from_forward(backbone, projections, batches, intermediate_size, source)[0]


def stats_from_forward(
    backbone: nn.Module, projections: list[DownProjection], batches, intermediate_size: int, source: str
) -> tuple[NeuronMagnitude, NeuronMeans]:
    """Max |activation| and mean activation per neuron over the real tokens of `batches`
    (anything with input_ids and attention_mask), in one pass."""
    device = next(backbone.parameters()).device
    peak = torch.zeros(len(projections), intermediate_size, dtype=torch.float64)
    total = torch.zeros(len(projections), intermediate_size, dtype=torch.float64)
    n_tokens = 0
    with captured_down_proj_inputs(projections) as store, torch.inference_mode():
        for batch in batches:
            real = batch.attention_mask.bool().to(device)
            backbone(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
            for p in projections:
                rows = store[p.layer][real]
                peak[p.layer] = torch.maximum(peak[p.layer], rows.abs().amax(dim=0).double().cpu())
                total[p.layer] += rows.double().sum(dim=0).cpu()
            store.clear()
            n_tokens += int(real.sum())
    described = f"{source} ({n_tokens} tokens)"
    means = (total / max(n_tokens, 1)).numpy().astype(np.float32)
    return NeuronMagnitude(peak.numpy(), described, n_tokens), NeuronMeans(means, described, n_tokens)


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def stats_from_sequences(
    model: nn.Module,
    projections: list[DownProjection],
    sequences: list[list[int]],
    intermediate_size: int,
    source: str,
    batch_size: int = 8,
    pad_id: int = 0,
) -> tuple[NeuronMagnitude, NeuronMeans]:
    """Max |activation| and mean activation per neuron over token-id sequences (e.g. the tokenized
    training rows), right-padded into batches; the model runs in eval mode (no dropout) and is put back."""
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
        return stats_from_forward(model, projections, batches, intermediate_size, source)
    finally:
        model.train(was_training)


def means_from_sequences(
    model: nn.Module,
    projections: list[DownProjection],
    sequences: list[list[int]],
    intermediate_size: int,
    source: str,
    batch_size: int = 8,
    pad_id: int = 0,
) -> NeuronMeans:
    """Mean activation per neuron over token-id sequences (see `stats_from_sequences`)."""
    return stats_from_sequences(model, projections, sequences, intermediate_size, source, batch_size, pad_id)[1]
