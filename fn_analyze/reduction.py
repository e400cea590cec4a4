"""The streamed PCA reduction before ICA: a sum over shards, so any map-reduce engine can run it.

With X the (tokens x neurons) activations, centered per neuron (and optionally scaled),
the top-k principal maps over neurons are found by randomized subspace iteration on
C = X^T X (Halko, Martinsson & Tropp 2011). Every pass over the data is a sum over shards,
C Q = sum_s X_s^T (X_s Q), computed shard by shard in float32 blocks and accumulated in
float64, so memory is (neurons x components) whatever the token count. One pass serves
several column groups at once (all layers together, or each layer on its own).

Each shard's part is a plain function of (shard path, small arrays), so the sum runs
in this process (`engine="local"`) or as dask tasks (`engine="dask"`): on dask's local
scheduler, or on a cluster when a `dask.distributed` Client is connected, with the
shards on a file system every worker can read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fn_analyze.activations import Activations, read_shard
from shared.errors import UserError

log = logging.getLogger(__name__)

BLOCK_BYTES = 128 * 2**20  # float32 bytes per block of token rows read from a shard
ENGINES = ("local", "dask")


@dataclass(frozen=True)
class Shard:
    path: str
    n_tokens: int
    n_columns: int


@dataclass
class Reduction:
    """The top-k principal maps over one group's neurons of the centered (and optionally scaled) data."""

    columns: tuple[int, int]  # [start, stop) of the group's activations columns
    maps: np.ndarray  # (neurons, k), orthonormal columns, each signed so its largest |entry| is positive
    eigenvalues: np.ndarray  # (k,), of C = X_c^T X_c, descending
    next_eigenvalue: float  # the (k+1)-th Ritz value: eigenvalues[-1] / next_eigenvalue is the eigen-gap at k
    total_variance: float  # trace of C
    passes: int  # products C Q computed (passes over the shards, the moments pass not counted)
    subspace_change: float  # sine of the largest principal angle between the last two iterates' maps

    @property
    def eigen_gap(self) -> float:
        return float(self.eigenvalues[-1] / self.next_eigenvalue) if self.next_eigenvalue > 0 else float("inf")

    tolerance: float  # the subspace_change the iteration stopped at (or max_passes ran out)

    @property
    def converged(self) -> bool:
        return self.subspace_change <= self.tolerance


def _shard_blocks(shard: Shard, device: torch.device) -> Iterator[torch.Tensor]:
    """A shard's token rows as float32 blocks on `device`."""
    rows = max(1, BLOCK_BYTES // (4 * shard.n_columns))
    for block in read_shard(shard.path, shard.n_tokens, shard.n_columns, rows):
        yield torch.from_numpy(block).to(device=device, dtype=torch.float32)


def shard_moments(shard: Shard, device: str) -> np.ndarray:
    """(2, neurons) float64: the shard's per-neuron sum and sum of squares."""
    total = torch.zeros((2, shard.n_columns), dtype=torch.float64, device=device)
    for block in _shard_blocks(shard, torch.device(device)):
        total[0] += block.sum(dim=0, dtype=torch.float64)
        total[1] += (block * block).sum(dim=0, dtype=torch.float64)
    return total.cpu().numpy()


def shard_products(
    shard: Shard,
    groups: Sequence[tuple[int, int]],
    mean: np.ndarray,
    inv_scale: np.ndarray | None,  # None: centered only
    bases: Sequence[np.ndarray],
    device: str,
) -> list[np.ndarray]:
    """For each column group g: sum over the shard's blocks of X_g^T (X_g basis_g), float64."""
    dev = torch.device(device)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=dev)
    inv_scale_t = None if inv_scale is None else torch.as_tensor(inv_scale, dtype=torch.float32, device=dev)
    bases_t = [torch.as_tensor(b, dtype=torch.float32, device=dev) for b in bases]
    outs = [torch.zeros(b.shape, dtype=torch.float64, device=dev) for b in bases_t]
    for block in _shard_blocks(shard, dev):
        block -= mean_t
        if inv_scale_t is not None:
            block *= inv_scale_t
        for (start, stop), basis, out in zip(groups, bases_t, outs, strict=True):
            x = block[:, start:stop]
            out += (x.T @ (x @ basis)).to(torch.float64)
    return [out.cpu().numpy() for out in outs]


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, list):
        return [x + y for x, y in zip(a, b, strict=True)]
    return a + b


def sum_over_shards(function: Callable[..., Any], shards: Sequence[Shard], args: tuple, engine: str) -> Any:
    """sum_s function(shard_s, *args): in this process, or as a dask graph with a tree sum."""
    if engine == "local":
        total = None
        for shard in shards:
            part = function(shard, *args)
            total = part if total is None else _add(total, part)
        return total
    if engine == "dask":
        try:
            import dask
        except ImportError as exc:
            raise UserError("--engine dask needs dask: pip install 'functional-networks[dask]'") from exc

        shared_args = [dask.delayed(arg) for arg in args]  # one copy in the graph, not one per shard
        parts = [dask.delayed(function)(shard, *shared_args) for shard in shards]
        while len(parts) > 1:  # pairwise tree: bounded memory on the client and the workers
            parts = [
                dask.delayed(_add)(*parts[i : i + 2]) if i + 1 < len(parts) else parts[i]
                for i in range(0, len(parts), 2)
            ]
        return dask.compute(parts[0])[0]
    raise UserError(f"unknown --engine {engine!r}; use one of {', '.join(ENGINES)}")


@contextmanager
def engine_session(scheduler: str | None) -> Iterator[None]:
    """Connect to a dask.distributed scheduler for the block when one is named."""
    if scheduler is None:
        yield
        return
    try:
        from distributed import Client
    except ImportError as exc:
        raise UserError("--dask-scheduler needs dask.distributed: pip install 'functional-networks[dask]'") from exc
    try:
        client = Client(scheduler, timeout="10s", set_as_default=True)
    except OSError as exc:
        raise UserError(f"cannot reach the dask scheduler at {scheduler} ({exc}); check the address") from exc
    with client:
        yield


@contextmanager
def full_float32_matmul() -> Iterator[None]:
    """TF32 off for the block: it would round the products to 10-bit mantissas on CUDA."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def shards_of(acts: Activations) -> list[Shard]:
    return [Shard(str(acts.folder / s["file"]), int(s["n_tokens"]), acts.n_neurons) for s in acts.manifest["shards"]]


def _ritz(basis: np.ndarray, product: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rayleigh-Ritz on span(basis): all Ritz values (descending) and the top-k Ritz vectors."""
    small = basis.T @ product
    values, vectors = np.linalg.eigh((small + small.T) / 2)
    order = np.argsort(values)[::-1]
    return values[order], basis @ vectors[:, order[:k]]


def subspace_change(previous: np.ndarray, current: np.ndarray) -> float:
    """Sine of the largest principal angle between the spans of two orthonormal (n x k) bases."""
    cosines = np.linalg.svd(previous.T @ current, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - float(cosines.min()) ** 2)))


def signed(maps: np.ndarray) -> np.ndarray:
    """Each column flipped so that its largest |entry| is positive: eigenvectors are defined up to sign."""
    peaks = maps[np.abs(maps).argmax(axis=0), np.arange(maps.shape[1])]
    return maps * np.where(peaks < 0, -1.0, 1.0)


def reduce(
    acts: Activations,
    groups: Sequence[tuple[int, int]],
    k: int,
    standardize: bool,
    seed: int,
    oversample: int,
    tol: float,
    max_passes: int,
    engine: str = "local",
    device: str = "cpu",
) -> list[Reduction]:
    """Subspace iteration with Rayleigh-Ritz for every column group, run until the top-k maps stop moving.

    Each pass over the shards computes C Q for every group at once. After each pass the
    top-k Ritz vectors are compared with the previous pass's: the iteration stops when the
    sine of the largest principal angle between them is below `tol` in every group (or
    after `max_passes`). A converged subspace is a property of the data, not of the random
    start, the thread count or the order of the sums; with a fixed number of passes it was
    not, and the networks moved with float rounding. `oversample` extra columns speed
    convergence: the rate is about lambda_{k+oversample+1} / lambda_k per pass.
    """
    shards = shards_of(acts)
    with full_float32_matmul():
        sums = sum_over_shards(shard_moments, shards, (device,), engine)
        mean = sums[0] / acts.n_tokens
        std = np.sqrt(np.maximum(sums[1] / acts.n_tokens - mean**2, 0.0))
        # Dead neurons (zero variance) keep scale 1 so they stay zero instead of dividing by zero.
        scale = np.where(std > 0, std, 1.0) if standardize else np.ones_like(std)
        inv_scale = 1.0 / scale if standardize else None
        rng = np.random.default_rng(seed)
        bases = []
        for start, stop in groups:
            width = min(stop - start, k + oversample)
            bases.append(np.linalg.qr(rng.standard_normal((stop - start, width)))[0])
        fixed = (groups, mean, inv_scale)
        previous: list[np.ndarray | None] = [None] * len(groups)
        changes = [np.inf] * len(groups)
        for passes in range(1, max_passes + 1):
            products = sum_over_shards(shard_products, shards, (*fixed, bases, device), engine)
            ritz = [_ritz(basis, product, k) for basis, product in zip(bases, products, strict=True)]
            changes = [
                np.inf if before is None else subspace_change(before, maps)
                for before, (_, maps) in zip(previous, ritz, strict=True)
            ]
            log.info("reduction pass %d: largest subspace change %.2e", passes, max(changes))
            if max(changes) <= tol:
                break
            previous = [maps for _, maps in ritz]
            bases = [np.linalg.qr(product)[0] for product in products]
    reductions = []
    for (start, stop), (values, maps), change in zip(groups, ritz, changes, strict=True):
        total_variance = float(((std[start:stop] / scale[start:stop]) ** 2).sum() * acts.n_tokens)
        reductions.append(
            Reduction(
                columns=(start, stop),
                maps=signed(maps),
                eigenvalues=values[:k],
                next_eigenvalue=float(values[k]) if len(values) > k else 0.0,
                total_variance=total_variance,
                passes=passes,
                subspace_change=float(change),
                tolerance=tol,
            )
        )
    return reductions
