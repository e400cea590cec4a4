"""The streamed PCA reduction before ICA: a sum over shards, so any map-reduce engine can run it.

With X the (tokens x neurons) activations, centered per neuron (and optionally scaled),
the top-k principal maps over neurons are found by randomized subspace iteration on
C = X^T X (Halko, Martinsson & Tropp 2011). Every pass over the data is a sum over shards,
C Q = sum_s X_s^T (X_s Q), computed shard by shard in float32 blocks and accumulated in
float64, so memory is (neurons x components) whatever the token count. One pass serves
several column groups at once (all layers together, or each layer on its own).

Each shard's part is a plain function of (shard, the settings, small arrays), so the sum runs
in this process (`engine="local"`) or as dask tasks (`engine="dask"`): on dask's local
scheduler, or on a cluster when a `dask.distributed` Client is connected, with the
shards on a file system every worker can read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fn_analyze.config import ENGINES
from fn_analyze.networks.preprocess import Preprocessing, inverse_scales
from fn_analyze.record.token_rows import RowShard, TokenRows, shards_of
from shared.errors import ParameterError, UserError
from shared.progress import progress_bar
from shared.threads import single_threaded_blas

log = logging.getLogger(__name__)

BLOCK_BYTES = 128 * 2**20  # float32 bytes per block of token rows read from a shard


@dataclass(frozen=True)
class ReductionSettings:
    """How `reduce` runs, in one object its workers are sent (picklable, for the dask engine)."""

    groups: tuple[tuple[int, int], ...]  # [start, stop) column ranges, each reduced on its own
    k: int  # principal maps kept per group and view
    prep: Preprocessing = Preprocessing()  # rows left out, clipping, scaling, set-aside; the default changes nothing
    seed: int = 0  # of the random start
    oversample: int = 10  # extra columns: convergence goes as lambda_{k+oversample+1} / lambda_k per pass
    tol: float = 1e-6  # the iteration stops when the top-k maps move less than this (sine of the largest angle)
    max_passes: int = 40
    splits: int = 0  # views beside the whole data: the records whose index modulo splits is s (0: none)
    engine: str = "local"  # local, or dask: the sums over shards as dask tasks
    device: str = "cpu"
    precision: str | None = None  # of the products; None: float64 on CUDA, float32 elsewhere
    resident: bool | None = None  # the raw rows held on the device; None: on CUDA when they fit
    hold: bool = False  # the centered rows held between passes when they fit (engine local)

    @property
    def product_precision(self) -> str:
        return self.precision or ("float64" if torch.device(self.device).type == "cuda" else "float32")


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
    tolerance: float  # the subspace_change the iteration stopped at (or max_passes ran out)
    n_rows: int  # token rows of the view that entered the reduction (after any row filter)
    mean: np.ndarray  # (neurons,) the view's mean of each of the group's columns, subtracted first
    scale: np.ndarray | None  # (neurons,) what each centered column was multiplied by; None: nothing

    def gap_at(self, k: int) -> float:
        """Eigenvalue k over eigenvalue k+1 (the Ritz value past the maps kept when k is all of them)."""
        following = self.eigenvalues[k] if k < len(self.eigenvalues) else self.next_eigenvalue
        return float(self.eigenvalues[k - 1] / following) if following > 0 else float("inf")

    @property
    def eigen_gap(self) -> float:
        return self.gap_at(len(self.eigenvalues))

    @property
    def converged(self) -> bool:
        return self.subspace_change <= self.tolerance


def _shard_blocks(shard: RowShard, settings: ReductionSettings) -> Iterator[tuple[torch.Tensor, list[Any]]]:
    """A shard's kept token rows (the preprocessing's row filter) as float32 blocks on the settings' device,
    each value clipped to its column's [low, high] when the preprocessing clips, each block with its views'
    row selections: slice(None) for the whole data, then the rows of each split (record index modulo `splits`)."""
    device, splits, clip = torch.device(settings.device), settings.splits, settings.prep.clip
    block_rows = max(1, BLOCK_BYTES // (4 * shard.n_columns))
    split_of = shard.records() % splits if splits else None
    keep = settings.prep.rows.keep(shard)
    bounds = None if clip is None else torch.as_tensor(clip, dtype=torch.float32, device=device)
    start = 0
    for block in shard.blocks(block_rows):
        stop, part = start + len(block), None if split_of is None else split_of[start : start + len(block)]
        if keep is not None:
            kept = keep[start:stop]
            block = block[kept if isinstance(block, np.ndarray) else torch.as_tensor(kept, device=block.device)]
            part = None if part is None else part[kept]
        start = stop
        if not len(block):
            continue
        views: list[Any] = [slice(None)]
        if part is not None:
            views += [torch.as_tensor(np.flatnonzero(part == s), device=device) for s in range(splits)]
        x = torch.as_tensor(block).to(device=device, dtype=torch.float32)
        yield (x if bounds is None else torch.clamp(x, bounds[0], bounds[1])), views


def _selected(block: torch.Tensor, selected: Any) -> torch.Tensor:
    """A view's rows of a block: the block itself, or the selected rows gathered."""
    return block if isinstance(selected, slice) else block.index_select(0, selected)


def _centered(block: torch.Tensor, selected: Any, mean: torch.Tensor) -> torch.Tensor:
    """A view's rows of a block minus the view's means, in one new tensor (indexing, then
    subtracting, made two)."""
    return block - mean if isinstance(selected, slice) else block.index_select(0, selected).sub_(mean)


def shard_moments(shard: RowShard, settings: ReductionSettings) -> np.ndarray:
    """(views, 3, neurons) float64: each view's row count, per-neuron sum and sum of squares (kept, clipped rows)."""
    dev = torch.device(settings.device)
    total = torch.zeros((1 + settings.splits, 3, shard.n_columns), dtype=torch.float64, device=dev)
    for block, views in _shard_blocks(shard, settings):
        for view, selected in enumerate(views):
            x = _selected(block, selected)
            total[view, 0] += len(x)
            total[view, 1] += x.sum(dim=0, dtype=torch.float64)
            total[view, 2] += (x * x).sum(dim=0, dtype=torch.float64)
    return total.cpu().numpy()


def centered_blocks(
    shard: RowShard,
    settings: ReductionSettings,
    means: np.ndarray,  # (views, neurons)
    inv_scales: np.ndarray | None,  # (views, neurons); None: centered only
) -> Iterator[list[torch.Tensor]]:
    """A shard's blocks as the products read them: for each block, each view's rows centered (and
    scaled) by the view's own moments, in the products' precision."""
    dev, dtype = torch.device(settings.device), getattr(torch, settings.product_precision)
    means_t = torch.as_tensor(means, dtype=torch.float32, device=dev)
    scales_t = None if inv_scales is None else torch.as_tensor(inv_scales, dtype=torch.float32, device=dev)
    for block, views in _shard_blocks(shard, settings):
        centered = []
        for view, selected in enumerate(views):
            x = _centered(block, selected, means_t[view])
            if scales_t is not None:
                x *= scales_t[view]
            centered.append(x if dtype == torch.float32 else x.to(dtype))
        yield centered


def block_products(
    blocks: Iterable[list[torch.Tensor]],
    settings: ReductionSettings,
    bases: Sequence[Sequence[np.ndarray]],  # [group][view]
) -> list[list[np.ndarray]]:
    """For each column group g and view v: sum over the blocks of X_gv^T (X_gv basis_gv), products
    in the settings' precision (float32 or float64), float64 sums."""
    dev, dtype = torch.device(settings.device), getattr(torch, settings.product_precision)
    bases_t = [[torch.as_tensor(b, dtype=dtype, device=dev) for b in views] for views in bases]
    outs = [[torch.zeros(b.shape, dtype=torch.float64, device=dev) for b in views] for views in bases_t]
    for centered in blocks:
        for view, x in enumerate(centered):
            for g, (start, stop) in enumerate(settings.groups):
                part = x[:, start:stop]
                outs[g][view] += (part.T @ (part @ bases_t[g][view])).to(torch.float64)
    return [[out.cpu().numpy() for out in views] for views in outs]


def shard_products(
    shard: RowShard,
    settings: ReductionSettings,
    means: np.ndarray,  # (views, neurons)
    inv_scales: np.ndarray | None,  # (views, neurons); None: centered only
    bases: Sequence[Sequence[np.ndarray]],  # [group][view]
) -> list[list[np.ndarray]]:
    """For each column group g and view v: sum over the shard's rows of view v of X_gv^T (X_gv basis_gv),
    X centered (and scaled) by the view's own moments; products in the settings' precision (float32 or
    float64), float64 sums."""
    return block_products(centered_blocks(shard, settings, means, inv_scales), settings, bases)


def held_bytes(shards: Sequence[RowShard], splits: int, precision: str) -> int:
    """What the centered blocks of every view take in `precision` (at most: a row filter keeps fewer
    rows): the whole data once, and the splits, which share its rows out, once more."""
    values = sum(shard.n_tokens * shard.n_columns for shard in shards)
    return (1 + (splits > 0)) * values * torch.finfo(getattr(torch, precision)).bits // 8


def available_memory(device: str) -> int:
    """Bytes free for new tensors: the CUDA device's free memory, else the host's available memory
    (MemAvailable: free memory and the page cache the kernel can drop)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# Of the device's free memory, the share the rows may take when held there between passes: the rest
# is for the blocks' float32/float64 copies and products (BLOCK_BYTES each, a few at a time).
RESIDENT_SHARE = 0.5


def fits_on_device(shards: Sequence[RowShard], device: str) -> bool:
    """Whether the rows, as `ResidentShard` holds them (float16 rows as they are, others as float32),
    fit RESIDENT_SHARE of the CUDA device's free memory."""
    held = sum(getattr(shard, "value_bytes", 4) * shard.n_tokens * shard.n_columns for shard in shards)
    return held <= RESIDENT_SHARE * available_memory(device)


@dataclass(frozen=True, eq=False)
class ResidentShard:
    """A shard's rows read once and held on the reduction's device (float16 rows as they are, wider
    ones as float32, the precision every pass reads them in), so the passes after the first read
    device memory: not the disk, nor the model for rows recomputed on each pass."""

    n_tokens: int
    n_columns: int
    held: tuple[torch.Tensor, ...]
    _records: np.ndarray
    _positions: np.ndarray
    _token_ids: np.ndarray

    @classmethod
    def read(cls, shard: RowShard, device: str) -> ResidentShard:
        block_rows = max(1, BLOCK_BYTES // (4 * shard.n_columns))
        held = []
        for block in shard.blocks(block_rows):
            tensor = torch.as_tensor(block)
            held.append(
                tensor.to(device=device, dtype=torch.float16 if tensor.dtype == torch.float16 else torch.float32)
            )
        return cls(shard.n_tokens, shard.n_columns, tuple(held), shard.records(), shard.positions(), shard.token_ids())

    def blocks(self, block_rows: int) -> Iterator[torch.Tensor]:
        return iter(self.held)

    def records(self) -> np.ndarray:
        return self._records

    def positions(self) -> np.ndarray:
        return self._positions

    def token_ids(self) -> np.ndarray:
        return self._token_ids


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, list):
        return [_add(x, y) for x, y in zip(a, b, strict=True)]
    return a + b


def sum_over_shards(function: Callable[..., Any], shards: Sequence[Any], args: tuple, engine: str) -> Any:
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


def reduce(acts: TokenRows, settings: ReductionSettings) -> list[list[Reduction]]:
    """Subspace iteration with Rayleigh-Ritz, run until the top-k maps stop moving, for every column
    group and every view of the data: [group][view], view 0 the whole data, view 1 + s the records
    whose index modulo `splits` is s (disjoint halves of the text for splits=2), each centered
    (and scaled) by its own moments.

    Each pass over the shards computes C Q for every group and view at once (the split views
    together cost as much as the whole one). After each pass the top-k Ritz vectors are compared
    with the previous pass's: the iteration stops when the sine of the largest principal angle
    between them is below `tol` everywhere (or after `max_passes`). A converged subspace is a
    property of the data, not of the random start, the thread count or the order of the sums;
    with a fixed number of passes it was not, and the networks moved with float rounding.
    `oversample` extra columns speed convergence: about lambda_{k+oversample+1} / lambda_k per pass.
    `prep` (fn_analyze/networks/preprocess.py) leaves token rows out, clips values and scales columns, in
    every pass alike; its default changes nothing.

    On CUDA (the default `precision`, None) the products are float64, elsewhere float32. By default
    every pass reads the shards again, so memory stays bounded by the reduced size, except that on
    CUDA the raw rows are read once and held on the device when they fit (`resident`, `ResidentShard`).
    `hold` (engine local) keeps every shard's blocks as the first pass centered them, when they fit
    RESIDENT_SHARE of the device's available memory, so the passes after it only multiply: on the
    demo's 2-core CPU machine, reading, converting, gathering the splits' rows and centering took
    more time than the products. The results are the same bit for bit whichever way the rows come.
    """
    shards = shards_of(acts)
    device, engine, splits, k, tol = settings.device, settings.engine, settings.splits, settings.k, settings.tol
    groups, precision = settings.groups, settings.product_precision
    hold = settings.hold
    if hold and engine != "local":
        raise ParameterError("{hold} keeps the rows in this process; drop it or {engine} {value}", value=engine)
    needed = held_bytes(shards, splits, precision)
    if hold and needed > RESIDENT_SHARE * available_memory(device):
        log.warning(
            "the centered rows (%.2f GiB) do not fit half the %s memory available: the reduction reads them on "
            "every pass",
            needed / 2**30,
            device,
        )
        hold = False
    resident = settings.resident
    if resident is None:
        on_cuda = torch.device(device).type == "cuda"
        resident = on_cuda and engine == "local" and not hold and fits_on_device(shards, device)
    if hold:
        log.info("reduction: the centered rows are held in %s memory between passes (%.2f GiB)", device, needed / 2**30)
    if resident:
        shards = [ResidentShard.read(shard, device) for shard in shards]
        log.info("reduction: the rows are held on %s between passes", device)
    views = 1 + splits
    with full_float32_matmul(), single_threaded_blas():
        moments = sum_over_shards(shard_moments, shards, (settings,), engine)
        counts = np.maximum(moments[:, 0, :1], 1.0)  # (views, 1)
        means = moments[:, 1] / counts
        stds = np.sqrt(np.maximum(moments[:, 2] / counts - means**2, 0.0))
        inv_scales = inverse_scales(stds, acts.intermediate_size, settings.prep.scale, settings.prep.set_aside)
        # What each view's columns hold after scaling: their total variance is that of the scaled data.
        scaled_stds = stds if inv_scales is None else stds * inv_scales
        rng = np.random.default_rng(settings.seed)
        bases = [
            [
                np.linalg.qr(rng.standard_normal((stop - start, min(stop - start, k + settings.oversample))))[0]
                for _ in range(views)
            ]
            for start, stop in groups
        ]
        previous: list[list[np.ndarray]] | None = None
        # Each shard's centered blocks, when held: the same tensors each pass would otherwise make again.
        held = [tuple(centered_blocks(shard, settings, means, inv_scales)) for shard in shards] if hold else []
        with progress_bar(total=settings.max_passes, desc="ica reduction", unit="pass", leave=False) as bar:
            for passes in range(1, settings.max_passes + 1):
                if hold:
                    products = sum_over_shards(block_products, held, (settings, bases), "local")
                else:
                    products = sum_over_shards(shard_products, shards, (settings, means, inv_scales, bases), engine)
                ritz = [
                    [_ritz(basis, product, k) for basis, product in zip(bs, ps, strict=True)]
                    for bs, ps in zip(bases, products, strict=True)
                ]
                changes = [
                    [
                        np.inf if previous is None else subspace_change(previous[g][v], ritz[g][v][1])
                        for v in range(views)
                    ]
                    for g in range(len(groups))
                ]
                largest = max(max(row) for row in changes)
                log.info("reduction pass %d: largest subspace change %.2e", passes, largest)
                bar.update()
                bar.set_postfix(change=f"{largest:.1e}", to=f"{tol:.0e}")
                if largest <= tol:
                    break
                previous = [[maps for _, maps in row] for row in ritz]
                bases = [[np.linalg.qr(product)[0] for product in row] for row in products]
    return [
        [
            Reduction(
                columns=(start, stop),
                maps=signed(ritz[g][v][1]),
                eigenvalues=ritz[g][v][0][:k],
                next_eigenvalue=float(ritz[g][v][0][k]) if len(ritz[g][v][0]) > k else 0.0,
                total_variance=float((scaled_stds[v, start:stop] ** 2).sum() * counts[v, 0]),
                n_rows=int(moments[v, 0, 0]),
                passes=passes,
                subspace_change=float(changes[g][v]),
                tolerance=tol,
                mean=means[v, start:stop],
                scale=None if inv_scales is None else inv_scales[v, start:stop],
            )
            for v in range(views)
        ]
        for g, (start, stop) in enumerate(groups)
    ]
