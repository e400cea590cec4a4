"""fn-train experiment on the tiny LLaMA: the arms and their random controls as specified, every run's
mask recorded, resume, the report, and configs refused before any run starts."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import fn_train.experiment.runner as runner_module
from fn_analyze.neurons.magnitude import NeuronMagnitude
from fn_analyze.neurons.neuron_sets import pairs
from fn_train.cli import experiment_app
from fn_train.experiment.arms import control_mask_path, draw_control
from fn_train.experiment.config import ExperimentConfig, load_experiment_config
from fn_train.experiment.report import FIGURE_NAME, RESULTS_NAME, TABLE_NAME, format_table
from fn_train.experiment.runner import run_experiment
from shared.errors import Interrupted
from shared.keystone import keep_count
from shared.masks import MaskFile, Network, load_mask_file, save_mask_file
from tests.helpers.masks import MASKED, make_mask
from tests.helpers.processes import record_results, refused
from tests.helpers.reports import assert_every_printed_figure_is_stored, assert_png

SET_ASIDE = {0: [1, 2, 11], 1: [12, 13]}  # the mask file's massive neurons: no random set may draw them


@pytest.fixture(scope="module")
def mask_path(tmp_path_factory, tiny_lm_dir: Path) -> Path:
    """MASKED's networks, with neurons set aside as the ICA records them."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = make_mask(model, MASKED)
    layers = {str(layer): neurons for layer, neurons in SET_ASIDE.items()}
    mask = MaskFile(mask.model, mask.networks, {"ica": {"set_aside": {"layers": layers}}})
    path = tmp_path_factory.mktemp("experiment-mask") / "mask.json"
    save_mask_file(mask, path)
    return path


def _settings(tiny_lm_dir: Path, demo_dir: Path, mask_path: Path, out: Path, **overrides) -> dict:
    return {
        "model": str(tiny_lm_dir),
        "train_data": str(demo_dir / "train.csv"),
        "eval_data": str(demo_dir / "eval.csv"),
        "retention_data": str(demo_dir / "sentiment.csv"),
        "mask_file": str(mask_path),
        "networks": "0,1",
        "arms": ["lora", "key"],
        "seeds": 2,
        "steps": 2,
        "learning_rate": 1e-2,
        "max_seq_length": 64,
        "eval_limit": 8,
        "retention_limit": 8,
        "device": "cpu",
        "out": str(out),
        **overrides,
    }


def test_random_controls_match_per_layer_and_bin_avoid_set_aside_and_differ_per_seed(mask_path: Path) -> None:
    mask = load_mask_file(mask_path)
    neurons = {0: (0, 5, 9, 40, 100), 1: (3, 4, 7, 8, 9, 170)}
    rng = np.random.default_rng(0)
    magnitude = NeuronMagnitude(10 ** rng.uniform(-1, 2, size=(2, 176)), "test", 100)
    bins = magnitude.bins(0.5)
    aside = {(layer, n) for layer, ns in SET_ASIDE.items() for n in ns}
    for control in ("layer", "magnitude"):
        drawn = [draw_control(mask, neurons, control, seed, magnitude, 0.5) for seed in (0, 1, 2)]
        assert len({json.dumps(d, sort_keys=True) for d in drawn}) == 3, "the sets must be redrawn per seed"
        for one in drawn:
            assert not pairs(one) & aside
            assert {layer: len(ns) for layer, ns in one.items()} == {0: 5, 1: 6}
            if control == "magnitude":
                for layer in neurons:
                    assert sorted(bins[layer][list(one[layer])]) == sorted(bins[layer][list(neurons[layer])])
    # The massive group's own controls may hold the set-aside neurons: they are its stratum.
    massive = {layer: tuple(ns) for layer, ns in SET_ASIDE.items()}
    assert draw_control(mask, massive, "layer", 0, None, 0.5) is not None


@pytest.mark.slow
def test_experiment_runs_every_arm_records_masks_and_resumes(
    tiny_lm_dir: Path, demo_dir: Path, mask_path: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "exp"
    config = ExperimentConfig(**_settings(tiny_lm_dir, demo_dir, mask_path, out))
    ran = record_results(monkeypatch, runner_module, "run_one")
    original = runner_module.run_one

    def stopped_at_third(plan, run, device, dtype):
        if len(ran) == 3:
            raise Interrupted("stopped", 15)
        return original(plan, run, device, dtype)

    monkeypatch.setattr(runner_module, "run_one", stopped_at_third)
    with pytest.raises(Interrupted, match="re-run the same command to resume"):
        run_experiment(config)
    first = json.loads((out / RESULTS_NAME).read_text())
    assert list(first["runs"]) == ["lora-seed0", "key-seed0", "key-random-layer-seed0"]

    monkeypatch.setattr(runner_module, "run_one", original)
    ran = record_results(monkeypatch, runner_module, "run_one")
    results = run_experiment(config)
    assert [r["arm"] + r["neurons"] + str(r["seed"]) for r in ran] == [
        "keyrandom-magnitude0", "lora1", "keynetworks1", "keyrandom-layer1", "keyrandom-magnitude1",
    ]  # fmt: skip
    assert results["runs"]["lora-seed0"] == first["runs"]["lora-seed0"], "a finished run is not run again"
    runs = results["runs"]
    assert len(runs) == 8 and not (out / "runs").exists()  # folders removed without --keep-runs

    # Every masked run's mask is recorded: the networks, or the control's mask file of its seed.
    for record in runs.values():
        assert record["fn_train_config"]["seed"] == record["seed"]
        if record["arm"] == "lora":
            assert record["fn_mask"] is None and record["fn_train_config"]["mask_file"] is None
            continue
        fn_mask = record["fn_mask"]
        assert fn_mask["mode"] == "key" and fn_mask["file_digest"].startswith("sha256:")
        if record["neurons"] == "networks":
            assert fn_mask["mask_file"] == str(mask_path) and fn_mask["networks"] == [0, 1]
        else:
            control = record["neurons"].removeprefix("random-")
            assert fn_mask["mask_file"] == str(control_mask_path(out, control, record["seed"]))
        assert fn_mask["masked_neurons"] == 11  # MASKED's 0 and 1 together; every random set the same size
    digests = {runs[f"key-seed{s}"]["fn_mask"]["digest"] for s in (0, 1)}
    assert len(digests) == 1
    random_digests = {
        runs[f"key-random-{c}-seed{s}"]["fn_mask"]["digest"] for c in ("layer", "magnitude") for s in (0, 1)
    }
    assert len(random_digests) == 4, "each control is its own draw, redrawn per seed"
    aside = {(layer, n) for layer, ns in SET_ASIDE.items() for n in ns}
    for control in ("layer", "magnitude"):
        for seed in (0, 1):
            drawn = load_mask_file(control_mask_path(out, control, seed)).networks[0].layers
            assert {layer: len(ns) for layer, ns in drawn.items()} == {0: 5, 1: 6} and not pairs(drawn) & aside

    # Figures: every run scored after training; LoRA trains more parameters than nothing, masked runs score.
    for record in runs.values():
        figures = record["figures"]
        assert {"task_loss", "retention_loss", "retention_accuracy", "train_seconds", "peak_memory_mb"} <= set(figures)
        assert figures["trainable_parameters"] > 0 and figures["peak_memory_mb"] > 0
        # Each row's own figures, the weighted mean of which is the run's figure.
        task = record["rows"]["task"]
        assert len(task["loss"]) == len(task["tokens"]) == 8
        weighted = np.dot(task["loss"], task["tokens"]) / sum(task["tokens"])
        assert weighted == pytest.approx(figures["task_loss"], abs=1e-5)
        assert np.mean(record["rows"]["retention"]["accuracy"]) == pytest.approx(figures["retention_accuracy"])
    assert results["summary"]["key random-magnitude"]["n"] == 2
    # The answers: key against each control and against LoRA, on every figure, paired over both seeds.
    made = results["comparisons"]["comparisons"]
    assert {(c["arm"], c["control"]) for c in made} == {("key", "random-layer"), ("key", "random-magnitude"),
                                                        ("key", "lora")}  # fmt: skip
    assert {c["figure"] for c in made} == {"task_loss", "retention_loss", "retention_accuracy"}
    assert all(c["n_seeds"] == 2 and c["low"] <= c["estimate"] <= c["high"] for c in made)
    table = format_table(results)
    assert all(c["verdict"] in table for c in made)
    assert (out / TABLE_NAME).read_text().strip() == table
    # The runs' records hold short strings ("0", the random masks' --networks) that the check would strip
    # from every number: the table's figures are the summary's and the base model's.
    assert_every_printed_figure_is_stored({k: v for k, v in results.items() if k != "runs"}, table)
    assert_png(out / FIGURE_NAME)


def test_bad_configs_are_refused_in_one_line_before_any_run(
    tiny_lm_dir: Path, demo_dir: Path, mask_path: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(runner_module, "run_one", lambda *args: pytest.fail("a run started"))
    monkeypatch.setattr(runner_module, "prepare", lambda *args: pytest.fail("the base model was loaded"))
    cli = CliRunner()
    cases = [
        ({"arms": ["lora", "keyy"]}, "arms: 'keyy' is unknown"),
        ({"seeds": 0}, "seeds must be at least 1"),
        ({"steps": -1}, "steps must be a whole number"),
        ({"networks": "7"}, "network id 7 is not in the mask file"),
        ({"eval_data": str(tmp_path / "missing.csv")}, "eval_data"),
        ({"mask_file": None}, "arm key needs mask_file"),
        ({"train": {"lora_r": 0}}, "--lora_r must be at least 1"),
        ({"train": {"seed": 3}}, "train: seed is set by the experiment"),
        ({"controls": ["size"]}, "controls: 'size' is unknown"),
        ({"colour": "red"}, "unknown key 'colour'; use one of "),
        ({"step": 6}, "unknown key 'step'; did you mean 'steps'?"),
        ({"ablation": "half"}, "ablation"),
        ({"correction": "bonferroni"}, "correction 'bonferroni' is unknown; use holm or bh"),
        ({"target_difference": {"loss": -1}}, "target_difference: loss must be a positive number"),
        ({"target_difference": {"perplexity": 1}}, "target_difference must map loss and/or accuracy"),
        ({"retention_data": []}, "retention_data must be a data file or a list of them"),
        ({"keystone": [0.01, "1%"]}, "names one size twice"),
        ({"keystone": [1.5]}, "keystone as a fraction must lie in (0, 1]"),
        ({"keystone": [0.01]}, "records no z per neuron"),
    ]
    for overrides, fragment in cases:
        path = tmp_path / "exp.yaml"
        path.write_text(yaml.safe_dump(_settings(tiny_lm_dir, demo_dir, mask_path, tmp_path / "out", **overrides)))
        refused(cli.invoke(experiment_app, ["--config", str(path)]), fragment)
    assert not (tmp_path / "out").exists()
    refused(cli.invoke(experiment_app, ["--config", str(tmp_path / "none.yaml")]), "does not exist")


def test_a_finished_folder_is_resumed_only_with_its_own_config(
    tiny_lm_dir: Path, demo_dir: Path, mask_path: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "exp"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(runner_module, "prepare", lambda *args: pytest.fail("the base model was loaded"))
    settings = _settings(tiny_lm_dir, demo_dir, mask_path, out)
    with pytest.raises(Exception, match="holds no results.json"):
        run_experiment(ExperimentConfig(**settings))
    (out / "notes.txt").unlink()
    (out / RESULTS_NAME).write_text(json.dumps({"config": {**ExperimentConfig(**settings).to_dict(), "steps": 5}}))
    with pytest.raises(Exception, match="another steps"):
        run_experiment(ExperimentConfig(**settings))
    # A second start on a folder in use is refused (it would train into the first one's run folders).
    (out / RESULTS_NAME).write_text(json.dumps({"config": ExperimentConfig(**settings).to_dict(), "runs": {}}))
    with (out / runner_module.LOCK_NAME).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(Exception, match="in use by another fn-train experiment"):
            run_experiment(ExperimentConfig(**settings))
    # More arms, controls or seeds add runs to the recorded ones.
    (out / RESULTS_NAME).write_text(json.dumps({"config": ExperimentConfig(**settings).to_dict(), "runs": {}}))
    grown = ExperimentConfig(**{**settings, "arms": ["lora", "key", "complement"], "seeds": 3})
    assert len(runner_module.plan_experiment(grown).runs) == 3 * 7


def test_yaml_seeds_and_arms(tmp_path: Path, tiny_lm_dir: Path, demo_dir: Path, mask_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_settings(tiny_lm_dir, demo_dir, mask_path, tmp_path / "o", seeds=[4, 9])))
    config = load_experiment_config(path)
    assert config.seeds == [4, 9] and config.controls == ["layer", "magnitude"]


def test_the_tune_arm_gets_no_ablation_and_no_lora_settings(
    tiny_lm_dir: Path, demo_dir: Path, mask_path: Path, tmp_path: Path
) -> None:
    settings = _settings(tiny_lm_dir, demo_dir, mask_path, tmp_path / "o", arms=["lora", "key", "tune"])
    config = ExperimentConfig(**{**settings, "ablation": "scale", "train": {"lora_r": 8}})
    plan = runner_module.plan_experiment(config)  # fn-train would refuse LoRA settings or an ablation with tune
    by_arm = {run.arm: plan.train_config(run) for run in plan.runs if run.neurons in ("", "networks")}
    assert by_arm["tune"].mask_mode == "tune" and by_arm["tune"].ablation == "zero" and by_arm["tune"].lora_r == 16
    assert by_arm["key"].ablation == "scale" and by_arm["key"].lora_r == 8 and by_arm["lora"].lora_r == 8


@pytest.mark.slow
def test_the_tune_arm_trains_only_the_chosen_neurons(
    tiny_lm_dir: Path, demo_dir: Path, mask_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "exp"
    settings = _settings(tiny_lm_dir, demo_dir, mask_path, out, arms=["tune"], controls=["magnitude"], seeds=1)
    results = run_experiment(ExperimentConfig(**settings))
    runs = results["runs"]
    assert list(runs) == ["tune-seed0", "tune-random-magnitude-seed0"]
    for record in runs.values():
        assert record["fn_mask"]["mode"] == "tune"
        # LLaMA: a neuron's gate and up rows and its down-projection column, hidden size 64 each; 11 neurons
        assert record["figures"]["trainable_parameters"] == 11 * 3 * 64
    assert runs["tune-random-magnitude-seed0"]["fn_mask"]["mask_file"] == str(control_mask_path(out, "magnitude", 0))


def test_a_keystone_sweep_trains_the_top_neurons_by_z_and_matches_each_size_per_layer(
    tiny_lm_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    plain = make_mask(model, MASKED)
    rng = np.random.default_rng(5)
    networks = tuple(
        Network(n.id, n.layers, z={layer: tuple(rng.uniform(3, 9, len(ns)).round(3)) for layer, ns in n.layers.items()})
        for n in plain.networks
    )
    path = tmp_path / "mask-z.json"
    save_mask_file(MaskFile(plain.model, networks, plain.source), path)
    out = tmp_path / "exp"
    settings = _settings(tiny_lm_dir, demo_dir, path, out, arms=["tune"], seeds=1, keystone=[3, 0.5, None])
    plan = runner_module.plan_experiment(ExperimentConfig(**settings))
    by_z = sorted(
        (
            (abs(z), layer, neuron)
            for n in networks
            for layer, ns in n.layers.items()
            for neuron, z in zip(ns, n.z[layer], strict=True)
        ),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    union = {(layer, neuron) for n in networks for layer, ns in n.layers.items() for neuron in ns}
    expected = {"top 3": 3, "top 50%": keep_count(0.5, len(union)), "": len(union)}
    for size, count in expected.items():
        chosen = pairs(plan.neurons[size])
        assert chosen == {(layer, neuron) for _, layer, neuron in by_z[:count]}, size
    runner_module.prepare(plan, torch.device("cpu"), torch.float32)
    for size, neurons in plan.neurons.items():
        per_layer = {layer: len(ns) for layer, ns in neurons.items()}
        for control in ("layer", "magnitude"):
            drawn = load_mask_file(control_mask_path(out, control, 0, size)).networks[0].layers
            assert {layer: len(ns) for layer, ns in drawn.items()} == per_layer, (size, control)
    trained = {run.group: plan.train_config(run) for run in plan.runs}
    assert trained["tune top 3"].keystone == 3 and trained["tune top 50%"].keystone == 0.5
    assert trained["tune"].keystone is None and trained["tune top 3 random-layer"].keystone is None
