"""Per-neuron activation magnitude (max |activation| over tokens), for magnitude-matched controls.

A few MLP neurons carry "massive activations" (max |activation| in the thousands where
most stay below ten); switching one off can hurt a model whatever network it is in.
The magnitude comes from an activations folder (one streamed pass over its shards,
cached by manifest digest so it is read once) or from a forward pass over the
evaluation data.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fn_analyze.activations import open_activations
from shared.arch import DownProjection
from shared.constants import MANIFEST_NAME
from shared.digests import file_digest
from shared.errors import UserError
from shared.hooks import captured_down_proj_inputs
from shared.models import ModelInfo, cache_dir

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


def magnitude_from_activations(folder: Path, model: ModelInfo) -> NeuronMagnitude:
    """Max |activation| per neuron over an activations folder recorded on `model`; cached."""
    acts = open_activations(folder)
    if acts.model.fingerprint != model.fingerprint:
        raise UserError(
            f"activations {folder} were recorded on {acts.model.name!r} (fingerprint {acts.model.fingerprint}), "
            f"not on {model.name!r} ({model.fingerprint}); give activations of the mask file's model"
        )
    digest = file_digest(acts.folder / MANIFEST_NAME).split(":", 1)[1]
    cached = cache_dir() / "magnitudes" / f"{digest}.npy"
    source = f"activations {folder} ({acts.n_tokens} tokens)"
    if cached.is_file():
        log.info("neuron magnitudes from cache %s", cached)
        return NeuronMagnitude(np.load(cached), source, acts.n_tokens)
    peak = np.zeros(acts.n_neurons, dtype=np.float32)
    for block in acts.blocks(BLOCK_ROWS):
        np.maximum(peak, np.abs(block).max(axis=0), out=peak)
    max_abs = np.full((model.n_layers, model.intermediate_size), np.nan)
    max_abs[acts.layers] = peak.reshape(len(acts.layers), acts.intermediate_size)
    _save_npy(cached, max_abs)
    return NeuronMagnitude(max_abs, source, acts.n_tokens)


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write to a temporary file and rename: a reader never loads half an array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def magnitude_from_forward(
    backbone: nn.Module, projections: list[DownProjection], batches, intermediate_size: int, source: str
) -> NeuronMagnitude:
    """Max |activation| per neuron over the real tokens of `batches` (input_ids, attention_mask)."""
    device = next(backbone.parameters()).device
    peak = torch.zeros(len(projections), intermediate_size, dtype=torch.float64)
    n_tokens = 0
    with captured_down_proj_inputs(projections) as store, torch.inference_mode():
        for batch in batches:
            real = batch.attention_mask.bool().to(device)
            backbone(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
            for p in projections:
                peak[p.layer] = torch.maximum(peak[p.layer], store[p.layer][real].abs().amax(dim=0).double().cpu())
            store.clear()
            n_tokens += int(real.sum())
    return NeuronMagnitude(peak.numpy(), f"{source} ({n_tokens} tokens)", n_tokens)
