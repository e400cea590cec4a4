"""Activation folders written by hand, and reading their rows back."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from fn_analyze.record.activations import open_activations


def write_activations(
    folder: Path,
    matrix,
    layers: list[int],
    intermediate_size: int,
    rows_per_shard: int = 1000,
    positions=None,
    token_ids=None,
) -> Path:
    """An activations folder (shards + manifest) holding `matrix` (tokens x neurons), as collect writes it;
    each row's position and token id are 0 unless given."""
    from fn_analyze.record.activations import write_matrix
    from shared.masks import ModelInfo

    info = ModelInfo("synthetic", "llama", max(layers) + 1, intermediate_size, 8, "sha256:synthetic")
    return write_matrix(folder, matrix, info, layers, rows_per_shard, positions, token_ids)


def shard_rows(folder: Path) -> dict[str, np.ndarray]:
    """Every dataset of an activations folder, concatenated in manifest order."""
    acts = open_activations(folder)
    parts: dict[str, list[np.ndarray]] = {}
    for shard in acts.manifest["shards"]:
        with h5py.File(folder / shard["file"], "r") as handle:
            for key in ("activations", "token_ids", "sequence_index", "position"):
                parts.setdefault(key, []).append(handle[key][:])
    return {key: np.concatenate(values) for key, values in parts.items()}


def assert_same_rows(rows: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """The same tokens in the same order, and activations equal to float16 rounding."""
    for key in ("token_ids", "sequence_index", "position"):
        np.testing.assert_array_equal(rows[key], expected[key])
    np.testing.assert_allclose(rows["activations"], expected["activations"], rtol=1e-3, atol=1e-3)
