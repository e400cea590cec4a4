"""How much each MLP neuron matters to its block's output, for pruning.

A neuron j of a layer adds a_j * w_j to the block's output (a_j: its down-projection input,
w_j: its down-projection column). Removing it changes the output by

- a_j * w_j when it is simply cut (`--no-compensate`): expected squared size E[a_j^2] |w_j|^2;
- (a_j - mean_j) * w_j when its mean contribution mean_j * w_j moves into the bias (compensated):
  expected squared size Var(a_j) |w_j|^2, FLAP's fluctuation metric (An et al., AAAI 2024).

The importance of a neuron is that expected squared change, each neuron taken on its own; pruning
keeps the largest. Both need the first two moments of every neuron's activation over real tokens,
from an activations folder (one streamed pass, float64 sums, cached by manifest digest) or a
forward pass over data.
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
from shared.arch import DownProjection, base_layer
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
class NeuronMoments:
    """Mean and mean square of every neuron's activation over some tokens."""

    mean: np.ndarray  # (n_layers, intermediate_size) float64
    mean_square: np.ndarray  # (n_layers, intermediate_size) float64
    source: str  # where they were measured, for the provenance record
    n_tokens: int

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.mean_square - self.mean**2, 0.0)

    def means(self) -> NeuronMeans:
        """The means as mean ablation takes them (`shared.ablation`)."""
        return NeuronMeans(self.mean.astype(np.float32), self.source, self.n_tokens)


def importance(moments: NeuronMoments, projections: list[DownProjection], compensated: bool) -> np.ndarray:
    """(n_layers, intermediate_size) expected squared change of a block's output when the neuron alone
    is removed: Var(a) |w|^2 when its mean is compensated, E[a^2] |w|^2 when it is cut."""
    spread = moments.variance if compensated else moments.mean_square
    norms = np.stack([column_norms_squared(p) for p in projections])
    return spread * norms


def column_norms_squared(projection: DownProjection) -> np.ndarray:
    """|w_j|^2 of every neuron's down-projection column (float64)."""
    weight = base_layer(projection.module).weight.detach().double()
    axis = 0 if projection.orientation == "linear" else 1  # Linear weight is (out, in); Conv1D's is (in, out)
    return (weight**2).sum(dim=axis).cpu().numpy()


def moments_from_activations(folder: Path, model: ModelInfo) -> NeuronMoments:
    """The moments over an activations folder recorded on `model` with every layer; cached."""
    acts = open_activations(folder)
    if acts.model.fingerprint != model.fingerprint:
        raise UserError(
            f"activations {folder} were recorded on {acts.model.name!r} (fingerprint {acts.model.fingerprint}), "
            f"not on {model.name!r} ({model.fingerprint}); give activations of the model being pruned"
        )
    missing = sorted(set(range(model.n_layers)) - set(acts.layers))
    if missing:
        raise UserError(
            f"activations {folder} lack layer {missing[0]}, and pruning ranks the neurons of every layer; "
            "collect every layer, or give --dataset to measure on data"
        )
    digest = file_digest(acts.folder / MANIFEST_NAME).split(":", 1)[1]
    cached = cache_dir() / "moments" / f"{digest}.npz"
    source = f"activations {folder} ({acts.n_tokens} tokens)"
    if cached.is_file():
        log.info("neuron moments from cache %s", cached)
        with np.load(cached) as stored:
            return NeuronMoments(stored["mean"], stored["mean_square"], source, acts.n_tokens)
    total = np.zeros(acts.n_neurons, dtype=np.float64)
    squares = np.zeros(acts.n_neurons, dtype=np.float64)
    for block in acts.blocks(BLOCK_ROWS):
        wide = block.astype(np.float64)
        total += wide.sum(axis=0)
        squares += (wide * wide).sum(axis=0)
    count = max(acts.n_tokens, 1)
    mean, mean_square = (np.empty((model.n_layers, model.intermediate_size)) for _ in range(2))
    mean[acts.layers] = (total / count).reshape(len(acts.layers), -1)  # columns are in the manifest's layer order
    mean_square[acts.layers] = (squares / count).reshape(len(acts.layers), -1)
    with atomic_file(cached) as handle:
        np.savez(handle, mean=mean, mean_square=mean_square)
    return NeuronMoments(mean, mean_square, source, acts.n_tokens)


def moments_from_forward(backbone: nn.Module, projections: list[DownProjection], batches, source: str) -> NeuronMoments:
    """The moments over the real tokens of `batches` (anything with input_ids and attention_mask)."""
    device = next(backbone.parameters()).device
    width = projections[0].in_features
    total = torch.zeros(len(projections), width, dtype=torch.float64)
    squares = torch.zeros(len(projections), width, dtype=torch.float64)
    n_tokens = 0
    with captured_down_proj_inputs(projections) as store, torch.inference_mode():
        for batch in batches:
            real = batch.attention_mask.bool().to(device)
            backbone(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
            for p in projections:
                rows = store[p.layer][real].double().cpu()
                total[p.layer] += rows.sum(dim=0)
                squares[p.layer] += (rows * rows).sum(dim=0)
            store.clear()
            n_tokens += int(real.sum())
    if n_tokens == 0:
        raise UserError(f"{source} holds no token to measure the neurons on; give more data")
    return NeuronMoments(
        (total / n_tokens).numpy(), (squares / n_tokens).numpy(), f"{source} ({n_tokens} tokens)", n_tokens
    )
