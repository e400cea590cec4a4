"""A network's activity on each token: the one definition every view of it uses (cards, the report).

For network N with member neurons i (layer, neuron) and weights w_i, the activity on token t is

    a_N(t) = sum_i w_i (x_ti - mu_i) / sum_i w_i^2

where x_ti is the neuron's activation (the input of its layer's MLP down-projection, as `collect`
records it) and mu_i its mean over the tokens the activity is computed on. The weights are the
neurons' signed z in the network's ICA map (`Network.z`), so a_N(t) is the least-squares
coefficient of the token's centered activations on the network's map restricted to its neurons:
its time course, in activation units (a token whose centered activations equal c * w has
activity c). A group without a map (the set-aside `massive` neurons, or a file written before z
was recorded) weighs each neuron +-1, the sign of its largest-magnitude activation over the same
tokens, so each neuron counts in the direction it is large in; its activity is then the mean of its
neurons' sign-aligned centered activations.

Centering only shifts a_N by a constant (sum_i w_i mu_i / sum_i w_i^2), so one pass over the rows
suffices: the uncentered projection per token, minus its mean. The rows are any `TokenRows`: an
activations folder, an array in memory, or a model run over a dataset (`model_rows`), each with
the token id, record and position of every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fn_analyze.record.token_rows import ActivationMatrix, TokenRows, describe_source, read_source, shards_of
from shared.errors import UserError
from shared.masks import MaskFile, Network, NetworkId, check_compatible

BLOCK_ROWS = 2048  # token rows per block read


@dataclass(frozen=True)
class TokenActivity:
    """Every network's activity on every token row, with what identifies the row."""

    ids: tuple[NetworkId, ...]
    activity: np.ndarray  # (tokens, networks) float64, column j is network ids[j]
    token_ids: np.ndarray  # (tokens,) int
    records: np.ndarray  # (tokens,) record index in the dataset
    positions: np.ndarray  # (tokens,) position in the record
    source: str  # where the rows came from, for the reader

    def of(self, network: NetworkId) -> np.ndarray:
        """One network's activity per token."""
        return self.activity[:, self.ids.index(network)]


def _columns(network: Network, layers: Sequence[int], width: int) -> np.ndarray:
    """The network's neurons as columns of the rows (layer-major), refusing a layer the rows lack."""
    position = {layer: index for index, layer in enumerate(layers)}
    missing = sorted(set(network.layers) - set(position))
    if missing:
        raise UserError(
            f"network {network.id} has neurons in layer {missing[0]}, which the activations do not record "
            f"(they hold layers {','.join(map(str, layers))}); collect every layer the mask file uses"
        )
    return np.array(
        [position[layer] * width + neuron for layer, neurons in sorted(network.layers.items()) for neuron in neurons],
        dtype=np.int64,
    )


def _map_weights(network: Network) -> np.ndarray | None:
    """The network's z per member neuron, in `_columns` order; None for a group without a map."""
    if network.z is None:
        return None
    return np.array([z for _, values in sorted(network.z.items()) for z in values], dtype=np.float64)


def network_activity(
    mask: MaskFile, rows: TokenRows | str | Path, networks: Sequence[NetworkId] | None = None
) -> TokenActivity:
    """The activity (module docstring) of the chosen networks (default: every network, then the set-aside
    `massive` group when the file has one) on every row of `rows`, in one pass over them."""
    source = read_source(rows)
    if not isinstance(source, ActivationMatrix):  # an array in memory names no model
        check_compatible(mask, source.model)
    if networks is None:
        massive = mask.massive()
        chosen = list(mask.networks) + ([massive] if massive is not None else [])
    else:
        chosen = list(mask.select(networks).networks)
    width, layers = source.intermediate_size, list(source.layers)
    columns = [_columns(network, layers, width) for network in chosen]
    weights = [_map_weights(network) for network in chosen]
    needed = np.unique(np.concatenate(columns)) if columns else np.zeros(0, np.int64)
    local = [np.searchsorted(needed, cols) for cols in columns]  # each network's columns within `needed`
    projections, signless = [], {j: [] for j, w in enumerate(weights) if w is None}
    token_ids, records, positions = [], [], []
    for shard in shards_of(source):
        token_ids.append(shard.token_ids())
        records.append(shard.records())
        positions.append(shard.positions())
        for block in shard.blocks(BLOCK_ROWS):
            held = np.asarray(block[:, needed], dtype=np.float64)  # only the networks' columns, widened
            part = np.zeros((len(held), len(chosen)))
            for j, (cols, w) in enumerate(zip(local, weights, strict=True)):
                if w is None:
                    signless[j].append(held[:, cols])
                else:
                    part[:, j] = held[:, cols] @ w / (w @ w)
            projections.append(part)
    activity = np.concatenate(projections) if projections else np.zeros((0, len(chosen)))
    for j, parts in signless.items():
        values = np.concatenate(parts)
        extreme = values[np.abs(values).argmax(axis=0), np.arange(values.shape[1])]
        activity[:, j] = values @ np.where(extreme < 0, -1.0, 1.0) / values.shape[1]
    activity -= activity.mean(axis=0, keepdims=True)
    return TokenActivity(
        tuple(network.id for network in chosen),
        activity,
        np.concatenate(token_ids).astype(np.int64),
        np.concatenate(records).astype(np.int64),
        np.concatenate(positions).astype(np.int64),
        f"{describe_source(source)} ({source.n_tokens} tokens)",
    )
