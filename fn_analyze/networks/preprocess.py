"""Preprocessing before the ICA that looks for function, not magnitude.

A few MLP neurons carry "massive activations" (Sun et al. 2024), mostly at the first token
of every sequence; centered activations are dominated by them and by the last layers, where
the variance is largest, and the networks found then hurt the model about as much as random
neurons of the same magnitudes. Each rule below changes one thing, in this order, inside the
one streamed reduction (fn_analyze/networks/reduction.py), so nothing is collected again:

1. **Rows** (`RowFilter`): token rows at the given positions (e.g. 0) or with the given token
   ids are left out of every pass, the moments' as the products'.
2. **Clipping** (`clip_bounds`): each value is clipped to its neuron's [100-P, P] percentiles,
   estimated from a seeded sample of at most `sample_rows` kept token rows (percentiles cannot
   be streamed exactly). Clipping, not median/MAD scaling: dividing by the MAD leaves an
   outlier token where it is, and a neuron whose bulk is narrow and whose one token is huge
   would weigh even more (outlier / MAD) than centered; clipping bounds what any one token
   adds to a neuron's variance by the neuron's own bulk.
3. **Scale** (`inverse_scales`): `none` (centered only, the default), `neuron` (unit variance,
   the old `--standardize`), or `layer`: each layer's columns divided by one number, so that
   every layer's total variance is the same (the layer's width), whatever its magnitude.
4. **Set aside** (`set_aside_columns`): the N largest-magnitude neurons (max |activation| over
   the activations' tokens, as `evaluate` counts its top-n) get scale 0, so no network can
   hold them; the mask file lists them as their own group, not as a network. The default
   (`auto`) sets aside the massive ones only: up to 100 whose magnitude is at least 20x the
   median neuron's (none with `--scale layer`, the keep-only recipe).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fn_analyze.config import SCALES
from fn_analyze.record.token_rows import RowShard, TokenRows, magnitude_of, shards_of

SAMPLE_COLUMNS = 4096  # neurons per block when the percentiles are computed, to bound float32 copies


@dataclass(frozen=True)
class RowFilter:
    """Token rows left out of the reduction, by position in their sequence or by token id."""

    positions: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.positions or self.token_ids)

    def keep(self, shard: RowShard) -> np.ndarray | None:
        """Which rows of a shard are kept (bool per row), or None when every row is."""
        if not self:
            return None
        keep = np.ones(shard.n_tokens, dtype=bool)
        if self.positions:
            keep &= ~np.isin(shard.positions(), self.positions)
        if self.token_ids:
            keep &= ~np.isin(shard.token_ids(), self.token_ids)
        return keep


ALL_ROWS = RowFilter()


def kept_rows(acts: TokenRows, rows: RowFilter) -> int:
    """How many token rows the filter keeps (reads only the small per-row arrays)."""
    if not rows:
        return acts.n_tokens
    total = 0
    for shard in shards_of(acts):
        keep = rows.keep(shard)
        assert keep is not None
        total += int(keep.sum())
    return total


def sample_rows(acts: TokenRows, rows: RowFilter, n: int, seed: int) -> np.ndarray:
    """A seeded sample of at most `n` kept token rows, (rows x neurons) float16, in one streamed pass."""
    shards = shards_of(acts)
    keeps = [rows.keep(shard) for shard in shards]
    counts = [s.n_tokens if keep is None else int(keep.sum()) for s, keep in zip(shards, keeps, strict=True)]
    total = sum(counts)
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    out = np.empty((len(chosen), acts.n_neurons), dtype=np.float16)
    filled, offset = 0, 0
    block_rows = max(1, 64 * 2**20 // (2 * acts.n_neurons))
    for shard, keep, count in zip(shards, keeps, counts, strict=True):
        # Shard-local row numbers of the chosen kept rows.
        local = chosen[(chosen >= offset) & (chosen < offset + count)] - offset
        offset += count
        if not len(local):
            continue
        wanted = local if keep is None else np.flatnonzero(keep)[local]
        start = 0
        for block in shard.blocks(block_rows):
            inside = wanted[(wanted >= start) & (wanted < start + len(block))] - start
            out[filled : filled + len(inside)] = block[inside]
            filled += len(inside)
            start += len(block)
    return out


def clip_bounds(sample: np.ndarray, percentile: float) -> np.ndarray:
    """(2, neurons) float32: each neuron's [100 - percentile, percentile] percentiles over the sample."""
    bounds = np.empty((2, sample.shape[1]), dtype=np.float32)
    for start in range(0, sample.shape[1], SAMPLE_COLUMNS):
        part = sample[:, start : start + SAMPLE_COLUMNS].astype(np.float32)
        bounds[:, start : start + SAMPLE_COLUMNS] = np.percentile(part, [100.0 - percentile, percentile], axis=0)
    return bounds


def set_aside_columns(acts: TokenRows, n: int, min_ratio: float | None = None) -> list[int]:
    """Activations columns of the `n` largest-magnitude neurons (max |activation|, as `evaluate` ranks them);
    with `min_ratio`, only those among them whose magnitude is at least `min_ratio` x the median neuron's
    (the "massive" ones: none in data without massive activations)."""
    magnitude = magnitude_of(acts)
    top = magnitude.top(n)
    if min_ratio is not None:
        floor = min_ratio * float(np.nanmedian(magnitude.max_abs))
        top = {(layer, neuron) for layer, neuron in top if magnitude.max_abs[layer, neuron] >= floor}
    slot = {layer: i for i, layer in enumerate(acts.layers)}
    return sorted(slot[layer] * acts.intermediate_size + neuron for layer, neuron in top)


def inverse_scales(stds: np.ndarray, width: int, scale: str, set_aside: Sequence[int]) -> np.ndarray | None:
    """(views, neurons) factors each centered column is multiplied by, or None: centered only.

    `neuron`: 1 / the neuron's std; `layer`: 1 / sqrt(the layer's summed variance / its width),
    so that every layer's total variance is its width; set-aside columns get 0 under every rule
    (and are left out of their layer's variance). A zero variance keeps factor 1 (nothing to divide)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}")
    if scale == "none" and not len(set_aside):
        return None
    if scale == "neuron":
        inv = 1.0 / np.where(stds > 0, stds, 1.0)
    elif scale == "layer":
        variance = stds**2
        variance[:, list(set_aside)] = 0.0
        views, columns = stds.shape
        layer_std = np.sqrt(variance.reshape(views, columns // width, width).sum(axis=2) / width)
        inv = np.repeat(1.0 / np.where(layer_std > 0, layer_std, 1.0), width, axis=1)
    else:
        inv = np.ones_like(stds)
    inv[:, list(set_aside)] = 0.0
    return inv


@dataclass(frozen=True)
class Preprocessing:
    """Everything the reduction applies before its products; the default changes nothing."""

    rows: RowFilter = ALL_ROWS
    clip: np.ndarray | None = None  # (2, neurons) float32 bounds, from clip_bounds
    scale: str = "none"
    set_aside: tuple[int, ...] = ()  # activations columns given scale 0
