"""`fn-analyze ica`: functional networks by spatial ICA over the neurons of all captured layers.

Neurons are the samples and tokens the dimensions (networks span layers, as in Liu et al.,
ICML 2025; `per_layer` runs one ICA per layer instead). The data are never held whole: the
streamed reduction (fn_analyze/reduction.py) gives the top-k principal maps over neurons,
of the whole data and of disjoint splits of its records, converged to a tolerance, in
passes over the shards, memory (neurons x components). A consensus of seeded ICA runs on
each (fn_analyze/consensus.py) gives each candidate network's map and how sure it is; each
map is z-scored over neurons, flipped so its heavier tail is positive, and thresholded;
only the stable candidates are emitted.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fn_analyze.activations import Activations, open_activations
from fn_analyze.consensus import SOLVERS, TOLERANCES, Consensus, consensus_ica
from fn_analyze.neuron_sets import set_size
from fn_analyze.preprocess import (
    SAMPLE_ROWS,
    SCALES,
    Preprocessing,
    RowFilter,
    clip_bounds,
    kept_rows,
    parse_int_list,
    sample_rows,
    set_aside_columns,
)
from fn_analyze.reduction import ENGINES, Reduction, engine_session, reduce
from shared.constants import MANIFEST_NAME, MASK_ARTIFACTS_DIR
from shared.device import choose_device
from shared.digests import file_digest
from shared.errors import UserError
from shared.mask_index import check_mask_out, register_mask
from shared.masks import MaskFile, Network, save_mask_file, union

log = logging.getLogger(__name__)


AUTO = "auto"
AUTO_CANDIDATES = (5, 10, 15, 20, 30, 40)  # the k that `--n-components auto` tries


@dataclass
class IcaConfig:
    activations: Path
    out: Path | None = None  # default: mask_artifacts/<model>-ica<k>-seed<seed>.json
    # An integer, or "auto": the candidate k (AUTO_CANDIDATES) with the most stable networks.
    n_components: int | str = 20
    # Default |z| >= 3: in a pilot on SmolLM2-135M, z >= 3 networks (about 6% of neurons for 20
    # components) hurt the model 3.7x more than random neurons of the same per-layer counts.
    threshold: float = 3.0
    percentile: float | None = None  # instead of |z|: keep neurons above this percentile of each map's |z|
    standardize: bool = False  # scale neurons to unit variance (the original tool; its networks hurt less than random)
    # Preprocessing that looks for function, not magnitude (fn_analyze/preprocess.py); none by default.
    scale: str = "none"  # none | neuron (unit variance: what standardize sets) | layer (each layer weighs the same)
    exclude_positions: list[int] = field(default_factory=list)  # token positions left out, e.g. [0]: the first
    exclude_token_ids: list[int] = field(default_factory=list)  # token ids left out, e.g. the special tokens'
    clip_percentile: float | None = None  # clip each neuron to its [100-P, P] percentiles (estimated on a sample)
    clip_sample_rows: int = SAMPLE_ROWS  # token rows sampled (seeded) for the clipping percentiles
    set_aside_top: int = 0  # the N largest-magnitude neurons: scale 0, listed in source.ica.set_aside
    seed: int = 0
    # Consensus (fn_analyze/consensus.py): `runs` ICA runs, each with its own seed, on the whole
    # data and on each of `splits` disjoint parts of the records (0: the whole data only).
    runs: int = 6
    splits: int = 2
    bootstrap: bool = False  # also resample the neurons of each run but the first
    solver: str = "picard"  # or "fastica": see fn_analyze/consensus.py for the comparison
    # A network is emitted when its cluster is tight (ICASSO I_q) and found by most runs.
    min_quality: float = 0.8
    min_share: float = 0.9
    # ...and when its own runs agree on its neurons: the median IoU of each whole-data run's
    # network with the consensus network (a network that its own runs place differently cannot
    # come back at IoU 0.9 from another seed or machine).
    min_run_iou: float = 0.9
    keep_unstable: bool = False  # emit every cluster, stable or not (each still carries its figures)
    max_iter: int = 5000
    tol: float | None = None  # the solver's tolerance; default TOLERANCES[solver], far below the libraries' own
    oversample: int | None = None  # extra columns of the reduction (default k, at least 10)
    reduction_tol: float = 1e-6  # the reduction stops when its top-k subspace moves less than this (sine)
    max_passes: int = 40
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
        self.n_components = _parse_components(self.n_components)
        self.exclude_positions = parse_int_list(self.exclude_positions, "--exclude-positions")
        self.exclude_token_ids = parse_int_list(self.exclude_token_ids, "--exclude-token-ids")
        if self.scale not in SCALES:
            raise UserError(f"unknown --scale {self.scale!r}; use one of {', '.join(SCALES)}")
        if self.standardize and self.scale not in ("none", "neuron"):
            raise UserError(f"--standardize is --scale neuron; give one of --standardize or --scale {self.scale}")
        if self.standardize:
            self.scale = "neuron"
        self.standardize = self.scale == "neuron"  # the old field, recorded as before
        if self.clip_percentile is not None and not 50 < self.clip_percentile < 100:
            raise UserError(f"--clip-percentile must lie strictly between 50 and 100, got {self.clip_percentile}")
        if self.clip_sample_rows < 100:
            raise UserError(f"--clip-sample-rows must be at least 100, got {self.clip_sample_rows}")
        if self.set_aside_top < 0:
            raise UserError(f"--set-aside must be at least 0, got {self.set_aside_top}")
        if self.runs < 1:
            raise UserError(f"--runs must be at least 1, got {self.runs}")
        if self.splits < 0 or self.splits == 1:
            raise UserError(f"--splits must be 0 (the whole data only) or at least 2, got {self.splits}")
        if self.solver not in SOLVERS:
            raise UserError(f"unknown --solver {self.solver!r}; use one of {', '.join(SOLVERS)}")
        if self.tol is None:
            self.tol = TOLERANCES[self.solver]
        for name, value in (
            ("--min-quality", self.min_quality),
            ("--min-share", self.min_share),
            ("--min-run-iou", self.min_run_iou),
        ):
            if not 0 <= value <= 1:
                raise UserError(f"{name} must lie between 0 and 1, got {value}")
        if self.percentile is not None and not 0 < self.percentile < 100:
            raise UserError(f"--percentile must lie strictly between 0 and 100, got {self.percentile}")
        if self.threshold <= 0:
            raise UserError(f"--threshold must be a positive z-score, got {self.threshold}")
        if self.oversample is not None and self.oversample < 0:
            raise UserError(f"--oversample must be at least 0, got {self.oversample}")
        if self.engine not in ENGINES:
            raise UserError(f"unknown --engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        if self.dask_scheduler is not None and self.engine != "dask":
            raise UserError("--dask-scheduler needs --engine dask; add it or drop --dask-scheduler")

    @property
    def row_filter(self) -> RowFilter:
        return RowFilter(tuple(self.exclude_positions), tuple(self.exclude_token_ids))

    def oversample_for(self, k: int) -> int:
        """Extra columns of the reduction: as many as k (at least 10), so convergence goes as
        lambda_{2k+1} / lambda_k per pass, unless set."""
        return self.oversample if self.oversample is not None else max(10, k)


def _parse_components(value: int | str) -> int | str:
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--n-components must be an integer or auto, got {value!r}") from None
    if k < 1:
        raise UserError(f"--n-components must be at least 1, got {k}")
    return k


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


def column_groups(acts: Activations, per_layer: bool) -> list[tuple[int, int]]:
    """[start, stop) column ranges that each get their own ICA: all layers, or each layer."""
    if not per_layer:
        return [(0, acts.n_neurons)]
    size = acts.intermediate_size
    return [(slot * size, (slot + 1) * size) for slot in range(len(acts.layers))]


def _component_limit(acts: Activations, per_layer: bool, n_rows: int) -> int:
    neurons = acts.intermediate_size if per_layer else acts.n_neurons
    return min(n_rows, neurons) - 1


def _rows_kept(acts: Activations, config: IcaConfig) -> int:
    """Token rows that enter the ICA; refused when the row filter leaves none, or the set-aside all neurons."""
    n_rows = kept_rows(acts, config.row_filter)
    if n_rows == 0:
        raise UserError(
            f"--exclude-positions {config.exclude_positions} / --exclude-token-ids {config.exclude_token_ids} leave "
            f"no token row of {acts.folder} ({acts.n_tokens} tokens); leave out fewer"
        )
    if config.set_aside_top >= acts.n_neurons:
        raise UserError(
            f"--set-aside {config.set_aside_top} would set aside all {acts.n_neurons} neurons of {acts.folder}; "
            "give fewer"
        )
    return n_rows


def _components_to_try(acts: Activations, config: IcaConfig, n_rows: int | None = None) -> tuple[int, ...]:
    """The k to run: the one asked for, or the auto candidates the data (the kept token rows) allow."""
    n_rows = _rows_kept(acts, config) if n_rows is None else n_rows
    limit = _component_limit(acts, config.per_layer, n_rows)
    neurons = acts.intermediate_size if config.per_layer else acts.n_neurons
    kept = f"{n_rows} tokens" if n_rows == acts.n_tokens else f"{n_rows} kept tokens (of {acts.n_tokens})"
    where = f"{kept} x {neurons} neurons{' per layer' if config.per_layer else ''}"
    if config.n_components == AUTO:
        candidates = tuple(k for k in AUTO_CANDIDATES if k <= limit)
        if not candidates:
            raise UserError(
                f"--n-components auto needs at least {AUTO_CANDIDATES[0]} components, but {where} give at most "
                f"{max(limit, 0)}; collect more tokens"
            )
        return candidates
    k = int(config.n_components)
    if k > limit:
        raise UserError(
            f"--n-components {k} is larger than the data allows: {where} give at most {max(limit, 0)} components; "
            "lower --n-components or collect more tokens"
        )
    return (k,)


def default_out(acts: Activations, config: IcaConfig) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(acts.model.name).name).strip("-") or "model"
    per_layer = "-per-layer" if config.per_layer else ""
    name = f"{slug}-ica{config.n_components}{per_layer}{_prep_slug(config)}-seed{config.seed}.json"
    return Path(MASK_ARTIFACTS_DIR) / name


def _prep_slug(config: IcaConfig) -> str:
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
    if config.set_aside_top:
        parts.append(f"aside{config.set_aside_top}")
    return "".join(f"-{part}" for part in parts)


def _reduction_device(requested: str) -> str:
    """CUDA or CPU: the products accumulate in float64, which MPS lacks."""
    device = choose_device(requested)
    return str(device) if device.type == "cuda" else "cpu"


def _network_of(z_map: np.ndarray, config: IcaConfig) -> set[int]:
    """The columns of one map's network, thresholded as every map is."""
    return set(threshold_maps(z_map[:, None], config.threshold, config.percentile)[0].tolist())


def _iou(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(len(a | b), 1)


def run_agreement(result: Consensus, config: IcaConfig) -> np.ndarray:
    """Per cluster, the median over the whole data's runs of the IoU between the run's own network
    (its map thresholded as the consensus map is) and the consensus network; 0 where no run has one."""
    agreement = np.zeros(result.z.shape[1])
    for j in range(result.z.shape[1]):
        network = _network_of(result.z[:, j], config)
        ious = [_iou(network, _network_of(m, config)) for m in result.run_z[:, :, j] if not np.isnan(m).any()]
        agreement[j] = float(np.median(ious)) if ious else 0.0
    return agreement


def _is_stable(result: Consensus, agreement: np.ndarray, config: IcaConfig) -> np.ndarray:
    """Which clusters are emitted; `agreement`: run_agreement(result, config)."""
    return (
        (result.quality >= config.min_quality) & (result.share >= config.min_share) & (agreement >= config.min_run_iou)
    )


@dataclass
class Candidate:
    """The consensus of every column group at one k."""

    k: int
    results: list[Consensus]

    def stable_count(self, config: IcaConfig) -> int:
        return int(sum(_is_stable(result, run_agreement(result, config), config).sum() for result in self.results))


def _consensus_at(reductions: list[list[Reduction]], k: int, config: IcaConfig) -> Candidate:
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


def _split_iou(result: Consensus, j: int, config: IcaConfig) -> float | None:
    """Mean IoU, over pairs of splits, of the network as each split's runs find it (None: not computed,
    or a split did not find it)."""
    parts = result.view_z[1:, :, j]
    if len(parts) < 2 or np.isnan(parts).any():
        return None
    sets = [_network_of(part, config) for part in parts]
    return float(np.mean([_iou(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]]))


def _networks(
    acts: Activations,
    reductions: list[list[Reduction]],
    chosen: Candidate,
    config: IcaConfig,
    set_aside: tuple[int, ...] = (),
) -> tuple[list[tuple[dict[int, tuple[int, ...]], dict[str, Any]]], list[dict[str, Any]]]:
    """(layers, stats) of each emitted network, and the figures of the clusters left out as unstable;
    no network holds a set-aside column (their maps are flat there, this makes it certain)."""
    found, unstable = [], []
    for group, (views, result) in enumerate(zip(reductions, chosen.results, strict=True)):
        agreement = run_agreement(result, config)
        stable = _is_stable(result, agreement, config)
        offset = views[0].columns[0]
        for j, members in enumerate(threshold_maps(result.z, config.threshold, config.percentile)):
            if set_aside:
                members = members[~np.isin(members + offset, set_aside)]
            stats = {
                "quality": round(float(result.quality[j]), 3),
                "share": round(float(result.share[j]), 3),
                "run_iou": round(float(agreement[j]), 3),
                "split_iou": None if (iou := _split_iou(result, j, config)) is None else round(iou, 3),
                "peak_z": round(float(np.abs(result.z[:, j]).max()), 3),
                "component": j if len(reductions) == 1 else f"{group}:{j}",
                "stable": bool(stable[j]),
            }
            if not stable[j] and not config.keep_unstable:
                unstable.append({**stats, "size": int(len(members))})
                continue
            if len(members) == 0:
                continue
            layers: dict[int, list[int]] = {}
            for column in members:
                layer, neuron = acts.column_to_neuron(offset + int(column))
                layers.setdefault(layer, []).append(neuron)
            found.append(({layer: tuple(sorted(neurons)) for layer, neurons in layers.items()}, stats))
    # Ids by size, largest first, so that id 0 is the biggest network of a file.
    found.sort(key=lambda item: (-sum(len(n) for n in item[0].values()), -item[1]["peak_z"]))
    return found, unstable


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


def unmix_activations(acts: Activations, config: IcaConfig) -> Unmixed:
    """The streamed reduction, then the consensus at each k to try; prints what it does."""
    n_rows = _rows_kept(acts, config)
    candidates = _components_to_try(acts, config, n_rows)
    device = _reduction_device(config.device)
    prep = _preprocessing(acts, config)
    k_max = max(candidates)
    oversample = config.oversample_for(k_max)
    with engine_session(config.dask_scheduler):  # connected before anything is printed
        print(
            f"ica: {acts.n_tokens} tokens x {acts.n_neurons} neurons ({len(acts.layers)} layers), "
            f"{config.n_components} components{' per layer' if config.per_layer else ''}, consensus of "
            f"{config.runs} {config.solver} run(s){' on bootstrap resamples' if config.bootstrap else ''} on the "
            f"whole data{f' and on each of {config.splits} disjoint splits of the records' if config.splits else ''}, "
            f"reduction on {device} ({config.engine}){_describe_prep(acts, config, prep, n_rows)}"
        )
        reductions = reduce(
            acts,
            column_groups(acts, config.per_layer),
            k_max,
            prep,
            config.seed,
            oversample,
            config.reduction_tol,
            config.max_passes,
            config.splits,
            config.engine,
            device,
        )
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


def _preprocessing(acts: Activations, config: IcaConfig) -> Preprocessing:
    """The config's preprocessing, with what it needs from the data: clipping bounds from a seeded
    sample of the kept rows (one streamed pass), the set-aside neurons from their magnitudes."""
    clip = None
    if config.clip_percentile is not None:
        sample = sample_rows(acts, config.row_filter, config.clip_sample_rows, config.seed)
        clip = clip_bounds(sample, config.clip_percentile)
    set_aside = tuple(set_aside_columns(acts, config.set_aside_top)) if config.set_aside_top else ()
    return Preprocessing(config.row_filter, clip, config.scale, set_aside)


def _describe_prep(acts: Activations, config: IcaConfig, prep: Preprocessing, n_rows: int) -> str:
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


def _set_aside_record(acts: Activations, prep: Preprocessing) -> dict[str, Any]:
    layers: dict[str, list[int]] = {}
    for column in prep.set_aside:
        layer, neuron = acts.column_to_neuron(column)
        layers.setdefault(str(layer), []).append(neuron)
    return {
        "rule": "largest max |activation| over the activations' tokens (as evaluate's --top-n)",
        "size": len(prep.set_aside),
        "layers": {layer: sorted(neurons) for layer, neurons in sorted(layers.items(), key=lambda i: int(i[0]))},
    }


def run_ica(config: IcaConfig) -> MaskFile:
    """Find networks in an activations folder and write the mask file; returns it."""
    acts = open_activations(config.activations)
    _components_to_try(acts, config)  # refused before anything is written (and before a set-aside or sample pass)
    out = config.out or default_out(acts, config)
    check_mask_out(out, config.overwrite, config.register)
    unmixed = unmix_activations(acts, config)
    reductions, tried, chosen = unmixed.reductions, unmixed.tried, unmixed.chosen
    found, unstable = _networks(acts, reductions, chosen, config, unmixed.prep.set_aside)
    networks = tuple(Network(i, layers, stats) for i, (layers, stats) in enumerate(found))
    whole = [views[0] for views in reductions]
    explained = sum(r.eigenvalues[: chosen.k].sum() for r in whole) / max(sum(r.total_variance for r in whole), 1e-300)
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
            "n_components": chosen.k,
            "n_components_requested": config.n_components,
            "stable_per_k": {str(c.k): c.stable_count(config) for c in tried},
            "oversample": config.oversample_for(max(c.k for c in tried)),
            "threshold_rule": "abs-percentile" if config.percentile is not None else "abs-zscore",
            "rows_kept": whole[0].n_rows,
            "explained_variance_ratio": round(float(explained), 4),
            "reduction": _reduction_record(reductions, chosen.k),
            "converged_runs": int(min(r.converged_runs for r in chosen.results)),
            "partial_clusters": int(sum(r.partial_clusters for r in chosen.results)),
            "unstable": unstable,
            "empty_components_dropped": sum(len(r.quality) for r in chosen.results) - len(networks) - len(unstable),
        },
    }
    if unmixed.prep.set_aside:
        source["ica"]["set_aside"] = _set_aside_record(acts, unmixed.prep)
    mask = MaskFile(model=acts.model, networks=networks, source=source)
    save_mask_file(mask, out)
    if config.register:
        register_mask(out, mask)
    covered = set_size(union(networks))
    if config.n_components == AUTO:
        counts = ", ".join(f"k={c.k}: {c.stable_count(config)}" for c in tried)
        print(f"ica: --n-components auto chose k={chosen.k}, the most stable networks ({counts})")
    print(
        f"ica: {len(networks)} networks covering {covered} neurons ({100 * covered / acts.n_neurons:.1f}%); "
        f"{len(unstable)} unstable component(s) left out (quality < {config.min_quality}, share < "
        f"{config.min_share} or run IoU < {config.min_run_iou}; --keep-unstable emits them); "
        f"PCA kept {100 * explained:.1f}% of the variance "
        f"({whole[0].passes} reduction passes); wrote {out}"
    )
    return mask
