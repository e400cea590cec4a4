"""`fn-analyze ica`: functional networks by spatial ICA over the neurons of all captured layers.

Neurons are the samples and tokens the dimensions (networks span layers, as in Liu et al.,
ICML 2025). The data are never held whole: with X the (tokens x neurons) activations,
centered per neuron, the top-k principal maps over neurons are found by randomized
subspace iteration on C = X^T X, computed block by block as sum_b X_b^T (X_b Q) with
float64 accumulation, so memory is (neurons x components). FastICA then runs on the
(neurons x k) reduced data with seeded restarts; each map is z-scored over neurons,
flipped so its peak is positive, and thresholded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.decomposition import FastICA

from fn_analyze.activations import Activations, open_activations
from shared.constants import MANIFEST_NAME, MASK_ARTIFACTS_DIR
from shared.digests import file_digest
from shared.errors import UserError
from shared.mask_index import check_mask_out, register_mask
from shared.masks import MaskFile, Network, save_mask_file

log = logging.getLogger(__name__)

BLOCK_BYTES = 128 * 2**20  # float32 bytes per block of token rows read from the shards


@dataclass
class IcaConfig:
    activations: Path
    out: Path | None = None  # default: mask_artifacts/<model>-ica<k>-seed<seed>.json
    n_components: int = 20
    # Default z >= 3: in a pilot on SmolLM2-135M, z >= 3 networks (about 6% of neurons for 20
    # components) hurt the model 3.7x more than random neurons of the same per-layer counts.
    threshold: float = 3.0
    percentile: float | None = None  # instead of z: keep neurons above this percentile of each map
    standardize: bool = False  # scale neurons to unit variance (the original tool; hurts, see DESIGN.md)
    seed: int = 0
    restarts: int = 5
    power_iterations: int = 2
    oversample: int = 10
    max_iter: int = 1000
    tol: float = 1e-4
    register: bool = True  # add the mask file to the index of its folder
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.activations = Path(self.activations)
        if self.out is not None:
            self.out = Path(self.out)
        if self.n_components < 1:
            raise UserError(f"--n-components must be at least 1, got {self.n_components}")
        if self.restarts < 1:
            raise UserError(f"--restarts must be at least 1, got {self.restarts}")
        if self.percentile is not None and not 0 < self.percentile < 100:
            raise UserError(f"--percentile must lie strictly between 0 and 100, got {self.percentile}")
        if self.threshold <= 0:
            raise UserError(f"--threshold must be a positive z-score, got {self.threshold}")


@dataclass
class Reduction:
    """The top-k principal maps over neurons of the centered (and optionally scaled) data."""

    maps: np.ndarray  # (neurons, k), orthonormal columns
    eigenvalues: np.ndarray  # (k,), of C = X_c^T X_c, descending
    total_variance: float  # trace of C
    mean: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)

    @property
    def explained_variance_ratio(self) -> float:
        return float(self.eigenvalues.sum() / self.total_variance) if self.total_variance > 0 else 0.0


def _block_rows(n_columns: int) -> int:
    return max(1, BLOCK_BYTES // (4 * n_columns))


def neuron_moments(acts: Activations) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron mean and standard deviation, float64, in one pass over the shards."""
    total = np.zeros(acts.n_neurons)
    total_sq = np.zeros(acts.n_neurons)
    for block in acts.blocks(_block_rows(acts.n_neurons)):
        total += block.sum(axis=0, dtype=np.float64)
        total_sq += np.einsum("ij,ij->j", block, block, dtype=np.float64)
    mean = total / acts.n_tokens
    var = np.maximum(total_sq / acts.n_tokens - mean**2, 0.0)
    return mean, np.sqrt(var)


def reduce(
    acts: Activations, k: int, standardize: bool, seed: int, power_iterations: int, oversample: int
) -> Reduction:
    """Randomized subspace iteration on C = X_c^T X_c, one pass over the shards per product."""
    mean, std = neuron_moments(acts)
    # Dead neurons (zero variance) keep scale 1 so they stay zero instead of dividing by zero.
    scale = np.where(std > 0, std, 1.0) if standardize else np.ones_like(std)
    n = acts.n_neurons
    width = min(n, k + oversample)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, width)))
    mean32, inv_scale32 = mean.astype(np.float32), (1.0 / scale).astype(np.float32)

    def gram_times(basis: np.ndarray) -> np.ndarray:
        basis32 = basis.astype(np.float32)
        out = np.zeros((n, basis.shape[1]))
        for block in acts.blocks(_block_rows(n)):
            block -= mean32
            block *= inv_scale32
            out += (block.T @ (block @ basis32)).astype(np.float64)
        return out

    for _ in range(power_iterations):
        q, _ = np.linalg.qr(gram_times(q))
    product = gram_times(q)
    small = q.T @ product
    eigenvalues, vectors = np.linalg.eigh((small + small.T) / 2)
    order = np.argsort(eigenvalues)[::-1][:k]
    total_variance = float(((std / scale) ** 2).sum() * acts.n_tokens)
    return Reduction(q @ vectors[:, order], eigenvalues[order], total_variance, mean, scale)


def _zscore_and_flip(sources: np.ndarray) -> np.ndarray:
    """z-score each map (column) over neurons and flip it so its largest |z| is positive."""
    z = (sources - sources.mean(axis=0)) / np.where(sources.std(axis=0) > 0, sources.std(axis=0), 1.0)
    peaks = z[np.abs(z).argmax(axis=0), np.arange(z.shape[1])]
    return z * np.where(peaks < 0, -1.0, 1.0)


def _kurtosis(z: np.ndarray) -> np.ndarray:
    return (z**4).mean(axis=0) - 3.0


def unmix(maps: np.ndarray, seed: int, restarts: int, max_iter: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """FastICA on the (neurons x k) reduced data with seeded restarts.

    Keeps the run whose maps are sparsest (largest mean excess kurtosis, the quantity
    FastICA's contrast approximates) and scores each of its maps by stability: the mean,
    over the other restarts, of the best |correlation| with any of their maps (ICASSO-style;
    1.0 means it reappears every time). Returns (z-scored maps (neurons x k), stability (k,)).
    """
    runs = []
    for restart in range(restarts):
        ica = FastICA(
            n_components=maps.shape[1],
            whiten="unit-variance",
            fun="logcosh",
            max_iter=max_iter,
            tol=tol,
            random_state=seed + restart,
        )
        runs.append(_zscore_and_flip(ica.fit_transform(maps).astype(np.float64)))
    best = int(np.argmax([_kurtosis(z).mean() for z in runs]))
    chosen = runs[best]
    others = [z for i, z in enumerate(runs) if i != best]
    if not others:
        return chosen, np.full(chosen.shape[1], np.nan)
    n = chosen.shape[0]
    stability = np.mean([np.abs(chosen.T @ other / n).max(axis=1) for other in others], axis=0)
    return chosen, np.clip(stability, 0.0, 1.0)


def threshold_maps(z: np.ndarray, threshold: float, percentile: float | None) -> list[np.ndarray]:
    """Column indices of each map's network: z >= threshold, or above the map's percentile."""
    if percentile is None:
        return [np.flatnonzero(z[:, j] >= threshold) for j in range(z.shape[1])]
    cuts = np.percentile(z, percentile, axis=0)
    return [np.flatnonzero(z[:, j] > cuts[j]) for j in range(z.shape[1])]


def _check_components(acts: Activations, k: int) -> None:
    limit = min(acts.n_tokens, acts.n_neurons) - 1
    if k > limit:
        raise UserError(
            f"--n-components {k} is larger than the data allows: {acts.n_tokens} tokens x {acts.n_neurons} neurons "
            f"give at most {max(limit, 0)} components; lower --n-components or collect more tokens"
        )


def default_out(acts: Activations, config: IcaConfig) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(acts.model.name).name).strip("-") or "model"
    return Path(MASK_ARTIFACTS_DIR) / f"{slug}-ica{config.n_components}-seed{config.seed}.json"


def run_ica(config: IcaConfig) -> MaskFile:
    """Find networks in an activations folder and write the mask file; returns it."""
    acts = open_activations(config.activations)
    _check_components(acts, config.n_components)
    out = config.out or default_out(acts, config)
    check_mask_out(out, config.overwrite, config.register)
    print(
        f"ica: {acts.n_tokens} tokens x {acts.n_neurons} neurons ({len(acts.layers)} layers), "
        f"{config.n_components} components, {config.restarts} restart(s)"
    )
    reduction = reduce(
        acts, config.n_components, config.standardize, config.seed, config.power_iterations, config.oversample
    )
    z, stability = unmix(reduction.maps, config.seed, config.restarts, config.max_iter, config.tol)
    members = threshold_maps(z, config.threshold, config.percentile)
    found = []
    for j, columns in enumerate(members):
        if len(columns) == 0:
            continue
        layers: dict[int, list[int]] = {}
        for column in columns:
            layer, neuron = acts.column_to_neuron(int(column))
            layers.setdefault(layer, []).append(neuron)
        stats = {
            "peak_z": round(float(z[:, j].max()), 3),
            "stability": None if np.isnan(stability[j]) else round(float(stability[j]), 3),
            "component": j,
        }
        found.append(({layer: tuple(sorted(neurons)) for layer, neurons in layers.items()}, stats))
    # Ids by size, largest first, so that id 0 is the biggest network of a file.
    found.sort(key=lambda item: (-sum(len(n) for n in item[0].values()), -item[1]["peak_z"]))
    networks = tuple(Network(i, layers, stats) for i, (layers, stats) in enumerate(found))
    source = {
        "method": "spatial-ica",
        "activations": {
            "folder": str(acts.folder),
            "manifest_digest": file_digest(acts.folder / MANIFEST_NAME),
            "n_tokens": acts.n_tokens,
            "layers": acts.layers,
            "dataset": acts.manifest.get("dataset", {}),
        },
        "ica": {
            **{k: v for k, v in asdict(config).items() if k not in ("activations", "out", "register", "overwrite")},
            "threshold_rule": "percentile" if config.percentile is not None else "zscore",
            "explained_variance_ratio": round(reduction.explained_variance_ratio, 4),
            "empty_components_dropped": config.n_components - len(networks),
        },
    }
    mask = MaskFile(model=acts.model, networks=networks, source=source)
    save_mask_file(mask, out)
    if config.register:
        register_mask(out, mask)
    covered = len({(layer, n) for network in networks for layer, ns in network.layers.items() for n in ns})
    print(
        f"ica: {len(networks)} networks covering {covered} neurons ({100 * covered / acts.n_neurons:.1f}%), "
        f"PCA kept {100 * reduction.explained_variance_ratio:.1f}% of the variance; wrote {out}"
    )
    return mask
