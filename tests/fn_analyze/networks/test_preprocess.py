"""Preprocessing before the ICA: each option changes what it claims, and nothing else; the
default changes nothing; bad values are refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fn_analyze.cli import app as analyze_app
from fn_analyze.networks.ica import IcaConfig, run_ica
from fn_analyze.networks.preprocess import (
    Preprocessing,
    RowFilter,
    clip_bounds,
    inverse_scales,
    sample_rows,
    set_aside_columns,
)
from fn_analyze.networks.reduction import ReductionSettings, reduce, shard_moments, shards_of, sum_over_shards
from fn_analyze.neurons.neuron_sets import pairs
from fn_analyze.record.activations import open_activations
from fn_analyze.report.show import describe
from shared.errors import UserError
from shared.masks import union
from tests.helpers.activations import write_activations
from tests.helpers.processes import refused

runner = CliRunner()
LAYERS = [0, 1, 2]
WIDTH = 40
K = 3


def _data(tokens: int = 900, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sparse sources over neurons of all layers plus noise, layers of very different variance, and
    each row's position in a sequence of 10 tokens."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(tokens, len(LAYERS) * WIDTH))
    for _ in range(3):
        course = rng.laplace(size=tokens) * (rng.random(tokens) < 0.3)
        data[:, rng.choice(data.shape[1], 12, replace=False)] += 3.0 * course[:, None]
    data[:, 2 * WIDTH :] *= 6.0  # the last layer has 36x the variance, as real last layers have more
    return data.astype(np.float32), np.arange(tokens) % 10


def _exact_top(matrix: np.ndarray, k: int) -> np.ndarray:
    """The top-k eigenvalues of the centered matrix's X^T X, from float16-rounded values as the shards hold them."""
    x = matrix.astype(np.float64)
    x = x - x.mean(axis=0)
    return np.linalg.eigvalsh(x.T @ x)[::-1][:k]


def _reduce(folder: Path, prep: Preprocessing, splits: int = 0, groups=None, max_passes: int = 100):
    acts = open_activations(folder)
    groups = tuple(groups or [(0, acts.n_neurons)])
    settings = ReductionSettings(groups, K, prep, seed=0, oversample=10, tol=1e-7, max_passes=max_passes, splits=splits)
    return reduce(acts, settings)


def test_default_preprocessing_changes_nothing(tmp_path: Path) -> None:
    data, positions = _data()
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=400, positions=positions)
    plain = _reduce(folder, Preprocessing(), splits=2)
    # A filter that keeps every row runs the filtering code path: the same bits come out.
    noop = _reduce(folder, Preprocessing(rows=RowFilter(positions=(99,))), splits=2)
    for a, b in zip(plain[0], noop[0], strict=True):
        assert np.array_equal(a.maps, b.maps) and np.array_equal(a.eigenvalues, b.eigenvalues)
        assert a.total_variance == b.total_variance and a.n_rows == b.n_rows
    assert inverse_scales(np.ones((1, 3 * WIDTH)), WIDTH, "none", ()) is None  # centered only, no multiply
    common = dict(n_components=K, runs=1, register=False, set_aside_top=0)  # no preprocessing at all
    mask = run_ica(IcaConfig(activations=folder, out=tmp_path / "a.json", **common))
    same = run_ica(IcaConfig(activations=folder, out=tmp_path / "b.json", exclude_positions=[99], **common))
    assert mask.networks == same.networks
    ica, other = mask.source["ica"], same.source["ica"]
    assert {key for key in ica if ica[key] != other[key]} == {"exclude_positions"}
    assert ica["scale"] == "none" and ica["rows_kept"] == len(data) and "set_aside" not in ica


def test_excluded_positions_leave_the_moments_and_products_of_the_kept_rows(tmp_path: Path) -> None:
    data, positions = _data()
    token_ids = (np.arange(len(data)) * 7) % 13
    folder = write_activations(
        tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=400, positions=positions, token_ids=token_ids
    )
    rows = RowFilter(positions=(0, 3), token_ids=(5,))
    kept = ~np.isin(positions, [0, 3]) & (token_ids != 5)
    shards = shards_of(open_activations(folder))
    settings = ReductionSettings(((0, data.shape[1]),), K, Preprocessing(rows=rows), splits=2)
    moments = sum_over_shards(shard_moments, shards, (settings,), "local")
    x = data.astype(np.float16).astype(np.float64)
    for view, selected in enumerate(
        [kept, kept & (np.arange(len(data)) % 2 == 0), kept & (np.arange(len(data)) % 2 == 1)]
    ):
        assert moments[view, 0, 0] == selected.sum()
        np.testing.assert_allclose(moments[view, 1], x[selected].sum(axis=0), rtol=1e-12)
        np.testing.assert_allclose(moments[view, 2], (x[selected] ** 2).sum(axis=0), rtol=1e-12)
    ((whole, even, odd),) = _reduce(folder, Preprocessing(rows=rows), splits=2)
    assert (whole.n_rows, even.n_rows + odd.n_rows) == (kept.sum(), kept.sum())
    np.testing.assert_allclose(whole.eigenvalues, _exact_top(x[kept], K), rtol=1e-6)
    # Nothing else: the same reduction as on a folder that only ever held the kept rows.
    alone = write_activations(tmp_path / "kept", data[kept], LAYERS, WIDTH, rows_per_shard=400)
    ((reference,),) = _reduce(alone, Preprocessing())
    np.testing.assert_allclose(whole.maps, reference.maps, atol=1e-6)
    mask = run_ica(
        IcaConfig(
            activations=folder, out=tmp_path / "m.json", n_components=K, runs=1, register=False,
            exclude_positions="0,3", exclude_token_ids="5",
        )
    )  # fmt: skip
    ica = mask.source["ica"]
    assert (ica["exclude_positions"], ica["exclude_token_ids"], ica["rows_kept"]) == ([0, 3], [5], int(kept.sum()))


def test_layer_scale_gives_every_layer_the_same_total_variance(tmp_path: Path) -> None:
    data, _ = _data()
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=400)
    groups = [(i * WIDTH, (i + 1) * WIDTH) for i in range(len(LAYERS))]
    # The total variance comes from the moments: one pass of the products is enough here.
    plain = [views[0].total_variance for views in _reduce(folder, Preprocessing(), groups=groups, max_passes=1)]
    scaled = [v[0].total_variance for v in _reduce(folder, Preprocessing(scale="layer"), groups=groups, max_passes=1)]
    assert max(plain) / min(plain) > 20  # the last layer dominates the centered data
    np.testing.assert_allclose(scaled, len(data) * WIDTH, rtol=1e-9)  # each layer: its width, times the rows
    # Nothing else: one number per layer, so within a layer the neurons keep their relative weights,
    # and the whole-model reduction is that of the data with each layer divided by its std.
    x = data.astype(np.float16).astype(np.float64)
    layer_std = np.sqrt(x.reshape(len(x), len(LAYERS), WIDTH).var(axis=0).sum(axis=1) / WIDTH)
    ((whole,),) = _reduce(folder, Preprocessing(scale="layer"))
    np.testing.assert_allclose(whole.eigenvalues, _exact_top(x / np.repeat(layer_std, WIDTH), K), rtol=1e-6)
    ((plain_whole,),) = _reduce(folder, Preprocessing())
    quiet = [float((r.maps[: 2 * WIDTH] ** 2).sum() / K) for r in (plain_whole, whole)]
    assert quiet[0] < 0.1 < 0.3 < quiet[1]  # the top maps' weight on the two quiet layers
    layered = run_ica(
        IcaConfig(activations=folder, out=tmp_path / "l.json", n_components=K, runs=1, register=False, scale="layer")
    )
    assert layered.source["ica"]["scale"] == "layer" and not layered.source["ica"]["standardize"]


def test_clipping_keeps_a_neuron_with_one_huge_outlier_from_dominating(tmp_path: Path) -> None:
    data, positions = _data()
    data[5, 7] = 2000.0  # one token of one neuron of the quiet first layer, as a massive activation
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=400, positions=positions)
    ((plain,),) = _reduce(folder, Preprocessing())
    assert abs(plain.maps[7, 0]) > 0.99  # the first principal map is that one neuron
    acts = open_activations(folder)
    sample = sample_rows(acts, RowFilter(), 500, seed=0)
    assert sample.shape == (500, acts.n_neurons)
    assert np.array_equal(sample, sample_rows(acts, RowFilter(), 500, seed=0))  # seeded
    bounds = clip_bounds(sample, 99.0)
    np.testing.assert_allclose(bounds[1], np.percentile(sample.astype(np.float32), 99.0, axis=0), rtol=1e-6)
    ((clipped,),) = _reduce(folder, Preprocessing(clip=bounds))
    assert abs(clipped.maps[7]).max() < 0.5
    # Nothing else: the reduction of the data clipped by hand to the same bounds.
    x = np.clip(data.astype(np.float16).astype(np.float64), bounds[0], bounds[1])
    np.testing.assert_allclose(clipped.eigenvalues, _exact_top(x, K), rtol=1e-6)
    # The sample is drawn from the kept rows only: the first column marks position 0 rows here.
    marked = data.copy()
    marked[:, 0] = np.where(positions == 0, 1.0, 0.0)
    other = write_activations(tmp_path / "marked", marked, LAYERS, WIDTH, rows_per_shard=400, positions=positions)
    assert sample_rows(open_activations(other), RowFilter(positions=(0,)), 500, seed=0)[:, 0].max() == 0
    mask = run_ica(
        IcaConfig(
            activations=folder, out=tmp_path / "m.json", n_components=K, runs=1, register=False, clip_percentile=99
        )
    )
    assert (mask.source["ica"]["clip_percentile"], mask.source["ica"]["clip_sample_rows"]) == (99, 4096)


def test_set_aside_neurons_never_enter_a_network_and_are_listed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    data, _ = _data()
    rng = np.random.default_rng(1)
    course = rng.laplace(size=len(data)) * (rng.random(len(data)) < 0.3)
    members = np.arange(WIDTH, WIDTH + 20)  # a planted network in layer 1 ...
    data[:, members] += 3.0 * course[:, None]
    massive = members[:3]  # ... three of whose neurons are massive
    data[:, massive] += 200.0 * course[:, None]
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=400)
    common = dict(n_components=K, runs=1, register=False)
    mask = run_ica(IcaConfig(activations=folder, out=tmp_path / "a.json", set_aside_top=0, **common))
    held = pairs(union(mask.networks))
    assert {(1, int(c) - WIDTH) for c in massive} <= held
    # The default, auto: up to 100 neurons, those at least 20x the median neuron's magnitude: the 3 massive ones.
    default = run_ica(IcaConfig(activations=folder, out=tmp_path / "auto.json", **common))
    assert default.source["ica"]["set_aside"]["layers"] == {"1": sorted(int(c) - WIDTH for c in massive)}
    assert default.source["ica"]["set_aside_top"] == "auto"
    assert not pairs(union(default.networks)) & {(1, int(c) - WIDTH) for c in massive}
    assert "the 3 largest-magnitude neurons set aside" in describe(default)
    assert "select them with --networks massive" in describe(default)
    assert "made for: switching networks off (key)" in describe(default)
    # The keep-only recipe (--scale layer): auto sets none aside, so the networks may hold the massive neurons.
    layer = run_ica(IcaConfig(activations=folder, out=tmp_path / "layer.json", scale="layer", **common))
    assert "set_aside" not in layer.source["ica"] and layer.massive() is None
    assert "made for: keeping only the networks (complement)" in describe(layer)
    assert "made for: neither use" in describe(mask)
    aside = run_ica(IcaConfig(activations=folder, out=tmp_path / "b.json", set_aside_top=3, **common))
    held = pairs(union(aside.networks))
    assert not held & {(1, int(c) - WIDTH) for c in massive}
    record = aside.source["ica"]["set_aside"]
    assert record["size"] == 3 and record["layers"] == {"1": [int(c) - WIDTH for c in massive]}
    assert aside.source["ica"]["set_aside_top"] == 3
    assert "set aside (3 largest-magnitude neurons" in describe(aside)
    # Nothing else: scale 0 on those columns is the reduction of the data with them zeroed.
    ((whole,),) = _reduce(folder, Preprocessing(set_aside=tuple(int(c) for c in massive)))
    assert np.abs(whole.maps[massive]).max() == 0.0
    zeroed = data.astype(np.float16).astype(np.float64)
    zeroed[:, massive] = 0.0
    np.testing.assert_allclose(whole.eigenvalues, _exact_top(zeroed, K), rtol=1e-6)


def test_set_aside_auto_needs_massive_neurons_and_takes_at_most_100(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    data = rng.normal(0.0, 1.0, (300, 3 * 400)).astype(np.float32)
    plain = open_activations(write_activations(tmp_path / "plain", data, LAYERS, 400))
    assert set_aside_columns(plain, 100, min_ratio=20.0) == []  # no massive neuron: nothing set aside
    assert len(set_aside_columns(plain, 7)) == 7  # a number given is taken as it is
    massive = rng.choice(3 * 400, 150, replace=False)
    data[0, massive] = 1000.0 + np.arange(150)  # 150 massive neurons, at the first token
    acts = open_activations(write_activations(tmp_path / "massive", data, LAYERS, 400))
    assert set_aside_columns(acts, 100, min_ratio=20.0) == sorted(massive[np.arange(150) >= 50].tolist())
    assert IcaConfig(activations=Path("a"), set_aside_top="AUTO").set_aside_top == "auto"
    with pytest.raises(UserError, match="set_aside_top must be a number of neurons or auto, got 'many'"):
        IcaConfig(activations=Path("a"), set_aside_top="many")


def test_options_reach_the_config_from_the_command_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    data, positions = _data(tokens=300)
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, positions=positions)
    out = tmp_path / "m.json"
    args = ["ica", "--activations", str(folder), "--out", str(out), "--n-components", "3", "--runs", "1"]
    extra = ["--exclude-positions", "0", "--exclude-token-ids", "1,2", "--clip-percentile", "99.5"]
    extra += ["--clip-sample-rows", "200", "--scale", "layer", "--set-aside", "4"]
    result = runner.invoke(analyze_app, args + extra)
    assert result.exit_code == 0, result.output
    assert "270 of 300 token rows kept" in result.output
    ica = json.loads(out.read_text())["source"]["ica"]
    assert (ica["exclude_positions"], ica["exclude_token_ids"], ica["clip_percentile"]) == ([0], [1, 2], 99.5)
    assert (ica["clip_sample_rows"], ica["scale"], ica["set_aside"]["size"], ica["rows_kept"]) == (200, "layer", 4, 270)


@pytest.fixture
def small_activations(tmp_path: Path) -> Path:
    data = np.random.default_rng(0).laplace(size=(300, 3 * 20)).astype(np.float32)
    return write_activations(tmp_path / "acts", data, [0, 1, 2], 20)  # every row at position 0


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--scale", "zscore"], ["unknown --scale 'zscore'; use one of none, neuron, layer"]),
        (["--standardize", "--scale", "layer"], ["--standardize is --scale neuron"]),
        (["--exclude-positions", "first"], ["--exclude-positions 'first': 'first' is not a number or range"]),
        (["--exclude-token-ids", "-3"], ["--exclude-token-ids '-3': -3 is negative"]),
        (["--exclude-positions", "0"], ["leave no token row of", "300 tokens"]),
        (["--clip-percentile", "40"], ["--clip-percentile must lie strictly between 50 and 100, got 40.0"]),
        (["--clip-sample-rows", "5"], ["--clip-sample-rows must be at least 100, got 5"]),
        (["--set-aside", "-1"], ["--set-aside must be at least 0, got -1"]),
        (["--set-aside", "60"], ["--set-aside 60 would set aside all 60 neurons"]),
    ],
    ids=["scale", "standardize-and-scale", "positions", "token-ids", "no-row-left", "clip", "sample", "aside", "all"],
)
def test_bad_preprocessing_options_are_refused(small_activations: Path, tmp_path: Path, extra, fragments) -> None:
    out = tmp_path / "m.json"
    args = ["ica", "--activations", str(small_activations), "--out", str(out), "--n-components", "3", "--runs", "1"]
    refused(runner.invoke(analyze_app, args + extra), *fragments)
    assert not out.exists()
