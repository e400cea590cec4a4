"""Consensus ICA over runs, ICASSO-style (Himberg, Hyvärinen & Esposito 2004), on the whole
data and on disjoint splits of it (as Liu et al. run ICA on disjoint text subsets).

One ICA run is a property of its seed as much as of the data: the solver stops in one of
several optima, and a map near the Gaussian part of the data moves with any rounding. And
all runs on one reduction share its subspace, so they cannot see that subspace move with
the data. So each view of the data (the whole, then each split of the records, each with
its own reduction) is unmixed `runs` times with its own seeds (and optionally a bootstrap
resample of the neurons, the samples of spatial ICA); each run's unmixing is applied to all
neurons. All runs' maps are clustered by |correlation| (average linkage, cut at
CLUSTER_SIMILARITY), and each cluster that a run on the whole data found gives:

- `quality`: ICASSO's index I_q, the mean |corr| within the cluster minus the mean |corr|
  between its members and all other maps. Near 1: a tight, isolated cluster.
- `share`: the share of all runs that put a map in the cluster. Near 1: every run of every
  view finds it, so it is in every part of the data, whatever the seed.
- its map: the mean of the whole data's core members (one per run, sign-aligned to the
  cluster's centrotype, the member most similar to the others; core: |corr| >=
  CORE_SIMILARITY with the view's member nearest the centrotype), z-scored over neurons and
  flipped so its heavier tail is positive; and the same per view. Averaging over runs is what
  makes the map, and so the thresholded network, come back with another seed, thread count or
  summation order.
  Averaging only the core is what keeps one run's other optimum out of it: on the demo, two
  processes differing only in BLAS threads (reduced data equal to 1e-14) sent one Picard run
  of the same seed to a map at |corr| 0.79 from its cluster's centrotype instead of 0.999;
  in the mean of all six runs it moved the network's neurons (IoU 0.86 between the two
  processes); in the core's mean all 13 networks agreed at IoU >= 0.95.

Solvers: Picard (python-picard, `ortho=True, extended=True`: FastICA's fixed points
reached by a quasi-Newton method, Ablin et al. 2018), the default, or scikit-learn's
FastICA (logcosh, parallel). Either is run to a tight tolerance. On the demo's reduced data
(46,080 neurons x 20) single runs of two seeds agreed, one to one at IoU >= 0.8, on 7 of 20
thresholded maps with FastICA at scikit-learn's default tol (1e-4) and on 16 at 1e-8
(600-900 iterations), and on 15-17 with Picard at 1e-5 (130-170 iterations); consensus
over 8 Picard runs of each seed agreed on 15 of the 15-16 networks emitted.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.decomposition import FastICA
from sklearn.exceptions import ConvergenceWarning

from shared.progress import progress_bar
from shared.threads import single_threaded_blas


def zscore_and_flip(sources: np.ndarray) -> np.ndarray:
    """z-score each map (column) over neurons and flip it so its heavier tail is positive (skewness > 0).

    An ICA map's sign is arbitrary, and the network is read from its positive tail. The sign
    of the single largest |z| (nilearn's rule) decides badly for a map with two tails of
    similar height: on the demo two seeds' consensus maps of one component took opposite
    signs, and the networks read from them shared 8% of their neurons. The skewness weighs
    the whole tail, so a tiny change cannot flip it unless the tails are equal in mass.
    """
    std = sources.std(axis=0)
    z = (sources - sources.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return z * np.where((z**3).mean(axis=0) < 0, -1.0, 1.0)


@dataclass(frozen=True)
class RunSpec:
    """One ICA run of the consensus: its seed and its resample of the neurons."""

    seed: int
    rows: np.ndarray | None  # bootstrap row indices; None: all neurons once


def run_specs(n_rows: int, runs: int, seed: int, bootstrap: bool) -> list[RunSpec]:
    """Seeds and resamples drawn from (seed, run index): the same runs on any machine."""
    specs = []
    for run in range(runs):
        rng = np.random.default_rng([seed, run])
        run_seed = int(rng.integers(2**31 - 1))
        rows = np.sort(rng.integers(0, n_rows, n_rows)) if bootstrap and run > 0 else None
        specs.append(RunSpec(run_seed, rows))  # run 0 sees every neuron once: the unresampled data
    return specs


def unmix_once(maps: np.ndarray, spec: RunSpec, solver: str, max_iter: int, tol: float) -> tuple[np.ndarray, bool]:
    """One ICA run fitted on the run's rows and applied to all rows: (neurons x k) z-maps, and whether
    the solver converged before max_iter (the libraries' own convergence warnings are left to the caller)."""
    fit_rows = maps if spec.rows is None else maps[spec.rows]
    k = maps.shape[1]
    if solver == "fastica":
        # Whitened here, not by FastICA(whiten=...): the reduction's maps are orthonormal, so once
        # centered all but one of their singular values are equal, and LAPACK may return singular
        # vectors with exact zeros in their first row; scikit-learn's sign fix (u *= sign(u[0]))
        # then zeroes those directions, and FastICA unmixed a subspace short of k dimensions
        # (on the planted test data 6 of 8, two networks mixed into one another).
        center = fit_rows.mean(axis=0)
        _, singular, vt = np.linalg.svd(fit_rows - center, full_matrices=False)
        whitening = vt.T / singular * np.sqrt(len(fit_rows))
        ica = FastICA(whiten=False, fun="logcosh", max_iter=max_iter, tol=tol, random_state=spec.seed)
        ica.fit((fit_rows - center) @ whitening)
        sources = (maps - center) @ whitening @ ica.components_.T
        return zscore_and_flip(sources.astype(np.float64)), bool(ica.n_iter_ < max_iter)
    if solver == "picard":
        from picard import picard

        whitening, unmixing, _, n_iter = picard(
            fit_rows.T,
            n_components=k,
            ortho=True,
            extended=True,
            random_state=spec.seed,
            max_iter=max_iter,
            tol=tol,
            return_n_iter=True,
        )
        center = fit_rows.mean(axis=0)
        sources = (unmixing @ whitening @ (maps - center).T).T
        return zscore_and_flip(sources), bool(n_iter < max_iter - 1)  # picard counts from 0 and stops at max_iter - 1
    raise ValueError(f"unknown solver {solver!r}")


CLUSTER_SIMILARITY = 0.5  # average |corr| at which the dendrogram is cut into clusters
CORE_SIMILARITY = 0.9  # |corr| with the view's member nearest the centrotype, of the members averaged


@dataclass
class Consensus:
    """The clusters of the runs' maps that hold a map of the whole data, best first (quality, share)."""

    z: np.ndarray  # (neurons, clusters) consensus maps of the whole data's runs, z-scored, skewness positive
    view_z: np.ndarray  # (views, neurons, clusters) the same per view (NaN where a view has no member)
    quality: np.ndarray  # (clusters,) ICASSO I_q
    share: np.ndarray  # (clusters,) share of all runs (every view's) with a map in the cluster
    run_z: np.ndarray  # (runs, neurons, clusters) each whole-data run's own map (NaN: the run has none)
    partial_clusters: int  # clusters that no run on the whole data found (left out)
    converged_runs: int = 0  # runs whose solver stopped before max_iter (set by consensus_ica)


def _core_mean(stacked: np.ndarray, members: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The mean of one view's members' maps, sign-aligned to `reference` (the cluster's centrotype),
    over its core: the members within CORE_SIMILARITY of the view's member nearest the centrotype.
    (Maps are z-scored over neurons, so a product over n is a correlation.)"""
    aligned = stacked[:, members] * np.where(stacked[:, members].T @ reference < 0, -1.0, 1.0)
    anchor = aligned[:, int(np.argmax(aligned.T @ reference))]
    return aligned[:, aligned.T @ anchor / len(anchor) >= CORE_SIMILARITY].mean(axis=1)


def cluster_maps(stacked: np.ndarray, run_of: np.ndarray, view_of: np.ndarray, runs: int) -> Consensus:
    """Cluster the runs' z-maps (columns of `stacked`) by |corr| (average linkage, cut at
    CLUSTER_SIMILARITY) and average each cluster, one map per run: the closest to its centrotype."""
    n = stacked.shape[0]
    views = int(view_of.max()) + 1
    similarity = np.clip(np.abs(stacked.T @ stacked) / n, 0.0, 1.0)
    np.fill_diagonal(similarity, 1.0)
    tree = linkage(squareform(1.0 - similarity, checks=False), method="average")
    labels = fcluster(tree, t=1.0 - CLUSTER_SIMILARITY, criterion="distance")
    whole_runs = runs // views  # runs per view; the whole data's are numbered 0 .. whole_runs - 1
    view_maps, run_maps, quality, share, partial = [], [], [], [], 0
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        inside = similarity[np.ix_(members, members)]
        centrotype = members[int(np.argmax(inside.sum(axis=1)))]
        best_per_run: dict[int, int] = {}
        for member in members:
            run = int(run_of[member])
            if run not in best_per_run or similarity[centrotype, member] > similarity[centrotype, best_per_run[run]]:
                best_per_run[run] = member
        chosen = np.array(sorted(best_per_run.values()))
        if not (view_of[chosen] == 0).any():
            partial += 1
            continue
        outside = np.delete(similarity[members], members, axis=1)
        within = (inside.sum() - len(members)) / max(len(members) * (len(members) - 1), 1)
        quality.append((within if len(members) > 1 else 1.0) - (outside.mean() if outside.size else 0.0))
        share.append(len(best_per_run) / runs)
        reference = stacked[:, centrotype]
        own = np.full((whole_runs, n), np.nan)
        for run, member in best_per_run.items():
            if view_of[member] == 0:
                own[run] = stacked[:, member]
        run_maps.append(own)
        view_maps.append(
            [
                _core_mean(stacked, chosen[view_of[chosen] == v], reference)
                if (view_of[chosen] == v).any()
                else np.full(n, np.nan)
                for v in range(views)
            ]
        )
    quality_arr, share_arr = np.array(quality), np.array(share)
    order = np.lexsort((-share_arr, -quality_arr))
    by_view = np.stack(view_maps, axis=2)[:, :, order]  # (views, neurons, clusters); view 0: the whole data
    z = zscore_and_flip(by_view[0])
    # Each view's map signed like the whole data's, not by its own peak: a map with two
    # tails of similar height could otherwise be read from its other tail.
    view_z = np.stack([zscore_and_flip(by_view[v]) for v in range(views)])
    view_z *= np.where(np.einsum("vnc,nc->vc", np.nan_to_num(view_z), z) < 0, -1.0, 1.0)[:, None, :]
    return Consensus(
        z=z,
        view_z=view_z,
        quality=quality_arr[order],
        share=share_arr[order],
        run_z=np.stack(run_maps, axis=2)[:, :, order],
        partial_clusters=partial,
    )


def consensus_ica(
    views: list[np.ndarray], runs: int, seed: int, solver: str, bootstrap: bool, max_iter: int, tol: float
) -> Consensus:
    """`runs` seeded (and optionally resampled) ICA runs on each view's reduced data (view 0: the
    whole data, then its disjoint splits), clustered together."""
    jobs, run_of, view_of = [], [], []
    for view, maps in enumerate(views):
        for run, spec in enumerate(run_specs(maps.shape[0], runs, seed * 1000 + view, bootstrap)):
            jobs.append((maps, spec))
            run_of += [view * runs + run] * maps.shape[1]
            view_of += [view] * maps.shape[1]
    # The runs are independent; numpy releases the GIL in the solvers' array work, so threads
    # run them in parallel, one BLAS thread each (see single_threaded_blas: with OpenBLAS's own
    # threads on top, the runs took 70 times as long). Each run's result depends on its seed
    # alone, not on the scheduling. Warning filters and BLAS limits are global, not per thread:
    # set once around the pool. Convergence is counted from the solvers' iteration counts
    # instead (Consensus.converged_runs).
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with warnings.catch_warnings(), single_threaded_blas(), ThreadPoolExecutor(workers) as pool:
        warnings.simplefilter("ignore", ConvergenceWarning)  # FastICA's
        warnings.filterwarnings("ignore", message="Picard did not converge")
        with progress_bar(total=len(jobs), desc="ica runs", unit="run", leave=False) as bar:
            results = []
            for result in pool.map(lambda job: unmix_once(job[0], job[1], solver, max_iter, tol), jobs):
                results.append(result)
                bar.update()
    stacked = np.concatenate([z for z, _ in results], axis=1)
    clusters = cluster_maps(stacked, np.array(run_of), np.array(view_of), runs * len(views))
    return replace(clusters, converged_runs=sum(converged for _, converged in results))
