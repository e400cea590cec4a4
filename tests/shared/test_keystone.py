"""The keystone regime: the mask file's per-neuron z, `strongest` (the top neurons by |z|), --keystone
in fn-train and fn-analyze evaluate, and the random controls matched to the keystone set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import fn_analyze.measure.evaluate as evaluate_module
from fn_analyze.cli import app as analyze_app
from fn_analyze.measure.evaluate import EvaluateConfig, evaluate
from fn_analyze.neurons.neuron_sets import draw_control, draw_matched
from fn_train.cli import app as train_app
from fn_train.run_mask import run_mask_from_record
from fn_train.trainer import train
from shared.errors import ParameterError, UserError
from shared.keystone import keep_count, parse_keep, strongest
from shared.masks import MASSIVE, MaskFile, ModelInfo, Network, load_mask_file, save_mask_file, select_networks
from shared.models import model_info
from tests.helpers.processes import refused
from tests.helpers.tiny_models import tiny_model
from tests.helpers.training import assert_masked_frozen_and_open_moved, neuron_parameters, small_run, train_args

runner = CliRunner()
MODEL = ModelInfo("hand-made", "llama", 2, 16, 8, "sha256:hand-made")


def _network(network_id: int, z: dict[int, dict[int, float]]) -> Network:
    """A network from {layer: {neuron: z}}."""
    layers = {layer: tuple(sorted(by_neuron)) for layer, by_neuron in z.items()}
    return Network(network_id, layers, z={layer: tuple(z[layer][n] for n in layers[layer]) for layer in layers})


# (0, 3) is in both networks (|z| 4.0 and 4.5), as is (1, 7) (6.0 and 3.5): each takes its largest.
A = _network(0, {0: {1: 5.0, 2: -3.2, 3: 4.0}, 1: {7: -6.0}})
B = _network(1, {0: {3: -4.5, 9: 3.1}, 1: {7: 3.5, 8: 4.0}})
RANKED = [(1, 7), (0, 1), (0, 3), (1, 8), (0, 2), (0, 9)]  # the union by |z|, largest first


def _as_set(pairs: list[tuple[int, int]]) -> dict[int, tuple[int, ...]]:
    out: dict[int, list[int]] = {}
    for layer, neuron in pairs:
        out.setdefault(layer, []).append(neuron)
    return {layer: tuple(sorted(ns)) for layer, ns in sorted(out.items())}


@pytest.mark.parametrize(
    ("keep", "count"), [(1, 1), (3, 3), (6, 6), (0.5, 3), (0.01, 1), (1.0, 6), (0.25, 2), ("2", 2), ("50%", 3)]
)
def test_strongest_takes_the_top_of_the_union_by_abs_z(keep, count: int) -> None:
    assert strongest([A, B], keep) == _as_set(RANKED[:count])


def test_strongest_breaks_ties_by_layer_then_neuron_and_refuses_too_many() -> None:
    tied = _network(2, {0: {4: 3.0, 2: -3.0}, 1: {0: 3.0}})
    assert strongest([tied], 1) == {0: (2,)}
    assert strongest([tied], 2) == {0: (2, 4)}
    with pytest.raises(UserError, match=r"--keystone 7 asks for more neurons than network\(s\) 0,1 hold \(6\)"):
        strongest([A, B], 7)


def test_keep_is_a_count_or_a_fraction_read_in_one_place() -> None:
    assert [parse_keep(text) for text in ("50", "0.01", "1%", "1.0", "1e-3")] == [50, 0.01, 0.01, 1.0, 0.001]
    assert isinstance(parse_keep("1"), int) and isinstance(parse_keep("1.0"), float)
    assert [keep_count(k, 1000) for k in (50, 0.01, 0.0004, 1.0)] == [50, 10, 1, 1000]
    for bad, message in (
        (0, "keystone as a count must be at least 1, got 0"),
        ("-1", "keystone as a count must be at least 1, got -1"),
        (1.5, r"keystone as a fraction must lie in \(0, 1\], got 1.5"),
        ("abc", "keystone must be a count of neurons such as 50"),
        (True, "keystone must be a count"),
    ):
        with pytest.raises(ParameterError, match=message):
            parse_keep(bad, "keystone")


def test_z_round_trips_in_the_order_of_layers_and_is_checked(tmp_path: Path) -> None:
    mask = MaskFile(MODEL, (A, B), {"method": "test"})
    path = mask.save(tmp_path / "m.json")
    raw = json.loads(path.read_text())
    assert raw["networks"][0]["z"] == {"0": [5.0, -3.2, 4.0], "1": [-6.0]}
    assert load_mask_file(path) == mask
    # Listed out of order in the file: each z stays with its neuron.
    raw["networks"][0]["layers"]["0"], raw["networks"][0]["z"]["0"] = [3, 1, 2], [4.0, 5.0, -3.2]
    path.write_text(json.dumps(raw))
    assert load_mask_file(path).networks[0] == A
    for network_z, problem in (
        ({"0": [5.0, -3.2]}, "network 0: 'z' must hold the layers of 'layers' (0, 1)"),
        ({"0": [5.0, -3.2], "1": [-6.0]}, "network 0, layer 0: 'z' must be 3 finite numbers"),
        ({"0": [5.0, float("nan"), 4.0], "1": [-6.0]}, "network 0, layer 0: 'z' must be 3 finite numbers"),
        ({"0": [5.0, "x", 4.0], "1": [-6.0]}, "network 0, layer 0: 'z' must be 3 finite numbers"),
    ):
        raw["networks"][0]["z"] = network_z
        path.write_text(json.dumps(raw))
        with pytest.raises(UserError, match=re.escape(f"mask file {path}: {problem}")):
            load_mask_file(path)


def test_a_file_without_z_and_the_massive_group_are_refused_in_one_line(tmp_path: Path) -> None:
    plain = MaskFile(MODEL, (Network(0, {0: (1, 2)}),), {"method": "test"})
    save_mask_file(plain, tmp_path / "old.json")
    loaded = load_mask_file(tmp_path / "old.json")
    assert loaded.networks[0].z is None and "z" not in json.loads((tmp_path / "old.json").read_text())["networks"][0]
    where = f"mask file {tmp_path / 'old.json'}"
    with pytest.raises(UserError, match=rf"{where} records no z per neuron \(network 0\).*re-run `fn-analyze ica`"):
        strongest(select_networks(loaded, None), 1, where)
    aside = {"ica": {"set_aside": {"layers": {"1": [3]}}}}
    with_massive = MaskFile(MODEL, (A,), aside)
    with pytest.raises(UserError, match="set-aside massive neurons are in no map"):
        strongest(select_networks(with_massive, [0, MASSIVE]), 1)


def _tiny_z_mask(model: torch.nn.Module, seed: int = 0) -> MaskFile:
    """Three overlapping networks over the tiny LLaMA's two layers (176 neurons each), random signed z."""
    rng = np.random.default_rng(seed)
    networks = []
    for network_id, size in enumerate((40, 30, 20)):
        z: dict[int, dict[int, float]] = {}
        for layer in (0, 1):
            for neuron in rng.choice(176, size, replace=False):
                z.setdefault(layer, {})[int(neuron)] = round(float(rng.choice([-1, 1]) * rng.uniform(3, 9)), 3)
        networks.append(_network(network_id, z))
    return MaskFile(model_info(model, "tiny"), tuple(networks), {"method": "test"})


def test_a_size_sweep_takes_the_top_by_abs_z_and_its_controls_match_per_layer() -> None:
    mask = _tiny_z_mask(tiny_model("llama"))
    selected = select_networks(mask, [0, 2])
    best: dict[tuple[int, int], float] = {}
    for network in selected:
        for layer, neurons in network.layers.items():
            for neuron, z in zip(neurons, network.z[layer], strict=True):
                best[(layer, neuron)] = max(best.get((layer, neuron), 0.0), abs(z))
    ranked = sorted(best, key=lambda pair: (-best[pair], pair))
    shape = (mask.model.n_layers, mask.model.intermediate_size)
    strata = np.random.default_rng(1).integers(0, 4, shape)  # as magnitude bins
    for keep in (1, 5, 20, 0.05, 0.25, 1.0):
        chosen = strongest(selected, keep)
        assert chosen == _as_set(ranked[: keep_count(keep, len(best))])
        per_layer = {layer: len(ns) for layer, ns in chosen.items()}
        rng = np.random.default_rng([0, 1])
        drawn = draw_control(mask, chosen, "layer", None, 0.1, rng)
        assert {layer: len(ns) for layer, ns in drawn.items()} == per_layer
        matched = draw_matched(chosen, strata, np.ones(shape, dtype=bool), rng)
        assert {layer: len(ns) for layer, ns in matched.items()} == per_layer
        for layer, ns in chosen.items():
            assert sorted(strata[layer, list(ns)]) == sorted(strata[layer, list(matched[layer])])


def _write_z_mask(model_dir: Path, path: Path) -> tuple[Path, MaskFile]:
    mask = _tiny_z_mask(AutoModelForCausalLM.from_pretrained(model_dir))
    save_mask_file(mask, path)
    return path, mask


def test_fn_train_key_masks_only_the_keystone_neurons(tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    path, mask = _write_z_mask(tiny_lm_dir, tmp_path / "mask.json")
    keystone = strongest(select_networks(mask, [0, 1]), 0.1)
    size = sum(len(ns) for ns in keystone.values())
    assert size == keep_count(0.1, sum(len(ns) for ns in mask.union([0, 1]).values())) > 1  # 10% of the union
    out = tmp_path / "out"
    settings = dict(use_peft=False, weight_decay=0.5, networks="0,1", keystone="0.1")
    train(small_run(tiny_lm_dir, demo_dir, out, path, **settings))
    record = json.loads((out / "fn_mask.json").read_text())
    assert record["keystone"] == 0.1 and record["masked_neurons"] == size
    assert record["keystone_neurons"] == {str(layer): list(ns) for layer, ns in keystone.items()}
    after = neuron_parameters(AutoModelForCausalLM.from_pretrained(out))
    assert_masked_frozen_and_open_moved(neuron_parameters(base), after, {k: list(v) for k, v in keystone.items()})
    reloaded = run_mask_from_record(record, "fn_mask.json")  # as load_masked_model re-applies it
    assert reloaded.chosen_neurons == keystone and reloaded.digest == record["digest"]


def test_fn_train_tune_trains_the_keystone_and_its_random_control_matches_it(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    path, mask = _write_z_mask(tiny_lm_dir, tmp_path / "mask.json")
    keystone = strongest(select_networks(mask, None), 9)
    listed = {str(layer): list(ns) for layer, ns in keystone.items()}
    train(small_run(tiny_lm_dir, demo_dir, tmp_path / "a", path, mask_mode="tune", keystone=9))
    record = json.loads((tmp_path / "a" / "fn_mask.json").read_text())
    assert record["tuned_neurons"] == record["keystone_neurons"] == listed and record["keystone"] == 9
    control = dict(mask_mode="tune", keystone=9, random_neurons="layer")
    train(small_run(tiny_lm_dir, demo_dir, tmp_path / "b", path, **control))
    record = json.loads((tmp_path / "b" / "fn_mask.json").read_text())
    assert record["keystone_neurons"] == listed and record["tuned_neurons"] != listed
    assert {k: len(v) for k, v in record["tuned_neurons"].items()} == {k: len(v) for k, v in listed.items()}


def test_evaluate_measures_the_keystone_of_the_union_and_of_each_network(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    path, mask = _write_z_mask(tiny_lm_dir, tmp_path / "mask.json")
    drawn: list[tuple[dict, dict]] = []

    def recording(neurons, strata, allowed, rng):
        drawn.append((neurons, result := draw_matched(neurons, strata, allowed, rng)))
        return result

    monkeypatch.setattr(evaluate_module, "draw_matched", recording)
    config = EvaluateConfig(
        mask_file=path, dataset=str(demo_dir / "eval.csv"), model=str(tiny_lm_dir), out=tmp_path / "r.json",
        draws=1, network_draws=1, limit=4, device="cpu", keystone="5",
    )  # fmt: skip
    results = evaluate(config)
    rows = results["conditions"]
    assert [row["name"] for row in rows] == ["union of 3 networks"] * 2 + ["network 0", "network 1", "network 2"]
    assert all(row["neurons"] == 5 for row in rows) and results["config"]["keystone"] == 5
    assert evaluate_module._condition_neurons(list(mask.networks), config, "")[(0, 1, 2)] == strongest(mask.networks, 5)
    for neurons, control in drawn:
        assert {layer: len(ns) for layer, ns in control.items()} == {layer: len(ns) for layer, ns in neurons.items()}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--keystone as a count must be at least 1, got 0"),
        ("-1", "--keystone as a count must be at least 1, got -1"),
        ("1.5", "--keystone as a fraction must lie in (0, 1], got 1.5; a count is written as an integer"),
        ("abc", "--keystone must be a count of neurons such as 50, or a fraction"),
    ],
)
def test_bad_keystone_values_are_refused_by_fn_train_and_evaluate(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path, value: str, message: str
) -> None:
    path, _ = _write_z_mask(tiny_lm_dir, tmp_path / "mask.json")
    args = train_args(tiny_lm_dir, demo_dir / "train.csv", tmp_path / "out", "--mask-file", str(path))
    refused(runner.invoke(train_app, [*args, "--keystone", value]), message)
    evaluate_args = ["evaluate", "--mask-file", str(path), "--dataset", str(demo_dir / "eval.csv")]
    refused(runner.invoke(analyze_app, [*evaluate_args, "--keystone", value]), message)


def test_a_mask_file_without_z_is_refused_by_fn_train_and_evaluate(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    plain = MaskFile(model_info(model, "tiny"), (Network(0, {0: (1, 2, 3)}),), {"method": "test"})
    path = tmp_path / "old.json"
    save_mask_file(plain, path)
    line = f"mask file {path} records no z per neuron (network 0), which --keystone ranks by; re-run `fn-analyze ica`"
    args = train_args(tiny_lm_dir, demo_dir / "train.csv", tmp_path / "out", "--mask-file", str(path))
    refused(runner.invoke(train_app, [*args, "--keystone", "1"]), line)
    assert not (tmp_path / "out").exists()
    evaluate_args = ["evaluate", "--mask-file", str(path), "--dataset", str(demo_dir / "eval.csv")]
    refused(runner.invoke(analyze_app, [*evaluate_args, "--model", str(tiny_lm_dir), "--keystone", "1"]), line)
    no_mask = train_args(tiny_lm_dir, demo_dir / "train.csv", tmp_path / "out", "--keystone", "1")
    refused(runner.invoke(train_app, no_mask), "--keystone given without --mask-file")
