"""NetworkICA, the ICA as an estimator: fit on an array in memory as on a folder, quietly."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone

from fn_analyze.config import CollectConfig, IcaSettings
from fn_analyze.networks.ica import IcaConfig, NetworkICA, run_ica
from fn_analyze.record.collect import collect
from shared.errors import ParameterError
from shared.masks import MaskFile, ModelInfo
from tests.helpers.activations import write_activations

LAYERS = [0, 1, 2]
WIDTH = 100
MODEL = ModelInfo("synthetic", "llama", 3, WIDTH, 8, "sha256:synthetic")  # what write_activations records
SETTINGS = dict(n_components=4, runs=3, max_passes=15)


def _planted(seed: int = 0, tokens: int = 1500, n_networks: int = 4, size: int = 15):
    """float16-exact activations (as a shard stores them) where each planted network's neurons share one
    sparse time course; the networks as sets of columns, and their courses."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(LAYERS) * WIDTH)
    networks = [set(order[i * size : (i + 1) * size].tolist()) for i in range(n_networks)]
    data = rng.normal(0.0, 1.0, (tokens, len(LAYERS) * WIDTH)) + rng.normal(0.0, 2.0, len(LAYERS) * WIDTH)
    courses = []
    for members in networks:
        course = rng.laplace(0.0, 1.0, tokens) * (rng.random(tokens) < 0.3)
        data[:, sorted(members)] += 3.0 * course[:, None] * rng.uniform(1.0, 2.0, len(members))
        courses.append(course)
    return data.astype(np.float16).astype(np.float32), networks, np.array(courses)


def _columns(network) -> set[int]:
    return {LAYERS.index(layer) * WIDTH + n for layer, neurons in network.layers.items() for n in neurons}


def _iou(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b)


def _files_under(folder: Path) -> list[Path]:
    return [Path(root) / name for root, _, names in os.walk(folder) for name in names]


def test_an_array_in_memory_gives_the_planted_networks_quietly_and_writes_nothing(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data, planted, courses = _planted()
    ica = NetworkICA(**SETTINGS).fit(data, layers=LAYERS)
    assert capsys.readouterr() == ("", "")  # nothing printed, on stdout or stderr
    assert _files_under(tmp_path) == []  # no mask file, no index, no magnitude cache
    found = [_columns(network) for network in ica.networks_]
    for members in planted:
        assert max(_iou(members, other) for other in found) >= 0.9
    assert ica.n_components_ == 4 and ica.maps_.shape == (4, len(LAYERS) * WIDTH)
    for figure in (ica.quality_, ica.share_, ica.run_iou_, ica.split_iou_):
        assert figure.shape == (4,) and np.all((figure >= 0) & (figure <= 1))
    assert ica.stable_.all() and ica.unstable_ == [] and 0 < ica.explained_variance_ratio_ < 1
    # transform: each planted course is one map's activity over the tokens
    activity = ica.transform(data)
    assert activity.shape == (len(data), 4)
    for course in courses:
        assert max(abs(np.corrcoef(course, activity[:, j])[0, 1]) for j in range(4)) > 0.9


def test_an_array_gives_what_run_ica_writes_for_the_same_data_in_a_shard(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    data, _, _ = _planted(seed=1)
    positions = np.arange(len(data)) % 40
    settings = dict(SETTINGS, exclude_positions=[0], clip_percentile=99.0, clip_sample_rows=500, set_aside_top=3)
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=len(data), positions=positions)
    written = run_ica(IcaConfig(activations=folder, out=tmp_path / "m.json", register=False, **settings))
    in_memory = NetworkICA(**settings).fit(data, layers=LAYERS, positions=positions).to_mask_file(MODEL)
    assert in_memory.networks == written.networks  # neuron for neuron, and every figure
    assert in_memory.source["ica"] == written.source["ica"]  # settings, set-aside neurons, reduction, unstable
    assert in_memory.source["activations"] == {"array": True, "n_tokens": len(data), "layers": LAYERS}
    assert json.loads((tmp_path / "m.json").read_text())["networks"] == [n.to_dict() for n in in_memory.networks]


def test_a_folder_or_its_activations_fit_as_run_ica_does(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    data, _, _ = _planted(seed=2, tokens=800)
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=300)  # 3 shards
    written = run_ica(IcaConfig(activations=folder, out=tmp_path / "m.json", register=False, **SETTINGS))
    fitted = NetworkICA(**SETTINGS).fit(folder)
    assert fitted.to_mask_file() == written  # the folder's model by default, and the same record
    with pytest.raises(ParameterError, match="model 'other' is not the model the activations were recorded on"):
        fitted.to_mask_file(ModelInfo("other", "llama", 3, WIDTH, 8, "sha256:other"))
    with pytest.raises(ParameterError, match="layers, records, positions and token_ids describe an array"):
        NetworkICA(**SETTINGS).fit(folder, layers=LAYERS)


def test_what_collect_returns_fits_as_its_folder_does(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "acts"
    acts = collect(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=out, model=str(tiny_lm_dir), max_tokens=400))
    assert acts.folder == out and acts.n_tokens == 400
    # A tiny random model has no stable network: every cluster kept, so that there are networks to compare.
    settings = dict(n_components=4, runs=2, keep_unstable=True)
    returned = NetworkICA(**settings).fit(acts)
    assert returned.networks_
    assert returned.to_mask_file() == NetworkICA(**settings).fit(out).to_mask_file()


def test_a_folder_fit_writes_nothing_not_even_the_magnitude_cache(tmp_path: Path, monkeypatch, capsys) -> None:
    """Setting the largest neurons aside needs their magnitudes: measured on the folder, kept nowhere."""
    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data, _, _ = _planted(seed=3, tokens=600)
    folder = write_activations(tmp_path / "acts", data, LAYERS, WIDTH, rows_per_shard=300)
    before = {path: path.stat().st_mtime_ns for path in _files_under(tmp_path)}
    capsys.readouterr()
    ica = NetworkICA(**dict(SETTINGS, set_aside_top=3)).fit(folder)
    assert sum(len(neurons) for neurons in ica.set_aside_.values()) == 3
    assert capsys.readouterr() == ("", "")
    assert {path: path.stat().st_mtime_ns for path in _files_under(tmp_path)} == before


def test_each_member_neurons_z_is_written_signed_in_the_order_of_layers(tmp_path: Path) -> None:
    data, _, _ = _planted(seed=4, tokens=800)
    ica = NetworkICA(**SETTINGS).fit(data, layers=LAYERS)
    assert ica.networks_
    for network in ica.networks_:
        assert network.z is not None and network.z.keys() == network.layers.keys()
        for layer, neurons in network.layers.items():
            columns = [LAYERS.index(layer) * WIDTH + n for n in neurons]
            expected = np.round(ica.maps_[network.stats["component"], columns], 3)
            assert network.z[layer] == tuple(expected.tolist())  # sign and order as `layers`
            assert all(abs(z) >= SETTINGS.get("threshold", 3.0) for z in network.z[layer])
    mask = ica.to_mask_file(MODEL)
    assert MaskFile.load(mask.save(tmp_path / "m.json")) == mask
    written = json.loads((tmp_path / "m.json").read_text())["networks"][0]
    assert [len(z) for z in written["z"].values()] == [len(n) for n in written["layers"].values()]


def test_it_is_a_scikit_learn_estimator_whose_parameters_are_kept_as_given() -> None:
    ica = NetworkICA(n_components="auto", exclude_positions="0,3", solver="fastica", standardize=True)
    params = ica.get_params()
    assert params["n_components"] == "auto" and params["exclude_positions"] == "0,3"  # not parsed
    assert params["tol"] is None and params["scale"] == "none"  # nor filled in, nor rewritten
    assert set(params) == {f.name for f in fields(IcaSettings)}
    copy = clone(ica)
    assert copy is not ica and copy.get_params() == params
    assert ica.set_params(n_components=8, runs=2) is ica and (ica.n_components, ica.runs) == (8, 2)
    assert clone(ica).get_params() == {**params, "n_components": 8, "runs": 2}


def test_a_bad_parameter_is_taken_as_given_and_refused_by_fit_naming_it() -> None:
    data, _, _ = _planted(tokens=30)
    for given, message in (
        (dict(n_components=0), "^n_components must be at least 1, got 0$"),
        (dict(dask_scheduler="tcp://x:1"), "^dask_scheduler needs engine dask; add it or drop dask_scheduler$"),
        (dict(solver="jade"), "^unknown solver 'jade'; use one of picard, fastica$"),
    ):
        ica = NetworkICA(**given)  # kept as given
        assert clone(ica).get_params() == ica.get_params()
        with pytest.raises(ParameterError, match=message):
            ica.fit(data, layers=LAYERS)
        assert not hasattr(ica, "networks_")


def test_a_clone_of_a_fitted_estimator_is_unfitted_and_fits_to_the_same_networks() -> None:
    data, _, _ = _planted(seed=5, tokens=800)
    fitted = NetworkICA(**SETTINGS).fit(data, layers=LAYERS)
    copy = clone(fitted)
    assert not hasattr(copy, "networks_")
    assert copy.fit(data, layers=LAYERS).networks_ == fitted.networks_


def test_errors_from_python_name_the_parameter(tmp_path: Path) -> None:
    data, _, _ = _planted(tokens=30)
    with pytest.raises(ParameterError, match="n_components 40 is larger than the data allows: 30 tokens"):
        NetworkICA(n_components=40).fit(data, layers=LAYERS)
    with pytest.raises(ParameterError, match="X has 300 columns, which 7 layers cannot share equally"):
        NetworkICA().fit(data, layers=range(7))
    with pytest.raises(ParameterError, match=r"positions must hold one integer a token row \(30\)"):
        NetworkICA().fit(data, layers=LAYERS, positions=[0, 1])
    with pytest.raises(ParameterError, match=r"not fitted yet; call fit\(X\) first"):
        NetworkICA().to_mask_file(MODEL)
    fitted = NetworkICA(n_components=3, runs=1, splits=0, max_passes=5).fit(data, layers=LAYERS)
    with pytest.raises(ParameterError, match="model is needed to make a mask file of networks fitted on an array"):
        fitted.to_mask_file()
    with pytest.raises(
        ParameterError, match="model 'small' has 3 layers of 50 neurons; .* layers \\[0, 1, 2\\] of 100"
    ):
        fitted.to_mask_file(ModelInfo("small", "llama", 3, 50, 8, "sha256:small"))
    with pytest.raises(ParameterError, match=r"X must be an array of tokens x 300 neurons"):
        fitted.transform(data[:, :10])
