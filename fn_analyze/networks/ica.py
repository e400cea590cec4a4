"""`fn-analyze ica`: functional networks by spatial ICA over the neurons of all captured layers.

Neurons are the samples and tokens the dimensions (networks span layers, as in Liu et al.,
ICML 2025; `per_layer` runs one ICA per layer instead). The data are never held whole: the
streamed reduction (fn_analyze/networks/reduction.py) gives the top-k principal maps over neurons,
of the whole data and of disjoint splits of its records, converged to a tolerance, in
passes over the shards, memory (neurons x components). A consensus of seeded ICA runs on
each (fn_analyze/networks/consensus.py) gives each candidate network's map and how sure it is; each
map is z-scored over neurons, flipped so its heavier tail is positive, and thresholded;
only the stable candidates are emitted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from fn_analyze.config import AUTO, SET_ASIDE_AUTO_MAX, SET_ASIDE_AUTO_RATIO, IcaConfig, IcaParams, IcaSettings
from fn_analyze.networks.consensus import Consensus, consensus_ica
from fn_analyze.networks.data_needed import meets_floor, refuse_below_floor, warn_little_data
from fn_analyze.networks.preprocess import (
    Preprocessing,
    RowFilter,
    clip_bounds,
    kept_rows,
    sample_rows,
    set_aside_columns,
)
from fn_analyze.networks.reduction import Reduction, ReductionSettings, engine_session, reduce
from fn_analyze.neurons.neuron_sets import set_size
from fn_analyze.record.activations import Activations, open_activations
from fn_analyze.record.model_rows import ModelRows, model_rows
from fn_analyze.record.token_rows import ActivationMatrix, TokenRows, describe_source, read_source
from shared.constants import MANIFEST_NAME, MASK_ARTIFACTS_DIR
from shared.device import choose_device
from shared.digests import file_digest
from shared.errors import ParameterError
from shared.mask_index import check_mask_out, register_mask
from shared.masks import MaskFile, ModelInfo, Network, save_mask_file, union
from shared.progress import progress_log
from shared.threads import choose_torch_threads

log = logging.getLogger(__name__)
say = progress_log("ica")


AUTO_CANDIDATES = (5, 10, 15, 20, 30, 40)  # the k that `--n-components auto` tries
Z_DECIMALS = 3  # a mask file's per-neuron z (`--keystone` ranks by it), as its other figures


def threshold_maps(z: np.ndarray, threshold: float, percentile: float | None) -> list[np.ndarray]:
    """Column indices of each map's network: |z| >= threshold, or |z| above the map's percentile.

    Both tails: an ICA map's sign is arbitrary, and a map with two tails of similar mass
    (neurons that load strongly positive and strongly negative on one component) was read
    from one tail with one seed and from the other with the next (IoU 0 between the two
    networks, on the demo). Every neuron far from zero in either direction belongs to it.
    """
    magnitude = np.abs(z)
    if percentile is None:
        return [np.flatnonzero(magnitude[:, j] >= threshold) for j in range(z.shape[1])]
    cuts = np.percentile(magnitude, percentile, axis=0)
    return [np.flatnonzero(magnitude[:, j] > cuts[j]) for j in range(z.shape[1])]


def column_groups(acts: TokenRows, per_layer: bool) -> list[tuple[int, int]]:
    """[start, stop) column ranges that each get their own ICA: all layers, or each layer."""
    if not per_layer:
        return [(0, acts.n_neurons)]
    size = acts.intermediate_size
    return [(slot * size, (slot + 1) * size) for slot in range(len(acts.layers))]


def _component_limit(acts: TokenRows, per_layer: bool, n_rows: int) -> int:
    neurons = acts.intermediate_size if per_layer else acts.n_neurons
    return min(n_rows, neurons) - 1


def _row_filter(config: IcaParams) -> RowFilter:
    return RowFilter(tuple(config.exclude_positions), tuple(config.exclude_token_ids))


def _rows_kept(acts: TokenRows, config: IcaParams) -> int:
    """Token rows that enter the ICA; refused when the row filter leaves none, or the set-aside all neurons."""
    n_rows = kept_rows(acts, _row_filter(config))
    where = describe_source(acts)
    if n_rows == 0:
        raise ParameterError(
            "{exclude_positions} {positions} / {exclude_token_ids} {token_ids} leave no token row of {where} "
            "({n} tokens); leave out fewer",
            positions=config.exclude_positions,
            token_ids=config.exclude_token_ids,
            where=where,
            n=acts.n_tokens,
        )
    if config.set_aside_top != AUTO and config.set_aside_top >= acts.n_neurons:
        raise ParameterError(
            "{set_aside_top} {given} would set aside all {n} neurons of {where}; give fewer",
            given=config.set_aside_top,
            n=acts.n_neurons,
            where=where,
        )
    return n_rows


def _components_to_try(acts: TokenRows, config: IcaParams, n_rows: int | None = None) -> tuple[int, ...]:
    """The k to run: the one asked for, or the auto candidates the data (the kept token rows) allow."""
    n_rows = _rows_kept(acts, config) if n_rows is None else n_rows
    limit = _component_limit(acts, config.per_layer, n_rows)
    neurons = acts.intermediate_size if config.per_layer else acts.n_neurons
    kept = f"{n_rows} tokens" if n_rows == acts.n_tokens else f"{n_rows} kept tokens (of {acts.n_tokens})"
    where = f"{kept} x {neurons} neurons{' per layer' if config.per_layer else ''}"
    if config.n_components == AUTO:
        candidates = tuple(k for k in AUTO_CANDIDATES if k <= limit)
        if candidates and not config.allow_little_data:  # the k whose parts hold enough tokens (data_needed.py)
            enough = tuple(k for k in candidates if meets_floor(n_rows, k, config.oversample_for(k), config.splits))
            if not enough:
                refuse_below_floor(n_rows, candidates[0], config.oversample_for(candidates[0]), config.splits)
            candidates = enough
        if not candidates:
            raise ParameterError(
                "{n_components} auto needs at least {least} components, but {where} give at most {most}; "
                "collect more tokens",
                least=AUTO_CANDIDATES[0],
                where=where,
                most=max(limit, 0),
            )
        return candidates
    k = int(config.n_components)
    if k > limit:
        raise ParameterError(
            "{n_components} {k} is larger than the data allows: {where} give at most {most} components; "
            "lower {n_components} or collect more tokens",
            k=k,
            where=where,
            most=max(limit, 0),
        )
    if not config.allow_little_data:
        refuse_below_floor(n_rows, k, config.oversample_for(k), config.splits)
    return (k,)


def default_out(acts: Activations, config: IcaParams) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(acts.model.name).name).strip("-") or "model"
    per_layer = "-per-layer" if config.per_layer else ""
    name = f"{slug}-ica{config.n_components}{per_layer}{_prep_slug(config)}-seed{config.seed}.json"
    return Path(MASK_ARTIFACTS_DIR) / name


def _prep_slug(config: IcaParams) -> str:
    """The preprocessing in a file name, so that preprocessed runs do not overwrite plain ones ("" for none)."""
    parts = []
    if config.exclude_positions:
        parts.append("nopos" + "_".join(map(str, config.exclude_positions)))
    if config.exclude_token_ids:
        parts.append(f"notok{len(config.exclude_token_ids)}")
    if config.clip_percentile is not None:
        parts.append(f"clip{config.clip_percentile:g}")
    if config.scale == "layer":
        parts.append("layerscale")
    if config.set_aside_top != AUTO:  # the default (auto) leaves the name as it is
        parts.append(f"aside{config.set_aside_top}")
    return "".join(f"-{part}" for part in parts)


def _reduction_device(requested: str) -> str:
    """CUDA or CPU: the products accumulate in float64, which MPS lacks."""
    device = choose_device(requested)
    return str(device) if device.type == "cuda" else "cpu"


def _network_of(z_map: np.ndarray, config: IcaParams) -> set[int]:
    """The columns of one map's network, thresholded as every map is."""
    return set(threshold_maps(z_map[:, None], config.threshold, config.percentile)[0].tolist())


def _iou(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(len(a | b), 1)


def run_agreement(result: Consensus, config: IcaParams) -> np.ndarray:
    """Per cluster, the median over the whole data's runs of the IoU between the run's own network
    (its map thresholded as the consensus map is) and the consensus network; 0 where no run has one."""
    agreement = np.zeros(result.z.shape[1])
    for j in range(result.z.shape[1]):
        network = _network_of(result.z[:, j], config)
        ious = [_iou(network, _network_of(m, config)) for m in result.run_z[:, :, j] if not np.isnan(m).any()]
        agreement[j] = float(np.median(ious)) if ious else 0.0
    return agreement


def _is_stable(result: Consensus, agreement: np.ndarray, config: IcaParams) -> np.ndarray:
    """Which clusters are emitted; `agreement`: run_agreement(result, config)."""
    return (
        (result.quality >= config.min_quality) & (result.share >= config.min_share) & (agreement >= config.min_run_iou)
    )


@dataclass
class Candidate:
    """The consensus of every column group at one k."""

    k: int
    results: list[Consensus]

    def stable_count(self, config: IcaParams) -> int:
        return int(sum(_is_stable(result, run_agreement(result, config), config).sum() for result in self.results))


def _consensus_at(reductions: list[list[Reduction]], k: int, config: IcaParams) -> Candidate:
    assert config.tol is not None
    return Candidate(
        k,
        [
            consensus_ica(
                [view.maps[:, :k] for view in views],
                config.runs,
                config.seed,
                config.solver,
                config.bootstrap,
                config.max_iter,
                config.tol,
            )
            for views in reductions
        ],
    )


def _split_iou(result: Consensus, j: int, config: IcaParams) -> float | None:
    """Mean IoU, over pairs of splits, of the network as each split's runs find it (None: not computed,
    or a split did not find it)."""
    parts = result.view_z[1:, :, j]
    if len(parts) < 2 or np.isnan(parts).any():
        return None
    sets = [_network_of(part, config) for part in parts]
    return float(np.mean([_iou(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]]))


@dataclass(frozen=True)
class FoundNetwork:
    """One consensus map thresholded: its network's neurons and how sure the map is, each figure
    rounded as a mask file records it."""

    neurons: tuple[tuple[int, int, float], ...]  # (layer, neuron, signed z in the map), by column
    quality: float  # ICASSO's cluster quality
    share: float  # of the runs that found the map
    run_iou: float  # median IoU of the whole data's runs' networks with this one
    split_iou: float | None  # mean IoU of the splits' networks (None: not computed, or a split lacks it)
    peak_z: float  # the map's largest |z|
    component: int | str  # the map's index (group:index with one ICA per layer)
    stable: bool  # passes the min_quality, min_share and min_run_iou levels

    @property
    def size(self) -> int:
        return len(self.neurons)

    @property
    def stats(self) -> dict[str, Any]:
        """The figures a mask file's network carries."""
        return {
            "quality": self.quality,
            "share": self.share,
            "run_iou": self.run_iou,
            "split_iou": self.split_iou,
            "peak_z": self.peak_z,
            "component": self.component,
            "stable": self.stable,
        }

    def network(self) -> Network:
        """As a mask file's network (id -1 until numbered), each layer's neurons sorted with their z."""
        layers: dict[int, list[tuple[int, float]]] = {}
        for layer, neuron, z in self.neurons:
            layers.setdefault(layer, []).append((neuron, z))
        by_layer = {layer: sorted(pairs) for layer, pairs in layers.items()}
        return Network(
            -1,
            {layer: tuple(n for n, _ in pairs) for layer, pairs in by_layer.items()},
            self.stats,
            {layer: tuple(z for _, z in pairs) for layer, pairs in by_layer.items()},
        )


def found_networks(
    acts: TokenRows,
    reductions: list[list[Reduction]],
    chosen: Candidate,
    config: IcaParams,
    set_aside: tuple[int, ...] = (),
) -> list[FoundNetwork]:
    """Every consensus map of the chosen k thresholded, group by group, each neuron's signed z rounded
    to Z_DECIMALS; no network holds a set-aside column (their maps are flat there, this makes it certain)."""
    found = []
    for group, (views, result) in enumerate(zip(reductions, chosen.results, strict=True)):
        agreement = run_agreement(result, config)
        stable = _is_stable(result, agreement, config)
        offset = views[0].columns[0]
        for j, members in enumerate(threshold_maps(result.z, config.threshold, config.percentile)):
            if set_aside:
                members = members[~np.isin(members + offset, set_aside)]
            neurons = tuple(
                (*acts.column_to_neuron(offset + int(column)), round(float(result.z[column, j]), Z_DECIMALS))
                for column in members
            )
            found.append(
                FoundNetwork(
                    neurons,
                    quality=round(float(result.quality[j]), 3),
                    share=round(float(result.share[j]), 3),
                    run_iou=round(float(agreement[j]), 3),
                    split_iou=None if (iou := _split_iou(result, j, config)) is None else round(iou, 3),
                    peak_z=round(float(np.abs(result.z[:, j]).max()), 3),
                    component=j if len(reductions) == 1 else f"{group}:{j}",
                    stable=bool(stable[j]),
                )
            )
    return found


def emitted_networks(found: list[FoundNetwork], keep_unstable: bool) -> tuple[Network, ...]:
    """The stable networks (every one with `keep_unstable`) that hold a neuron, numbered by size,
    largest first, so that id 0 is the biggest network of a file."""
    networks = [f.network() for f in found if (f.stable or keep_unstable) and f.size]
    networks.sort(key=lambda network: (-network.size, -network.stats["peak_z"]))
    return tuple(replace(network, id=i) for i, network in enumerate(networks))


def _reduction_record(reductions: list[list[Reduction]], k: int) -> dict[str, Any]:
    """How the reduction ended; the eigen-gap is eigenvalue k over eigenvalue k+1, the smallest over groups
    (near 1: the k-th principal map is barely defined, so the k-dimensional subspace is fragile)."""
    every = [view for views in reductions for view in views]
    gaps = [r.gap_at(k) for r in every]
    return {
        "passes": every[0].passes,
        "tolerance": every[0].tolerance,
        "converged": all(r.converged for r in every),
        "subspace_change": float(max(r.subspace_change for r in every)),
        "eigen_gap": round(float(min(gaps)), 4),
    }


@dataclass
class Unmixed:
    """What the reduction and the consensus found, before thresholding."""

    reductions: list[list[Reduction]]  # [column group][view]
    tried: list[Candidate]  # one per k tried
    chosen: Candidate  # the k kept: the most stable networks, then the smaller k
    prep: Preprocessing  # what the reduction applied before its products


def unmix_activations(acts: TokenRows, config: IcaParams) -> Unmixed:
    """The streamed reduction, then the consensus at each k to try; says what it does (progress log)."""
    n_rows = _rows_kept(acts, config)
    candidates = _components_to_try(acts, config, n_rows)
    device = _reduction_device(config.device)
    prep = _preprocessing(acts, config)
    k_max = max(candidates)
    oversample = config.oversample_for(k_max)
    warn_little_data(n_rows, acts.intermediate_size if config.per_layer else acts.n_neurons, k_max, config.splits)
    with engine_session(config.dask_scheduler):  # connected before anything is said
        say.info(
            f"ica: {acts.n_tokens} tokens x {acts.n_neurons} neurons ({len(acts.layers)} layers), "
            f"{config.n_components} components{' per layer' if config.per_layer else ''}, consensus of "
            f"{config.runs} {config.solver} run(s){' on bootstrap resamples' if config.bootstrap else ''} on the "
            f"whole data{f' and on each of {config.splits} disjoint splits of the records' if config.splits else ''}, "
            f"reduction on {device} ({config.engine}){_describe_prep(acts, config, prep, n_rows)}"
        )
        settings = ReductionSettings(
            groups=tuple(column_groups(acts, config.per_layer)),
            k=k_max,
            prep=prep,
            seed=config.seed,
            oversample=oversample,
            tol=config.reduction_tol,
            max_passes=config.max_passes,
            splits=config.splits,
            engine=config.engine,
            device=device,
            hold=config.in_memory,
        )
        reductions = reduce(acts, settings)
    if not all(view.converged for views in reductions for view in views):
        record = _reduction_record(reductions, k_max)
        log.warning(
            "the reduction's top-%d maps still moved by %.1e after %d passes (eigen-gap at k: %.4f): "
            "components past the data's real ones are not defined by the data; they come out unstable. "
            "Lower --n-components (or try auto), or raise --max-passes",
            k_max,
            record["subspace_change"],
            record["passes"],
            record["eigen_gap"],
        )
    tried = [_consensus_at(reductions, k, config) for k in candidates]
    chosen = max(tried, key=lambda c: (c.stable_count(config), -c.k))
    return Unmixed(reductions, tried, chosen, prep)


def _preprocessing(acts: TokenRows, config: IcaParams) -> Preprocessing:
    """The config's preprocessing, with what it needs from the data: clipping bounds from a seeded
    sample of the kept rows (one streamed pass), the set-aside neurons from their magnitudes."""
    clip = None
    if config.clip_percentile is not None:
        sample = sample_rows(acts, _row_filter(config), config.clip_sample_rows, config.seed)
        clip = clip_bounds(sample, config.clip_percentile)
    if config.set_aside_top == AUTO:  # none for the keep-only recipe (see SET_ASIDE_AUTO_MAX)
        auto = config.scale != "layer"
        set_aside = tuple(set_aside_columns(acts, SET_ASIDE_AUTO_MAX, min_ratio=SET_ASIDE_AUTO_RATIO)) if auto else ()
    else:
        set_aside = tuple(set_aside_columns(acts, config.set_aside_top)) if config.set_aside_top else ()
    return Preprocessing(_row_filter(config), clip, config.scale, set_aside)


def _describe_prep(acts: TokenRows, config: IcaParams, prep: Preprocessing, n_rows: int) -> str:
    """The preprocessing in words for the opening line ("" when there is none)."""
    parts = []
    if prep.rows:
        parts.append(f"{n_rows} of {acts.n_tokens} token rows kept")
    if prep.clip is not None:
        parts.append(f"values clipped at the {config.clip_percentile:g}th percentiles")
    if prep.scale == "layer":
        parts.append("each layer scaled to equal variance")
    if prep.set_aside:
        parts.append(f"the {len(prep.set_aside)} largest-magnitude neurons set aside")
    return f"; {', '.join(parts)}" if parts else ""


def _set_aside_record(acts: TokenRows, prep: Preprocessing) -> dict[str, Any]:
    layers: dict[str, list[int]] = {}
    for column in prep.set_aside:
        layer, neuron = acts.column_to_neuron(column)
        layers.setdefault(str(layer), []).append(neuron)
    return {
        "rule": "largest max |activation| over the activations' tokens (as evaluate's --top-n)",
        "size": len(prep.set_aside),
        "layers": {layer: sorted(neurons) for layer, neurons in sorted(layers.items(), key=lambda i: int(i[0]))},
    }


# Settings of the ICA that say where it ran, not what it found: left out of a mask file's record.
_NOT_RECORDED = ("engine", "dask_scheduler", "device", "in_memory")


@dataclass(kw_only=True, eq=False, repr=False)
class NetworkICA(BaseEstimator, IcaSettings):
    """Functional networks by spatial ICA, as a scikit-learn estimator: settings in the constructor
    (the parameters of `fn-analyze ica`, `fn_analyze.config.IcaSettings`, keyword-only), kept as
    given and checked when `fit` runs; learning in `fit`, what it learned in attributes with a
    trailing underscore, nothing written and nothing printed (progress goes to the
    `fn.progress.ica` logger). `get_params`, `set_params` and `sklearn.base.clone` work as on any
    estimator.

    >>> ica = NetworkICA(n_components=20).fit("runs/acts")        # an activations folder
    >>> ica = NetworkICA(n_components=8).fit(X, layers=[0, 1, 2])  # tokens x neurons, layer-major
    >>> ica.networks_[0].layers, ica.quality_, ica.to_mask_file().save("networks.json")

    Fitted attributes:

    - `networks_`: the emitted networks (`shared.masks.Network`), largest first, as a mask file holds them;
    - `maps_`: (maps, neurons) the consensus maps, z-scored over neurons (one ICA per layer: each map is 0
      outside its layer), thresholded into the networks at `threshold`;
    - `quality_`, `share_`, `run_iou_`, `split_iou_` (NaN: not computed), `stable_`: per map, how sure it
      is (cluster quality, share of runs, agreement of the runs' networks and of the splits');
    - `n_components_` (the k used), `stable_per_k_`, `explained_variance_ratio_`, `reduction_` (how the
      reduction converged), `unstable_` (the maps left out), `set_aside_` (the massive neurons kept out);
    - `mean_`, `scale_`, `clip_`: the preprocessing `transform` repeats; `layers_`, `n_rows_`.
    """

    def fit(
        self,
        X: TokenRows | np.ndarray | str | Path,
        layers: Sequence[int] | None = None,
        records: Sequence[int] | np.ndarray | None = None,
        positions: Sequence[int] | np.ndarray | None = None,
        token_ids: Sequence[int] | np.ndarray | None = None,
    ) -> NetworkICA:
        """Find the networks in an activations folder (a path, or the `Activations` that `collect`
        returns) or an array of tokens x neurons. An array's columns are layer-major over `layers`
        (default one layer, 0); `records` (each row its own by default) decide the splits, `positions`
        and `token_ids` (0 by default) what `exclude_positions` and `exclude_token_ids` leave out.
        A bad parameter is refused here, naming it (`shared.errors.ParameterError`). The first fit or
        model load of a process chooses torch's threads as the commands do (`shared.threads`)."""
        params = IcaParams(**self.get_params())
        choose_torch_threads()
        if isinstance(X, np.ndarray):
            acts: TokenRows = ActivationMatrix.of(X, layers, records, positions, token_ids)
        else:
            if any(given is not None for given in (layers, records, positions, token_ids)):
                raise ParameterError(
                    "{layers}, {records}, {positions} and {token_ids} describe an array; an "
                    "activations folder records its own"
                )
            acts = read_source(X)
        _components_to_try(acts, params)  # refused before a set-aside or sample pass
        unmixed = unmix_activations(acts, params)
        reductions, tried, chosen = unmixed.reductions, unmixed.tried, unmixed.chosen
        found = found_networks(acts, reductions, chosen, params, unmixed.prep.set_aside)
        whole = [views[0] for views in reductions]
        explained = sum(r.eigenvalues[: chosen.k].sum() for r in whole) / max(
            sum(r.total_variance for r in whole), 1e-300
        )
        self.networks_ = emitted_networks(found, params.keep_unstable)
        self.maps_ = np.concatenate(
            [
                _full_width(result.z.T, views[0].columns, acts.n_neurons)
                for views, result in zip(reductions, chosen.results, strict=True)
            ]
        )
        self.quality_ = np.array([f.quality for f in found])
        self.share_ = np.array([f.share for f in found])
        self.run_iou_ = np.array([f.run_iou for f in found])
        self.split_iou_ = np.array([np.nan if f.split_iou is None else f.split_iou for f in found])
        self.stable_ = np.array([f.stable for f in found])
        self.unstable_ = [{**f.stats, "size": f.size} for f in found if not f.stable and not params.keep_unstable]
        self.n_components_ = chosen.k
        self.stable_per_k_ = {c.k: c.stable_count(params) for c in tried}
        self.explained_variance_ratio_ = float(explained)
        self.reduction_ = _reduction_record(reductions, chosen.k)
        self.set_aside_ = _set_aside_record(acts, unmixed.prep)["layers"] if unmixed.prep.set_aside else {}
        self.mean_ = np.concatenate([r.mean for r in whole])
        self.scale_ = None if whole[0].scale is None else np.concatenate([r.scale for r in whole])
        self.clip_ = unmixed.prep.clip
        self.layers_ = list(acts.layers)
        self.n_rows_ = whole[0].n_rows
        self._acts = acts
        self._mask_source = {
            "method": "spatial-ica-per-layer" if params.per_layer else "spatial-ica",
            "activations": _activations_record(acts),
            "ica": self._ica_record(params, acts, tried, chosen, unmixed.prep),
        }
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Each map's activity on each token row of `X` (tokens x neurons, the columns fitted on): the
        least-squares loadings of the rows, preprocessed as in `fit`, on the maps; (tokens, maps)."""
        self._check_fitted()
        if not isinstance(X, np.ndarray) or X.ndim != 2 or X.shape[1] != self.maps_.shape[1]:
            raise ParameterError(
                "{X} must be an array of tokens x {n} neurons (the columns fitted on), got {got}",
                n=self.maps_.shape[1],
                got=getattr(X, "shape", type(X).__name__),
            )
        rows = X.astype(np.float64)
        if self.clip_ is not None:
            rows = np.clip(rows, self.clip_[0], self.clip_[1])
        rows = rows - self.mean_
        if self.scale_ is not None:
            rows = rows * self.scale_
        return np.linalg.lstsq(self.maps_.T, rows.T, rcond=None)[0].T

    def to_mask_file(self, model: ModelInfo | None = None) -> MaskFile:
        """The networks as a mask file of `model` (default: the model an activations folder was
        recorded on; an array's networks need it). Refused for a model whose layers or MLP width
        the fitted columns do not match, or another model than the folder's."""
        self._check_fitted()
        acts = self._acts
        recorded = not isinstance(acts, ActivationMatrix)  # a folder's or a model's rows know their model
        if model is None:
            if not recorded:
                raise ParameterError(
                    "{model} is needed to make a mask file of networks fitted on an array; "
                    "give shared.models.model_info(model)"
                )
            model = acts.model
        if recorded and model.fingerprint != acts.model.fingerprint:
            raise ParameterError(
                "{model} {name!r} is not the model the activations were recorded on ({recorded!r}); "
                "give that model's ModelInfo",
                name=model.name,
                recorded=acts.model.name,
            )
        if model.intermediate_size != acts.intermediate_size or max(acts.layers) >= model.n_layers:
            raise ParameterError(
                "{model} {name!r} has {n_layers} layers of {width} neurons; the networks were fitted on layers "
                "{layers} of {fitted} neurons each",
                name=model.name,
                n_layers=model.n_layers,
                width=model.intermediate_size,
                layers=list(acts.layers),
                fitted=acts.intermediate_size,
            )
        return MaskFile(model=model, networks=self.networks_, source=self._mask_source)

    def _check_fitted(self) -> None:
        if not hasattr(self, "networks_"):
            raise ParameterError("this NetworkICA is not fitted yet; call fit({X}) first")

    def _ica_record(
        self, params: IcaParams, acts: TokenRows, tried: list[Candidate], chosen: Candidate, prep: Preprocessing
    ) -> dict[str, Any]:
        """What a mask file's `source.ica` records: the checked settings, and how the fit went."""
        record = {
            **{k: v for k, v in asdict(params).items() if k not in _NOT_RECORDED},
            "n_components": chosen.k,
            "n_components_requested": params.n_components,
            "stable_per_k": {str(k): count for k, count in self.stable_per_k_.items()},
            "oversample": params.oversample_for(max(c.k for c in tried)),
            "threshold_rule": "abs-percentile" if params.percentile is not None else "abs-zscore",
            "rows_kept": self.n_rows_,
            "explained_variance_ratio": round(self.explained_variance_ratio_, 4),
            "reduction": self.reduction_,
            "converged_runs": int(min(r.converged_runs for r in chosen.results)),
            "partial_clusters": int(sum(r.partial_clusters for r in chosen.results)),
            "unstable": self.unstable_,
            "empty_components_dropped": sum(len(r.quality) for r in chosen.results)
            - len(self.networks_)
            - len(self.unstable_),
        }
        if prep.set_aside:
            record["set_aside"] = _set_aside_record(acts, prep)
        return record


def _full_width(maps: np.ndarray, columns: tuple[int, int], width: int) -> np.ndarray:
    """(maps, group's neurons) maps placed in (maps, all neurons), 0 outside the group."""
    full = np.zeros((len(maps), width))
    full[:, columns[0] : columns[1]] = maps
    return full


def _activations_record(acts: TokenRows) -> dict[str, Any]:
    """What a mask file's `source.activations` records of the data: the folder and its manifest, or the array."""
    if isinstance(acts, ActivationMatrix):
        return {"array": True, "n_tokens": acts.n_tokens, "layers": list(acts.layers)}
    if isinstance(acts, ModelRows):
        return acts.record()
    return {
        "folder": str(acts.folder),
        "manifest_digest": file_digest(acts.folder / MANIFEST_NAME),
        "n_tokens": acts.n_tokens,
        "layers": acts.layers,
        "dataset": acts.manifest.get("dataset", {}),
    }


def run_ica(config: IcaConfig) -> MaskFile:
    """`fn-analyze ica`: fit `NetworkICA` on an activations folder (or on a model's rows over a dataset,
    recomputed on each pass), write the mask file (and its line in the folder's index.json); returns it."""
    acts = open_activations(config.activations) if config.activations else model_rows(config.recording())
    estimator = NetworkICA(**config.params)
    _components_to_try(acts, config)  # refused before anything is written
    out = config.out or default_out(acts, config)
    check_mask_out(out, config.overwrite, config.register)
    mask = estimator.fit(acts).to_mask_file()
    save_mask_file(mask, out)
    if config.register:
        register_mask(out, mask)
    covered = set_size(union(mask.networks))
    if config.n_components == AUTO:
        counts = ", ".join(f"k={k}: {count}" for k, count in estimator.stable_per_k_.items())
        say.info(f"ica: --n-components auto chose k={estimator.n_components_}, the most stable networks ({counts})")
    say.info(
        f"ica: {len(mask.networks)} networks covering {covered} neurons ({100 * covered / acts.n_neurons:.1f}%); "
        f"{len(estimator.unstable_)} unstable component(s) left out (quality < {config.min_quality}, share < "
        f"{config.min_share} or run IoU < {config.min_run_iou}; --keep-unstable emits them); "
        f"PCA kept {100 * estimator.explained_variance_ratio_:.1f}% of the variance "
        f"({estimator.reduction_['passes']} reduction passes); wrote {out}"
    )
    return mask
