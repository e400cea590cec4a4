"""`fn-analyze ica`: functional networks by spatial ICA over the neurons of all captured layers.

Neurons are the samples and tokens the dimensions (networks span layers, as in Liu et al.,
ICML 2025; `per_layer` runs one ICA per layer instead). The data are never held whole: the
streamed reduction (fn_analyze/reduction.py) gives the top-k principal maps over neurons
in a few passes over the shards, memory (neurons x components). FastICA then runs on the
(neurons x k) reduced data with seeded restarts; each map is z-scored over neurons,
flipped so its peak is positive, and thresholded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.decomposition import FastICA

from fn_analyze.activations import Activations, open_activations
from fn_analyze.reduction import ENGINES, engine_session, reduce
from shared.constants import MANIFEST_NAME, MASK_ARTIFACTS_DIR
from shared.device import choose_device
from shared.digests import file_digest
from shared.errors import UserError
from shared.mask_index import check_mask_out, register_mask
from shared.masks import MaskFile, Network, save_mask_file

log = logging.getLogger(__name__)


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
    per_layer: bool = False  # one ICA per layer (n_components each) instead of one over all layers
    engine: str = "local"  # or "dask": the reduction's sum over shards as dask tasks (see reduction.py)
    dask_scheduler: str | None = None  # address of a dask.distributed scheduler (default: dask's local one)
    device: str = "auto"  # where the reduction's products run: CUDA when present, else CPU
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
        if self.engine not in ENGINES:
            raise UserError(f"unknown --engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        if self.dask_scheduler is not None and self.engine != "dask":
            raise UserError("--dask-scheduler needs --engine dask; add it or drop --dask-scheduler")


def _zscore_and_flip(sources: np.ndarray) -> np.ndarray:
    """z-score each map (column) over neurons and flip it so its largest |z| is positive."""
    z = (sources - sources.mean(axis=0)) / np.where(sources.std(axis=0) > 0, sources.std(axis=0), 1.0)
    peaks = z[np.abs(z).argmax(axis=0), np.arange(z.shape[1])]
    return z * np.where(peaks < 0, -1.0, 1.0)


def _kurtosis(z: np.ndarray) -> np.ndarray:
    return (z**4).mean(axis=0) - 3.0


REAPPEAR_CORRELATION = 0.9  # |corr| at which a map counts as found again in another restart


@dataclass
class Unmixed:
    z: np.ndarray  # (neurons, k) z-scored maps of the kept restart
    match: np.ndarray  # (k,) mean over the other restarts of the best |corr| with any of their maps
    reappearance: np.ndarray  # (k,) share of the other restarts holding a map with |corr| >= 0.9


def unmix(maps: np.ndarray, seed: int, restarts: int, max_iter: int, tol: float) -> Unmixed:
    """FastICA on the (neurons x k) reduced data with seeded restarts.

    Keeps the run whose maps are sparsest (largest mean excess kurtosis, the quantity
    FastICA's contrast approximates) and scores each of its maps against the other
    restarts, ICASSO-style: how well (`match`) and how often (`reappearance`) it is found
    again. A map found in every restart is a property of the data, not of the seed.
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
        nan = np.full(chosen.shape[1], np.nan)
        return Unmixed(chosen, nan, nan)
    n = chosen.shape[0]
    best_corr = np.clip([np.abs(chosen.T @ other / n).max(axis=1) for other in others], 0.0, 1.0)
    return Unmixed(chosen, best_corr.mean(axis=0), (best_corr >= REAPPEAR_CORRELATION).mean(axis=0))


def threshold_maps(z: np.ndarray, threshold: float, percentile: float | None) -> list[np.ndarray]:
    """Column indices of each map's network: z >= threshold, or above the map's percentile."""
    if percentile is None:
        return [np.flatnonzero(z[:, j] >= threshold) for j in range(z.shape[1])]
    cuts = np.percentile(z, percentile, axis=0)
    return [np.flatnonzero(z[:, j] > cuts[j]) for j in range(z.shape[1])]


def column_groups(acts: Activations, per_layer: bool) -> list[tuple[int, int]]:
    """[start, stop) column ranges that each get their own ICA: all layers, or each layer."""
    if not per_layer:
        return [(0, acts.n_neurons)]
    size = acts.intermediate_size
    return [(slot * size, (slot + 1) * size) for slot in range(len(acts.layers))]


def _check_components(acts: Activations, k: int, per_layer: bool) -> None:
    neurons = acts.intermediate_size if per_layer else acts.n_neurons
    limit = min(acts.n_tokens, neurons) - 1
    if k > limit:
        raise UserError(
            f"--n-components {k} is larger than the data allows: {acts.n_tokens} tokens x {neurons} neurons"
            f"{' per layer' if per_layer else ''} give at most {max(limit, 0)} components; "
            "lower --n-components or collect more tokens"
        )


def default_out(acts: Activations, config: IcaConfig) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(acts.model.name).name).strip("-") or "model"
    per_layer = "-per-layer" if config.per_layer else ""
    return Path(MASK_ARTIFACTS_DIR) / f"{slug}-ica{config.n_components}{per_layer}-seed{config.seed}.json"


def _reduction_device(requested: str) -> str:
    """CUDA or CPU: the products accumulate in float64, which MPS lacks."""
    device = choose_device(requested)
    return str(device) if device.type == "cuda" else "cpu"


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 3)


def run_ica(config: IcaConfig) -> MaskFile:
    """Find networks in an activations folder and write the mask file; returns it."""
    acts = open_activations(config.activations)
    _check_components(acts, config.n_components, config.per_layer)
    out = config.out or default_out(acts, config)
    check_mask_out(out, config.overwrite, config.register)
    device = _reduction_device(config.device)
    groups = column_groups(acts, config.per_layer)
    with engine_session(config.dask_scheduler):  # connected before anything is printed
        print(
            f"ica: {acts.n_tokens} tokens x {acts.n_neurons} neurons ({len(acts.layers)} layers), "
            f"{config.n_components} components{' per layer' if config.per_layer else ''}, "
            f"{config.restarts} restart(s), reduction on {device} ({config.engine})"
        )
        reductions = reduce(
            acts,
            groups,
            config.n_components,
            config.standardize,
            config.seed,
            config.power_iterations,
            config.oversample,
            config.engine,
            device,
        )
    found = []
    for reduction in reductions:
        unmixed = unmix(reduction.maps, config.seed, config.restarts, config.max_iter, config.tol)
        offset = reduction.columns[0]
        for j, members in enumerate(threshold_maps(unmixed.z, config.threshold, config.percentile)):
            if len(members) == 0:
                continue
            layers: dict[int, list[int]] = {}
            for column in members:
                layer, neuron = acts.column_to_neuron(offset + int(column))
                layers.setdefault(layer, []).append(neuron)
            stats = {
                "peak_z": round(float(unmixed.z[:, j].max()), 3),
                "stability": _rounded(unmixed.match[j]),
                "reappearance": _rounded(unmixed.reappearance[j]),
                "component": j,
            }
            found.append(({layer: tuple(sorted(neurons)) for layer, neurons in layers.items()}, stats))
    # Ids by size, largest first, so that id 0 is the biggest network of a file.
    found.sort(key=lambda item: (-sum(len(n) for n in item[0].values()), -item[1]["peak_z"]))
    networks = tuple(Network(i, layers, stats) for i, (layers, stats) in enumerate(found))
    explained = sum(r.eigenvalues.sum() for r in reductions) / max(sum(r.total_variance for r in reductions), 1e-300)
    source = {
        "method": "spatial-ica-per-layer" if config.per_layer else "spatial-ica",
        "activations": {
            "folder": str(acts.folder),
            "manifest_digest": file_digest(acts.folder / MANIFEST_NAME),
            "n_tokens": acts.n_tokens,
            "layers": acts.layers,
            "dataset": acts.manifest.get("dataset", {}),
        },
        "ica": {
            **{
                k: v
                for k, v in asdict(config).items()
                if k not in ("activations", "out", "register", "overwrite", "engine", "dask_scheduler", "device")
            },
            "threshold_rule": "percentile" if config.percentile is not None else "zscore",
            "explained_variance_ratio": round(float(explained), 4),
            "empty_components_dropped": config.n_components * len(groups) - len(networks),
        },
    }
    mask = MaskFile(model=acts.model, networks=networks, source=source)
    save_mask_file(mask, out)
    if config.register:
        register_mask(out, mask)
    covered = len({(layer, n) for network in networks for layer, ns in network.layers.items() for n in ns})
    print(
        f"ica: {len(networks)} networks covering {covered} neurons ({100 * covered / acts.n_neurons:.1f}%), "
        f"PCA kept {100 * explained:.1f}% of the variance; wrote {out}"
    )
    return mask
