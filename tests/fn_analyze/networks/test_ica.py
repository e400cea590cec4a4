"""ICA: planted networks are found; bad component counts are refused."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fn_analyze.networks.ica import IcaConfig, run_ica
from fn_analyze.report.show import describe
from shared.errors import UserError
from shared.masks import load_mask_file
from shared.progress import PROGRESS
from tests.helpers.activations import write_activations

LAYERS = [0, 1, 2]
WIDTH = 200  # neurons per layer
# With more components than planted sources, the reduction's last maps lie in a plateau of
# equal noise eigenvalues and never converge (the warning says so): tests of the consensus
# stop it after 15 passes instead of the default 40, which changes nothing they check.


def _planted(seed: int = 0, tokens: int = 4000, n_networks: int = 5, size: int = 24):
    """Activations where each planted network's neurons share one sparse time course, plus noise.

    Networks span layers (their neurons are drawn from all of them), as real ones do.
    """
    rng = np.random.default_rng(seed)
    n_neurons = len(LAYERS) * WIDTH
    order = rng.permutation(n_neurons)
    networks = [set(order[i * size : (i + 1) * size].tolist()) for i in range(n_networks)]
    data = rng.normal(0.0, 1.0, (tokens, n_neurons)) + rng.normal(0.0, 2.0, n_neurons)  # noise, per-neuron offsets
    for members in networks:
        course = rng.laplace(0.0, 1.0, tokens) * (rng.random(tokens) < 0.3)  # sparse, heavy-tailed
        weights = rng.uniform(1.0, 2.0, len(members))
        data[:, sorted(members)] += 3.0 * course[:, None] * weights
    return data.astype(np.float32), networks


def _found_sets(mask) -> list[set[int]]:
    return [
        {LAYERS.index(layer) * WIDTH + n for layer, neurons in network.layers.items() for n in neurons}
        for network in mask.networks
    ]


def _iou(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b)


def test_planted_networks_are_recovered(tmp_path: Path) -> None:
    data, planted = _planted()
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=1500)  # 3 shards
    mask = run_ica(IcaConfig(activations=folder, out=tmp_path / "m.json", n_components=8, runs=3, register=False))
    found = _found_sets(mask)
    for members in planted:
        best = max(_iou(members, other) for other in found)
        assert best >= 0.8, f"planted network matched with IoU {best:.2f}"
    assert load_mask_file(tmp_path / "m.json") == mask
    assert all(0.0 <= network.stats["quality"] <= 1.0 for network in mask.networks)


def test_percentile_threshold_keeps_the_top_share(tmp_path: Path) -> None:
    data, _ = _planted(tokens=1500)
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH)
    mask = run_ica(
        IcaConfig(activations=folder, out=tmp_path / "p.json", n_components=5, percentile=99.0, runs=1, register=False)
    )
    assert len(mask.networks) == 5
    assert all(network.size == 6 for network in mask.networks)  # 1% of 600 neurons


def test_too_many_components_is_refused_with_the_limit(tmp_path: Path) -> None:
    data, _ = _planted(tokens=30)
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH)
    with pytest.raises(
        UserError, match="n_components 40 is larger than the data allows: .* at most 29 components; lower n_components "
    ):
        run_ica(IcaConfig(activations=folder, out=tmp_path / "m.json", n_components=40))
    assert not (tmp_path / "m.json").exists()


def test_standardize_option_is_recorded(tmp_path: Path) -> None:
    data, _ = _planted(tokens=800)
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH)
    mask = run_ica(
        IcaConfig(activations=folder, out=tmp_path / "s.json", n_components=4, standardize=True, runs=1, register=False)
    )
    assert mask.source["ica"]["standardize"] is True
    assert mask.source["activations"]["n_tokens"] == 800


def test_missing_or_unfinished_activations_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        run_ica(IcaConfig(activations=tmp_path / "none", out=tmp_path / "m.json"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "shard-r00-00000.h5.partial").write_bytes(b"")
    with pytest.raises(UserError, match="unfinished shard"):
        run_ica(IcaConfig(activations=tmp_path / "half", out=tmp_path / "m.json"))


def test_per_layer_mode_finds_each_layers_networks_within_that_layer(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.normal(0.0, 1.0, (3000, len(LAYERS) * WIDTH)).astype(np.float32)
    planted = []
    for slot in range(len(LAYERS)):  # two networks of 10 neurons in each layer
        order = slot * WIDTH + rng.permutation(WIDTH)
        for members in (order[:10], order[10:20]):
            course = rng.laplace(0.0, 1.0, 3000) * (rng.random(3000) < 0.3)
            data[:, members] += 3.0 * course[:, None] * rng.uniform(1.0, 2.0, len(members))
            planted.append(set(members.tolist()))
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=1000)
    mask = run_ica(
        IcaConfig(
            activations=folder, out=tmp_path / "m.json", n_components=4, per_layer=True, max_passes=15, register=False
        )
    )
    assert all(len(network.layers) == 1 for network in mask.networks)
    assert mask.source["method"] == "spatial-ica-per-layer"
    found = _found_sets(mask)
    for members in planted:
        assert max(_iou(members, other) for other in found) >= 0.8
    with pytest.raises(UserError, match=f"3000 tokens x {WIDTH} neurons per layer"):
        run_ica(IcaConfig(activations=folder, out=tmp_path / "n.json", n_components=WIDTH, per_layer=True))


def test_consensus_figures_are_stored_and_unstable_components_left_out(tmp_path: Path) -> None:
    data, planted = _planted()
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=1500)
    mask = run_ica(
        IcaConfig(activations=folder, out=tmp_path / "m.json", n_components=8, runs=6, max_passes=15, register=False)
    )
    found = _found_sets(mask)
    # The planted networks are properties of the data: every run finds them, in tight clusters.
    for members in planted:
        best = max(range(len(found)), key=lambda i: _iou(members, found[i]))
        assert _iou(members, found[best]) >= 0.8
        stats = mask.networks[best].stats
        assert stats["share"] == 1.0 and stats["quality"] >= 0.9 and stats["stable"] is True
        assert stats["split_iou"] >= 0.8  # the even and the odd tokens' runs find it alike
        assert stats["run_iou"] >= 0.9  # each run on the whole data finds its neurons alike
        row = describe(mask).splitlines()[7 + best]  # shown by `show`
        assert f"{stats['quality']:.2f}  1.00  {stats['run_iou']:.2f}  |" in row
    # 5 sources, 8 components: the 3 others are noise, clustered loosely, and not emitted.
    assert len(mask.networks) == len(planted)
    unstable = mask.source["ica"]["unstable"]
    assert len(unstable) == 3
    assert all(c["quality"] < 0.8 or c["share"] < 0.9 or c["run_iou"] < 0.9 for c in unstable)
    assert "left out as unstable (3;" in describe(mask)
    kept = run_ica(
        IcaConfig(
            activations=folder,
            out=tmp_path / "k.json",
            n_components=8,
            runs=6,
            keep_unstable=True,
            max_passes=15,
            register=False,
        )
    )
    assert len(kept.networks) > len(planted)
    assert sum(not network.stats["stable"] for network in kept.networks) == len(kept.networks) - len(planted)


@pytest.mark.slow  # about 12 s: two consensus runs
def test_two_seeds_give_the_same_networks(tmp_path: Path) -> None:
    data, _ = _planted()
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=1500)
    config = dict(activations=folder, n_components=8, runs=4, max_passes=15, register=False)
    first = _found_sets(run_ica(IcaConfig(out=tmp_path / "a.json", seed=0, **config)))
    second = _found_sets(run_ica(IcaConfig(out=tmp_path / "b.json", seed=1, **config)))
    assert len(first) == len(second) == 5
    for members in first:
        assert max(_iou(members, other) for other in second) >= 0.95


@pytest.mark.slow  # about 30 s: several consensus runs
def test_float16_rounding_and_block_size_do_not_move_the_networks(tmp_path: Path, monkeypatch) -> None:
    """The same planted data, stored after a perturbation that only changes float16 rounding
    (about 1 in 4 values moves by one unit in the last place), and reduced with another block
    size (another summation order): the same networks come back."""
    import fn_analyze.networks.reduction as reduction

    data, planted = _planted()
    nudged = data * np.float32(1 + 2**-12)  # below float16's resolution (2**-11): rounding decides
    assert 0.05 < np.mean(data.astype(np.float16) != nudged.astype(np.float16)) < 0.95
    config = dict(n_components=8, runs=4, max_passes=15, register=False)
    base = run_ica(
        IcaConfig(
            activations=write_activations(tmp_path / "a", data, LAYERS, WIDTH, 1500), out=tmp_path / "a.json", **config
        )
    )
    monkeypatch.setattr(reduction, "BLOCK_BYTES", 4 * len(LAYERS) * WIDTH * 97)  # blocks of 97 token rows
    moved = run_ica(
        IcaConfig(
            activations=write_activations(tmp_path / "b", nudged, LAYERS, WIDTH, 700), out=tmp_path / "b.json", **config
        )
    )
    first, second = _found_sets(base), _found_sets(moved)
    assert len(first) == len(second) == len(planted)
    for members in first:
        assert max(_iou(members, other) for other in second) >= 0.95


def test_auto_components_chooses_the_k_with_the_most_stable_networks(tmp_path: Path, caplog, monkeypatch) -> None:
    import fn_analyze.networks.ica as ica

    caplog.set_level(logging.INFO, logger=PROGRESS)
    monkeypatch.setattr(ica, "AUTO_CANDIDATES", (3, 5, 8))  # the default's 5-40 take minutes on 2 cores
    data, planted = _planted(n_networks=5)
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=1500)
    mask = run_ica(
        IcaConfig(
            activations=folder, out=tmp_path / "m.json", n_components="auto", runs=3, max_passes=15, register=False
        )
    )
    ica = mask.source["ica"]
    assert ica["n_components_requested"] == "auto"
    counts = {int(k): v for k, v in ica["stable_per_k"].items()}
    assert ica["n_components"] == min(k for k, v in counts.items() if v == max(counts.values()))
    assert len(mask.networks) == counts[ica["n_components"]] >= len(planted)
    found = _found_sets(mask)
    for members in planted:
        assert max(_iou(members, other) for other in found) >= 0.8
    assert f"--n-components auto chose k={ica['n_components']}" in caplog.text
    with pytest.raises(UserError, match="n_components must be an integer or auto, got 'many'"):
        IcaConfig(activations=folder, n_components="many")


@pytest.mark.slow  # about 15 s: a dask LocalCluster starts and stops
def test_dask_engine_gives_the_local_engines_networks(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    data, _ = _planted()
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=700)  # 6 shards: a 3-level tree
    config = dict(activations=folder, n_components=8, runs=2, max_passes=15, register=False)
    local = run_ica(IcaConfig(out=tmp_path / "local.json", **config))
    threads = run_ica(IcaConfig(out=tmp_path / "threads.json", engine="dask", **config))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        remote = run_ica(
            IcaConfig(out=tmp_path / "cluster.json", engine="dask", dask_scheduler=cluster.scheduler_address, **config)
        )
        with Client(cluster.scheduler_address) as client:
            assert client.run(lambda: 1)  # the workers answered, so the tasks ran on them
    expected = _found_sets(local)
    assert _found_sets(threads) == expected
    assert _found_sets(remote) == expected


def test_reduction_matches_the_exact_principal_subspace(tmp_path: Path) -> None:
    from fn_analyze.networks.preprocess import Preprocessing
    from fn_analyze.networks.reduction import ReductionSettings, reduce
    from fn_analyze.record.activations import open_activations

    data, _ = _planted(tokens=2000)
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=600)
    exact_data = data.astype(np.float16).astype(np.float64)
    centered = exact_data - exact_data.mean(axis=0)
    eigenvalues, vectors = np.linalg.eigh(centered.T @ centered)
    top = vectors[:, ::-1][:, :5]
    settings = ReductionSettings(((0, data.shape[1]),), 5, Preprocessing(), seed=0, tol=1e-6, max_passes=100)
    ((reduction,),) = reduce(open_activations(folder), settings)
    assert reduction.converged and reduction.passes < 100
    np.testing.assert_allclose(reduction.eigenvalues, eigenvalues[::-1][:5], rtol=1e-6)
    assert np.linalg.norm(top - reduction.maps @ (reduction.maps.T @ top)) < 1e-5  # same subspace
    # The gap at k uses the (k+1)-th Ritz value, a lower bound of eigenvalue k+1 that converges more slowly.
    true_gap = eigenvalues[::-1][4] / eigenvalues[::-1][5]
    assert true_gap <= reduction.eigen_gap <= 1.1 * true_gap
    # Another random start converges to the same maps (each signed by its peak).
    ((other,),) = reduce(open_activations(folder), replace(settings, seed=7))
    np.testing.assert_allclose(other.maps, reduction.maps, atol=1e-5)


def test_ica_finds_the_components_of_sklearns_default_fastica(tmp_path: Path) -> None:
    """On a matrix that fits in memory, the streamed stage agrees with FastICA(whiten="unit-variance")
    fitted on the whole (neurons x tokens) matrix: each of its maps matched with |corr| >= 0.95."""
    from sklearn.decomposition import FastICA

    from fn_analyze.networks.consensus import consensus_ica
    from fn_analyze.networks.preprocess import Preprocessing
    from fn_analyze.networks.reduction import ReductionSettings, reduce
    from fn_analyze.record.activations import open_activations

    data, _ = _planted(tokens=2000, n_networks=6)
    data -= data.mean(axis=0)  # ica centers each neuron; hand sklearn the same centered matrix
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=1000)
    settings = ReductionSettings(((0, data.shape[1]),), 6, Preprocessing(), seed=0, tol=1e-6, max_passes=100)
    ((reduction,),) = reduce(open_activations(folder), settings)
    ours = consensus_ica([reduction.maps], runs=3, seed=0, solver="picard", bootstrap=False, max_iter=5000, tol=1e-6).z
    reference = FastICA(n_components=6, whiten="unit-variance", random_state=0).fit_transform(
        data.astype(np.float16).astype(np.float64).T
    )
    corr = np.abs(np.corrcoef(ours.T, reference.T)[:6, 6:])
    assert corr.max(axis=0).min() >= 0.95, corr.max(axis=0)


def test_fastica_solver_finds_the_planted_networks_and_is_recorded(tmp_path: Path) -> None:
    data, planted = _planted()
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=1500)
    mask = run_ica(
        IcaConfig(
            activations=folder,
            out=tmp_path / "m.json",
            n_components=8,
            runs=3,
            solver="fastica",
            max_passes=15,
            register=False,
        )
    )
    assert mask.source["ica"]["solver"] == "fastica" and mask.source["ica"]["tol"] == 1e-8
    assert mask.source["ica"]["converged_runs"] == 9  # 3 runs on the whole data and on each of 2 splits
    found = _found_sets(mask)
    for members in planted:
        assert max(_iou(members, other) for other in found) >= 0.8
    with pytest.raises(UserError, match="unknown solver 'jade'; use one of picard, fastica"):
        IcaConfig(activations=folder, solver="jade")


def test_a_run_in_another_optimum_stays_out_of_the_consensus_map() -> None:
    """Runs that land in one optimum agree; one run in another optimum (|corr| about 0.8 with them)
    still joins their cluster but not their map: the map is the mean of the others alone."""
    from fn_analyze.networks.consensus import cluster_maps, zscore_and_flip

    rng = np.random.default_rng(0)
    n, runs = 5000, 6
    source, other = rng.laplace(size=n), rng.laplace(size=n)
    maps = [source + 0.05 * rng.normal(size=n) for _ in range(runs - 1)]
    maps.append(0.8 * source + 0.6 * other)  # the same component, another optimum
    unrelated = [rng.laplace(size=n) for _ in range(runs)]  # each run's second map, its own
    stacked = zscore_and_flip(np.column_stack([m for pair in zip(maps, unrelated, strict=True) for m in pair]))
    run_of = np.repeat(np.arange(runs), 2)
    result = cluster_maps(stacked, run_of, np.zeros(2 * runs, dtype=int), runs)

    found = int(np.argmax(result.share))
    assert result.share[found] == 1.0  # the run in another optimum is counted in the cluster...
    expected = zscore_and_flip(stacked[:, 0 : 2 * (runs - 1) : 2].mean(axis=1, keepdims=True))[:, 0]
    np.testing.assert_allclose(result.z[:, found], expected, atol=1e-12)  # ...but not averaged into its map


def test_a_network_its_own_runs_place_differently_is_not_emitted() -> None:
    """Quality and share high, but the runs' own networks differ from the consensus network: the
    median run IoU (a hand count) is below --min-run-iou, so the cluster is unstable."""
    from fn_analyze.networks.consensus import Consensus
    from fn_analyze.networks.ica import _is_stable, run_agreement

    n = 1000
    consensus = np.zeros((n, 1))
    consensus[:20, 0] = 5.0  # the network: neurons 0-19
    runs = np.zeros((4, n, 1))
    for run, start in enumerate((0, 0, 4, 10)):  # runs find 0-19, 0-19, 4-23, 10-29
        runs[run, start : start + 20, 0] = 5.0
    result = Consensus(
        z=consensus,
        view_z=consensus[None],
        quality=np.array([0.95]),
        share=np.array([1.0]),
        run_z=runs,
        partial_clusters=0,
    )
    config = IcaConfig(activations=Path("unused"), register=False)
    hand = np.median([1.0, 1.0, 16 / 24, 10 / 30])
    np.testing.assert_allclose(run_agreement(result, config), [hand])
    assert not _is_stable(result, run_agreement(result, config), config)[0]
    lenient = IcaConfig(activations=Path("unused"), register=False, min_run_iou=0.8)
    assert _is_stable(result, run_agreement(result, lenient), lenient)[0]
