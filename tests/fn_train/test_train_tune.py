"""--mask-mode tune: only the chosen neurons' own weights learn, as small deltas; everything else is
bit-identical; the random control; 4-bit bases; merging, loading and resuming the deltas."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from fn_train.cli import app
from fn_train.config import TrainConfig
from fn_train.load import load_masked_model
from fn_train.trainer import train
from shared.errors import UserError
from shared.hooks import count_hooks
from shared.progress import PROGRESS
from tests.helpers.masks import MASKED, masked_by_layer, write_mask
from tests.helpers.processes import refused, refused_by_config, train_on_two_ranks
from tests.helpers.tiny_models import forward_logits, intermediate_size, random_ids, tiny_model
from tests.helpers.training import assert_masked_frozen_and_open_moved, neuron_parameters, small_run, train_args

TUNED = {layer: sorted(ns) for layer, ns in masked_by_layer([0, 1]).items()}  # 5 neurons in layer 0, 6 in layer 1


def _tune(model_dir: Path, demo_dir: Path, out: Path, mask: Path, **settings) -> dict:
    train(small_run(model_dir, demo_dir, out, mask, mask_mode="tune", networks="0,1", **settings))
    return json.loads((out / "fn_mask.json").read_text())


def assert_only_tuned_neurons_moved(base: torch.nn.Module, tuned: torch.nn.Module, chosen: dict[int, list[int]]):
    """Every parameter outside the chosen neurons' slices is bit-identical (attention, embeddings, norms,
    the head, every other neuron); each chosen neuron's slice of every per-neuron tensor moved."""
    before, after = neuron_parameters(base), neuron_parameters(tuned)
    assert before
    for name, parameter in base.named_parameters():
        if name not in before:
            assert torch.equal(parameter, tuned.get_parameter(name)), f"{name} moved"
    for name, (layer, axis, old) in before.items():
        new = after[name][2]
        inside = sorted(chosen.get(layer, []))
        outside = torch.tensor([n for n in range(old.shape[axis]) if n not in inside])
        assert torch.equal(old.index_select(axis, outside), new.index_select(axis, outside)), f"{name}: other neurons"
        for neuron in inside:
            index = torch.tensor([neuron])
            assert not torch.equal(old.index_select(axis, index), new.index_select(axis, index)), f"{name}[{neuron}]"


@pytest.mark.parametrize("model_fixture", ["tiny_lm_dir", "tiny_gpt2_dir"])
def test_only_the_chosen_neurons_weights_move_under_weight_decay_and_clipping(
    model_fixture: str, demo_dir, tmp_path, request
) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    # max_grad_norm far below the gradients' norm: every step is clipped; the merged model is a plain one
    settings = dict(weight_decay=0.5, max_grad_norm=0.01, merge_adapter=True)
    record = _tune(model_dir, demo_dir, tmp_path / "out", mask, **settings)
    assert_only_tuned_neurons_moved(base, AutoModelForCausalLM.from_pretrained(tmp_path / "out"), TUNED)
    assert record["mode"] == "tune" and record["baked"] is True
    assert record["tuned_neurons"] == {str(layer): neurons for layer, neurons in sorted(TUNED.items())}


def test_the_check_can_fail(tiny_lm_dir) -> None:
    """A change to one neuron outside the chosen set is caught."""
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tuned = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with torch.no_grad():
        for layer, neurons in TUNED.items():
            tuned.model.layers[layer].mlp.up_proj.weight[neurons] += 1
            tuned.model.layers[layer].mlp.gate_proj.weight[neurons] += 1
            tuned.model.layers[layer].mlp.down_proj.weight[:, neurons] += 1
        tuned.model.layers[1].mlp.down_proj.weight[0, 100] += 1e-3
    with pytest.raises(AssertionError, match="other neurons"):
        assert_only_tuned_neurons_moved(base, tuned, TUNED)


@pytest.mark.parametrize(("model_fixture", "per_neuron"), [("tiny_lm_dir", 3 * 64), ("tiny_gpt2_dir", 2 * 64 + 1)])
def test_the_trainable_count_is_the_neurons_own_weights(
    model_fixture: str, per_neuron: int, demo_dir, tmp_path, request, caplog
) -> None:
    """LLaMA: a row of gate and of up and a column of down (3 x hidden) per neuron; GPT-2: a column of
    c_fc, its bias entry and a row of c_proj (2 x hidden + 1). Nothing else trains; the output holds
    only the deltas (no model weights)."""
    model_dir = request.getfixturevalue(model_fixture)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    caplog.set_level(logging.INFO, logger=PROGRESS)
    _tune(model_dir, demo_dir, tmp_path / "out", mask)
    expected = 11 * per_neuron
    share = 100 * expected / base.num_parameters()
    assert f"trainable: {expected:,} parameters ({share:.3g}% of the model) in 11 neurons" in caplog.text
    deltas = load_file(tmp_path / "out" / "fn_tune.safetensors")
    assert sum(t.numel() for t in deltas.values()) == expected
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "config.json").exists()


def test_merged_and_unmerged_deltas_give_the_same_logits(tiny_lm_dir, demo_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    _tune(tiny_lm_dir, demo_dir, tmp_path / "deltas", mask)
    _tune(tiny_lm_dir, demo_dir, tmp_path / "merged", mask, merge_adapter=True)
    ids = random_ids(base)
    with load_masked_model(tmp_path / "deltas") as model:
        assert count_hooks(model) == 3 * len(TUNED)  # gate, up and down of each tuned layer
        unmerged = forward_logits(model, ids)
    assert count_hooks(model) == 0
    merged = forward_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids)
    # W + delta summed in the weights vs x.W + x.delta in the hooks: equal to float32 rounding.
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged, forward_logits(base, ids), atol=1e-3)  # training did change the model
    with load_masked_model(tmp_path / "merged") as model:
        assert count_hooks(model) == 0  # the weights hold the deltas


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_trains_the_deltas_in_full_precision(bits: int, tiny_lm_dir, demo_dir, tmp_path, caplog):
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    flags = {"use_4bit": bits == 4, "use_8bit": bits == 8}
    caplog.set_level(logging.INFO, logger=PROGRESS)
    _tune(tiny_lm_dir, demo_dir, tmp_path / "out", mask, weight_decay=0.1, **flags)
    assert "trainable: 2,112 parameters" in caplog.text  # 11 x 3 x 64 of the unpacked model
    deltas = load_file(tmp_path / "out" / "fn_tune.safetensors")
    assert all(t.dtype == torch.float32 and torch.count_nonzero(t) > 0 for t in deltas.values())
    with load_masked_model(tmp_path / "out") as model:  # onto the float base
        assert torch.isfinite(forward_logits(model, random_ids(base))).all()


def test_a_bfloat16_base_trains_float32_deltas_that_merge(tiny_lm_dir, demo_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.bfloat16)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    _tune(tiny_lm_dir, demo_dir, tmp_path / "deltas", mask, torch_dtype="bfloat16")
    _tune(tiny_lm_dir, demo_dir, tmp_path / "merged", mask, torch_dtype="bfloat16", merge_adapter=True)
    deltas = load_file(tmp_path / "deltas" / "fn_tune.safetensors")
    assert all(t.dtype == torch.float32 and torch.count_nonzero(t) > 0 for t in deltas.values())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    assert_only_tuned_neurons_moved(base, merged, TUNED)
    ids = random_ids(base)
    with load_masked_model(tmp_path / "deltas", dtype=torch.bfloat16) as model:
        unmerged = forward_logits(model, ids)
    # bfloat16 keeps 8 bits of mantissa: the merged weights round W + delta, the hooks round each output.
    torch.testing.assert_close(forward_logits(merged, ids).float(), unmerged.float(), atol=5e-2, rtol=5e-2)
    assert not torch.allclose(forward_logits(base, ids).float(), unmerged.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("matched_on", ["layer", "magnitude"])
def test_random_neurons_of_the_same_counts_are_drawn_seeded_and_recorded(
    matched_on: str, tiny_lm_dir, demo_dir, tmp_path
) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    first = _tune(tiny_lm_dir, demo_dir, tmp_path / "a", mask, random_neurons=matched_on)
    again = _tune(tiny_lm_dir, demo_dir, tmp_path / "b", mask, random_neurons=matched_on)
    other_seed = _tune(tiny_lm_dir, demo_dir, tmp_path / "c", mask, random_neurons=matched_on, seed=7)
    drawn = {int(layer): neurons for layer, neurons in first["tuned_neurons"].items()}
    assert {layer: len(ns) for layer, ns in drawn.items()} == {layer: len(ns) for layer, ns in TUNED.items()}
    assert drawn != TUNED and again["tuned_neurons"] == first["tuned_neurons"]
    assert other_seed["tuned_neurons"] != first["tuned_neurons"]
    assert first["random_neurons"] == matched_on and first["random_seed"] == 42
    assert_only_tuned_neurons_moved(base, _merged(tmp_path / "a"), drawn)


def _merged(folder: Path) -> torch.nn.Module:
    from shared.trained import load_trained

    return load_trained(folder)


def test_resume_continues_with_the_same_neurons_and_refuses_others(tiny_lm_dir, demo_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    settings = dict(max_steps=4, save_steps=2, random_neurons="layer")
    _tune(tiny_lm_dir, demo_dir, whole, mask, **settings)
    _tune(tiny_lm_dir, demo_dir, parted, mask, **settings)
    checkpoint = parted / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["fn_tune.safetensors"]  # no base weights
    with pytest.raises(UserError, match=r"was trained with mask .* \(tune, networks 0,1, random neurons matched on"):
        train(small_run(tiny_lm_dir, demo_dir, parted, mask, mask_mode="tune", networks="0", max_steps=4,
                        resume_from_checkpoint=str(checkpoint)))  # fmt: skip
    resumed = _tune(tiny_lm_dir, demo_dir, parted, mask, resume_from_checkpoint=str(checkpoint), **settings)
    assert resumed["tuned_neurons"] == json.loads((whole / "fn_mask.json").read_text())["tuned_neurons"]
    for key, value in load_file(whole / "fn_tune.safetensors").items():
        torch.testing.assert_close(load_file(parted / "fn_tune.safetensors")[key], value)


def test_a_mask_for_another_model_exits_2_with_one_line(tiny_lm_dir, demo_dir, tmp_path) -> None:
    other = tiny_model("llama", intermediate_size=192)
    mask = write_mask(other, {0: {0: [1, 2]}}, tmp_path / "other.json")
    args = train_args(tiny_lm_dir, demo_dir / "train.csv", tmp_path / "out", "--mask-file", str(mask))
    result = CliRunner().invoke(app, [*args, "--mask-mode", "tune"])
    refused(result, "was made for model", "intermediate_size=192")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(lora_r=8), "--lora_r does not apply to --mask-mode tune"),
        (dict(use_peft=False), "--no_peft does not apply to --mask-mode tune"),
        (dict(bake_mask=True), "--bake-mask does not apply to --mask-mode tune"),
        (dict(ablation="mean"), "--ablation does not apply to --mask-mode tune"),
        (dict(mask_mode="key", random_neurons="layer"), "--random-neurons is the control of --mask-mode tune"),
        (dict(random_neurons="size"), "--random-neurons 'size' is unknown; use layer or magnitude"),
    ],
)
def test_flags_that_do_not_apply_to_tune_mode_are_refused(settings: dict, message: str) -> None:
    settings = {"mask_mode": "tune", **settings}
    refused_by_config(
        lambda: TrainConfig(dataset_name_or_path="x.csv", output_dir=Path("out"), mask_file=Path("m.json"), **settings),
        TrainConfig,
        re.escape(message),
    )


def test_the_deltas_start_at_zero_and_change_nothing(tiny_lm_dir) -> None:
    """Attached and applied before training, the deltas leave the model's output bit-identical."""
    from shared.neuron_deltas import attach_neuron_deltas

    model = tiny_model("gpt2")
    ids = random_ids(model)
    before = forward_logits(model, ids)
    deltas = attach_neuron_deltas(model, {0: (1, 5), 1: tuple(range(0, intermediate_size(model.config), 4))})
    with deltas.applied():
        assert torch.equal(forward_logits(model, ids), before)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        f"fn_neuron_deltas.deltas.{key}" for key in deltas.deltas
    ]


def test_evaluate_scores_a_tuned_folder_next_to_its_base(tiny_lm_dir, demo_dir, tmp_path) -> None:
    """The task's held-out rows and a retention set, base vs tuned; the tuned figures are the ones of the
    deltas as trained (hooks), the base's those of the model the run names."""
    from fn_analyze.cli import app as analyze
    from fn_analyze.measure.scoring import answer_loss, load_eval_set, make_batches
    from shared.models import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    _tune(tiny_lm_dir, demo_dir, tmp_path / "out", mask)
    out = tmp_path / "eval.json"
    args = ["--tuned", str(tmp_path / "out"), "--dataset", str(demo_dir / "eval.csv"), "--out", str(out)]
    result = CliRunner().invoke(analyze, ["evaluate", *args, "--retention", str(demo_dir / "sentiment.csv")])
    assert result.exit_code == 0, result.output
    assert f"base {tiny_lm_dir}" in result.output
    results = json.loads(out.read_text())
    task, retention = results["datasets"]
    assert (task["role"], retention["role"]) == ("task", "retention") and "accuracy" in retention["tuned"][0]

    tokenizer = load_tokenizer(str(tiny_lm_dir))
    tokenizer.padding_side = "right"
    batches = make_batches(load_eval_set(str(demo_dir / "eval.csv"), tokenizer, limit=200), 16, tokenizer.pad_token_id)
    assert task["base"]["loss"] == pytest.approx(answer_loss(base, batches), abs=1e-5)
    with load_masked_model(tmp_path / "out") as model:
        assert task["tuned"][0]["loss"] == pytest.approx(answer_loss(model, batches), abs=1e-4)
    change = next(c for c in task["comparisons"] if (c["control"], c["figure"]) == ("base", "loss"))
    assert change["estimate"] == pytest.approx(task["tuned"][0]["loss"] - task["base"]["loss"])
    assert abs(change["estimate"]) > 1e-3 and change["low"] < change["estimate"] < change["high"]
    assert f"  {change['verdict']}" in result.output and out.with_suffix(".png").stat().st_size > 0

    both = CliRunner().invoke(analyze, ["evaluate", *args, "--mask-file", str(mask)])
    refused(both, "give --mask-file (measure networks) or --tuned")
    refused(CliRunner().invoke(analyze, ["evaluate", *args, "--networks", "0"]), "--networks selects or measures")


def test_evaluate_scores_several_tuned_folders_side_by_side(tiny_lm_dir, demo_dir, tmp_path) -> None:
    """The networks tuned and random neurons tuned alike, in one table and one figure: each against the base
    and against each other, paired by row, the p-values Holm-corrected over all the comparisons."""
    from fn_analyze.cli import app as analyze

    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    _tune(tiny_lm_dir, demo_dir, tmp_path / "networks", mask)
    _tune(tiny_lm_dir, demo_dir, tmp_path / "random", mask, random_neurons="layer")
    out = tmp_path / "eval.json"
    args = ["evaluate", "--tuned", str(tmp_path / "networks"), str(tmp_path / "random"), "--limit", "24"]
    args += ["--dataset", str(demo_dir / "eval.csv"), "--retention", str(demo_dir / "sentiment.csv"), "--out", str(out)]
    result = CliRunner().invoke(analyze, args)
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert results["labels"] == ["networks", "random"]
    for data in results["datasets"]:
        figures = ["loss", "accuracy"] if data["role"] == "retention" else ["loss"]
        tuned = {row["folder"]: row for row in data["tuned"]}
        pairs = [(c["arm"], c["control"], c["figure"]) for c in data["comparisons"]]
        assert pairs == [
            (arm, control, figure)
            for figure in figures
            for arm, control in (("networks", "base"), ("random", "base"), ("networks", "random"))
        ]
        for comparison in data["comparisons"]:
            figure, control = comparison["figure"], comparison["control"]
            against = data["base"] if control == "base" else tuned[control]
            assert comparison["estimate"] == pytest.approx(tuned[comparison["arm"]][figure] - against[figure])
            assert comparison["low"] <= comparison["estimate"] <= comparison["high"]
            assert comparison["p_value"] <= comparison["p_adjusted"] <= 1
            assert f"  {comparison['verdict']}" in result.output
    task = results["datasets"][0]
    between = next(c for c in task["comparisons"] if c["control"] == "random")
    assert abs(between["estimate"]) > 1e-4  # the two runs tuned different neurons
    assert between["verdict"].startswith("networks vs random, task loss: ")
    assert "p Holm-corrected over the 9 comparisons" in result.output
    for name in ("networks", "random"):
        assert f"  {name:<8} {task['tuned'][results['labels'].index(name)]['loss']:>8.4f}" in result.output
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG") and f"plot: {out.with_suffix('.png')}" in (
        result.output
    )
    refused(
        CliRunner().invoke(analyze, [*args[:4], str(tmp_path / "random"), *args[4:-1], str(tmp_path / "x.json")]),
        "--tuned names a folder twice",
    )


def test_ica_on_the_fly_tunes_the_networks_it_found(tiny_lm_dir, demo_dir, tmp_path) -> None:
    from shared.masks import load_mask_file

    out = tmp_path / "out"
    config = small_run(
        tiny_lm_dir, demo_dir, out, None, ica_on_the_fly=True, ica_components=4, ica_max_tokens=600,
        mask_mode="tune", networks="0", merge_adapter=True,
    )  # fmt: skip
    train(config)
    found = load_mask_file(out / "fn_ica_mask.json").networks[0].layers
    record = json.loads((out / "fn_mask.json").read_text())
    assert record["tuned_neurons"] == {str(layer): list(neurons) for layer, neurons in sorted(found.items())}
    chosen = {layer: list(neurons) for layer, neurons in found.items()}
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert_only_tuned_neurons_moved(base, AutoModelForCausalLM.from_pretrained(out), chosen)


@pytest.mark.slow  # about 40 s: one launch of two ranks that each import torch, transformers and TRL
def test_two_ddp_ranks_mask_their_networks_and_tune_the_same_random_neurons(tiny_lm_dir, demo_dir, tmp_path) -> None:
    """Two fn-train runs in turn in one torchrun launch (gloo on the CPU): networks 0 and 1 switched
    off on both ranks, their neurons unchanged; then tune mode, both ranks tuning the same random draw."""
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    shared = ["--learning_rate", "1e-2", "--max_seq_length", "48", "--per_device_train_batch_size", "2"]
    keyed = ["--mask-file", str(mask), "--networks", "0,1", "--no_peft", "--weight_decay", "0.5", *shared]
    keyed = train_args(
        tiny_lm_dir, demo_dir / "train.csv", tmp_path / "key", *keyed, "--logging_steps", "1", max_steps=3
    )
    flags = ["--mask-file", str(mask), "--mask-mode", "tune", "--networks", "0,1", "--random-neurons", "layer"]
    out = tmp_path / "out"
    args = train_args(tiny_lm_dir, demo_dir / "train.csv", out, *flags, *shared, "--merge_adapter", max_steps=3)
    stdout = train_on_two_ranks(keyed, args)
    for rank in (0, 1):
        assert f"fn-train[rank {rank}]: mask {mask} (key, networks 0,1): 11 neurons switched off" in stdout
        assert f"fn-train[rank {rank}]: trainable: 2,112 parameters" in stdout
    state = json.loads((tmp_path / "key" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["train_batch_size"] == 2
    keyed_model = AutoModelForCausalLM.from_pretrained(tmp_path / "key")
    assert_masked_frozen_and_open_moved(
        neuron_parameters(base), neuron_parameters(keyed_model), masked_by_layer([0, 1])
    )
    record = json.loads((out / "fn_mask.json").read_text())
    drawn = {int(layer): neurons for layer, neurons in record["tuned_neurons"].items()}
    assert drawn != TUNED
    assert_only_tuned_neurons_moved(base, AutoModelForCausalLM.from_pretrained(out), drawn)
