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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fn_analyze.activations import Activations, open_activations
from fn_analyze.config import AUTO, SET_ASIDE_AUTO_MAX, SET_ASIDE_AUTO_RATIO, IcaConfig
from fn_analyze.consensus import Consensus, consensus_ica
from fn_analyze.neuron_sets import set_size
from fn_analyze.preprocess import (
    Preprocessing,
    clip_bounds,
    kept_rows,
    sample_rows,
    set_aside_columns,
)
from fn_analyze.reduction import Reduction, engine_session, reduce
from shared.constants import MANIFEST_NAME, MASK_ARTIFACTS_DIR
from shared.device import choose_device
from shared.digests import file_digest
from shared.errors import UserError
from shared.mask_index import check_mask_out, register_mask
from shared.masks import MaskFile, Network, save_mask_file, union

log = logging.getLogger(__name__)


AUTO_CANDIDATES = (5, 10, 15, 20, 30, 40)  # the k that `--n-components auto` tries


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
    if config.set_aside_top != AUTO and config.set_aside_top >= acts.n_neurons:
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
    if config.set_aside_top != AUTO:  # the default (auto) leaves the name as it is
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
    if config.set_aside_top == AUTO:  # none for the keep-only recipe (see SET_ASIDE_AUTO_MAX)
        auto = config.scale != "layer"
        set_aside = tuple(set_aside_columns(acts, SET_ASIDE_AUTO_MAX, min_ratio=SET_ASIDE_AUTO_RATIO)) if auto else ()
    else:
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
