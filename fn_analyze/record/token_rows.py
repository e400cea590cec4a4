"""Where the ICA reads its token rows from: an activations folder (`Activations`, its HDF5
shards) or an array in memory (`ActivationMatrix`). Both hand the reduction the same thing,
shards of rows read in blocks with each row's record index, position and token id, so a
matrix gives the networks that the same matrix written to one shard (`write_matrix`) gives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fn_analyze.record.activations import Activations, read_column, read_shard
from fn_analyze.record.model_rows import ModelRows
from shared.constants import POSITION_DATASET, SEQUENCE_DATASET, TOKEN_IDS_DATASET
from shared.errors import ParameterError

if TYPE_CHECKING:
    from fn_analyze.neurons.magnitude import NeuronMagnitude


class RowShard(Protocol):
    """A run of token rows the reduction sums over (an HDF5 shard, or a matrix)."""

    n_tokens: int
    n_columns: int

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]: ...
    def records(self) -> np.ndarray: ...
    def positions(self) -> np.ndarray: ...
    def token_ids(self) -> np.ndarray: ...


@dataclass(frozen=True)
class ShardFile:
    """One HDF5 shard of an activations folder (a path: what a dask worker is sent); every read is
    checked against the manifest's `digest`."""

    path: str
    n_tokens: int
    n_columns: int
    digest: str | None = None
    value_bytes = 2  # float16, as collect writes them

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        return read_shard(self.path, self.n_tokens, self.n_columns, block_rows, self.digest)

    def records(self) -> np.ndarray:
        return self._read(SEQUENCE_DATASET)

    def positions(self) -> np.ndarray:
        return self._read(POSITION_DATASET)

    def token_ids(self) -> np.ndarray:
        return self._read(TOKEN_IDS_DATASET)

    def _read(self, dataset: str) -> np.ndarray:
        return read_column(self.path, dataset, self.digest)


@dataclass(frozen=True, eq=False)
class ActivationMatrix:
    """Activations held in memory: tokens x (len(layers) * intermediate_size), layer-major columns as
    in a shard (column = position in `layers` * intermediate_size + neuron). Each row is its own record
    (its index) and sits at position 0 with token id 0 unless given, as `write_matrix` writes it."""

    matrix: np.ndarray
    layers: tuple[int, ...]
    records: np.ndarray
    positions: np.ndarray
    token_ids: np.ndarray

    @classmethod
    def of(
        cls,
        matrix: np.ndarray,
        layers: Sequence[int] | None = None,
        records: Sequence[int] | np.ndarray | None = None,
        positions: Sequence[int] | np.ndarray | None = None,
        token_ids: Sequence[int] | np.ndarray | None = None,
    ) -> ActivationMatrix:
        """Check and wrap an array; `layers` default to one layer (0) holding every column."""
        if not isinstance(matrix, np.ndarray) or matrix.ndim != 2:
            raise ParameterError("{X} must be a 2-d array (tokens x neurons), got {got}", got=_shape_of(matrix))
        if not np.issubdtype(matrix.dtype, np.floating):
            raise ParameterError("{X} must hold floating-point activations, got dtype {dtype}", dtype=matrix.dtype)
        if len(matrix) < 2:
            raise ParameterError("{X} holds {n} token row(s); give at least 2", n=len(matrix))
        chosen = (0,) if layers is None else tuple(int(layer) for layer in layers)
        if not chosen or len(set(chosen)) != len(chosen) or min(chosen) < 0:
            raise ParameterError("{layers} must be distinct non-negative layer indices, got {got}", got=list(chosen))
        if matrix.shape[1] % len(chosen):
            raise ParameterError(
                "{X} has {columns} columns, which {n} {layers} cannot share equally; give the layers the "
                "columns hold (layer-major)",
                columns=matrix.shape[1],
                n=len(chosen),
            )
        n = len(matrix)
        return cls(
            matrix,
            chosen,
            _per_row(records, n, "records", np.int64, np.arange(n, dtype=np.int64)),
            _per_row(positions, n, "positions", np.int32, np.zeros(n, np.int32)),
            _per_row(token_ids, n, "token_ids", np.int32, np.zeros(n, np.int32)),
        )

    @property
    def intermediate_size(self) -> int:
        return self.matrix.shape[1] // len(self.layers)

    @property
    def n_tokens(self) -> int:
        return len(self.matrix)

    @property
    def n_neurons(self) -> int:
        return self.matrix.shape[1]

    def column_to_neuron(self, column: int) -> tuple[int, int]:
        """(layer, neuron) of a column."""
        return self.layers[column // self.intermediate_size], column % self.intermediate_size


@dataclass(frozen=True, eq=False)
class MatrixShard:
    """An ActivationMatrix as the one shard it would be written to."""

    source: ActivationMatrix

    @property
    def n_tokens(self) -> int:
        return self.source.n_tokens

    @property
    def n_columns(self) -> int:
        return self.source.n_neurons

    @property
    def value_bytes(self) -> int:
        """Bytes a value takes when held on a device: float16 as it is, anything wider as float32."""
        return 2 if self.source.matrix.dtype == np.float16 else 4

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        for start in range(0, self.n_tokens, block_rows):
            yield self.source.matrix[start : start + block_rows]

    def records(self) -> np.ndarray:
        return self.source.records

    def positions(self) -> np.ndarray:
        return self.source.positions

    def token_ids(self) -> np.ndarray:
        return self.source.token_ids


TokenRows = Activations | ActivationMatrix | ModelRows


def shards_of(source: TokenRows) -> list[RowShard]:
    """The shards the reduction sums over: the folder's, in manifest order, or the matrix as one."""
    if isinstance(source, ActivationMatrix):
        return [MatrixShard(source)]
    if isinstance(source, ModelRows):
        return list(source.runs)
    return [
        ShardFile(str(source.folder / shard["file"]), int(shard["n_tokens"]), source.n_neurons, shard.get("digest"))
        for shard in source.manifest["shards"]
    ]


def magnitude_of(source: TokenRows) -> NeuronMagnitude:
    """Max |activation| of every neuron: the folder's (`stats_from_activations`: from the cache when
    a command left it there, else one pass, written nowhere), the matrix's, or the model's rows' (one pass)."""
    from fn_analyze.neurons.magnitude import NeuronMagnitude, stats_from_activations

    if isinstance(source, Activations):
        return stats_from_activations(source.folder, source.model, ["max_abs"]).magnitude()
    if isinstance(source, ModelRows):  # one pass of the model
        peak = np.zeros(source.n_neurons, dtype=np.float32)
        for run in source.runs:
            for block in run.blocks(0):
                np.maximum(peak, np.abs(block).max(axis=0), out=peak)
    else:
        peak = np.abs(source.matrix).max(axis=0).astype(np.float32)
    n_layers = source.model.n_layers if isinstance(source, ModelRows) else max(source.layers) + 1
    full = np.full((n_layers, source.intermediate_size), np.nan)
    full[list(source.layers)] = peak.reshape(len(source.layers), source.intermediate_size)
    return NeuronMagnitude(full, f"{describe_source(source)} ({source.n_tokens} tokens)", source.n_tokens)


def describe_source(source: TokenRows) -> str:
    """The source in an error message: the folder, the array, or the model and its dataset."""
    if isinstance(source, ModelRows):
        return source.describe()
    return "the array" if isinstance(source, ActivationMatrix) else str(source.folder)


def read_source(source: TokenRows | str | Path) -> TokenRows:
    """An activations folder opened (and checked), or the source as it is."""
    from fn_analyze.record.activations import open_activations

    if isinstance(source, (Activations, ActivationMatrix, ModelRows)):
        return source
    return open_activations(Path(source))


def _per_row(values, n: int, name: str, dtype: type, default: np.ndarray) -> np.ndarray:
    if values is None:
        return default
    array = np.asarray(values)
    if array.shape != (n,) or not np.issubdtype(array.dtype, np.integer):
        raise ParameterError(
            "{" + name + "} must hold one integer a token row ({n}), got {got}", n=n, got=_shape_of(array)
        )
    return array.astype(dtype)


def _shape_of(value) -> str:
    shape = getattr(value, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else type(value).__name__
