"""Training with a mask: masked neurons' parameters do not move; wrong masks are refused; no hook remains."""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import fn_train.trainer as trainer_module
from fn_train.config import TrainConfig
from fn_train.freeze import KeepMaskedNeuronsFrozen
from fn_train.trainer import train
from shared.errors import UserError
from shared.hooks import count_hooks
from shared.progress import PROGRESS
from tests.helpers.masks import MASKED, masked_by_layer, write_mask
from tests.helpers.processes import record_results, refused_by_config
from tests.helpers.tiny_models import tiny_model
from tests.helpers.training import (
    assert_masked_frozen_and_open_moved,
    neuron_parameters,
    small_run,
    train_masked_and_check,
)


def test_full_fine_tuning_leaves_masked_neurons_bit_identical(tiny_lm_dir, demo_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    train(small_run(tiny_lm_dir, demo_dir, tmp_path / "out", mask, use_peft=False, networks="0,1"))
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_masked_frozen_and_open_moved(neuron_parameters(base), neuron_parameters(tuned), masked_by_layer([0, 1]))
    saved = json.loads((tmp_path / "out" / "fn_mask.json").read_text())
    assert saved["mode"] == "key" and saved["networks"] == [0, 1] and saved["masked_neurons"] == 11
    assert saved["mask"]["model"]["fingerprint"] == json.loads(mask.read_text())["model"]["fingerprint"]


def test_lora_leaves_masked_neurons_of_the_merged_model_bit_identical(tiny_lm_dir, demo_dir, tmp_path) -> None:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    train(small_run(tiny_lm_dir, demo_dir, tmp_path / "out", mask, networks="0", lora_dropout=0.0))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), tmp_path / "out")
    merged = merged.merge_and_unload()
    assert_masked_frozen_and_open_moved(neuron_parameters(base), neuron_parameters(merged), masked_by_layer([0]))


@pytest.mark.parametrize(
    ("model_fixture", "use_peft"), [("tiny_lm_dir", False), ("tiny_lm_dir", True), ("tiny_gpt2_dir", False)]
)
def test_masked_neurons_stay_bit_identical_under_weight_decay_and_clipping(
    model_fixture: str, use_peft: bool, demo_dir, tmp_path, request
) -> None:
    """AdamW's decoupled decay shrinks every weight, gradient or not: without the restore
    after each optimizer step (fn_train.freeze) the full fine-tuning cases fail."""
    model_dir = request.getfixturevalue(model_fixture)
    # max_grad_norm far below the gradients' norm: every step is clipped
    train_masked_and_check(model_dir, demo_dir, tmp_path, use_peft=use_peft, max_grad_norm=0.01)


def test_without_the_restore_weight_decay_moves_masked_neurons(tiny_lm_dir, demo_dir, tmp_path, monkeypatch) -> None:
    """The check above can fail: switch the restore off and the masked rows decay."""
    monkeypatch.setattr(KeepMaskedNeuronsFrozen, "on_optimizer_step", lambda self, *a, **k: None)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    train(small_run(tiny_lm_dir, demo_dir, tmp_path / "out", mask, use_peft=False, weight_decay=0.5, networks="0"))
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with pytest.raises(AssertionError, match="a masked neuron's parameters moved"):
        assert_masked_frozen_and_open_moved(neuron_parameters(base), neuron_parameters(tuned), masked_by_layer([0]))


def test_complement_training_freezes_every_unselected_neuron(tiny_lm_dir, demo_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    out = tmp_path / "out"
    train(small_run(tiny_lm_dir, demo_dir, out, mask, use_peft=False, mask_mode="complement", networks="0"))
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    kept = masked_by_layer([0])
    unselected = {layer: [n for n in range(176) if n not in kept[layer]] for layer in (0, 1)}
    assert_masked_frozen_and_open_moved(neuron_parameters(base), neuron_parameters(tuned), unselected)


def test_complement_with_a_layer_missed_closes_its_mlp_and_says_so(
    tiny_lm_dir, demo_dir, tmp_path, caplog, capsys, built_trainers
) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    # Network 1 lies in layer 1 only: layer 0's MLP must be switched off entirely.
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger=PROGRESS)
    train(small_run(tiny_lm_dir, demo_dir, out, mask, use_peft=False, mask_mode="complement", networks="1"))
    said = "layer 0 has no selected neuron, so its MLP is off"
    assert said in caplog.text and said not in capsys.readouterr().out  # a progress line: the library prints nothing
    assert json.loads((tmp_path / "out" / "fn_mask.json").read_text())["fully_closed_layers"] == [0]
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    every = {0: list(range(176)), 1: [n for n in range(176) if n not in MASKED[1][1]]}
    assert_masked_frozen_and_open_moved(neuron_parameters(base), neuron_parameters(tuned), every)


def test_mask_for_another_model_is_refused_before_training(tiny_lm_dir, demo_dir, tmp_path) -> None:
    other = tiny_model("llama", intermediate_size=192)
    mask = write_mask(other, {0: {0: [1, 2]}}, tmp_path / "other.json")
    with pytest.raises(UserError, match="was made for model .*intermediate_size=192"):
        train(small_run(tiny_lm_dir, demo_dir, tmp_path / "out", mask))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(mask_mode="key"), "--mask-mode given without --mask-file"),
        (dict(networks="0"), "--networks given without --mask-file"),
        (dict(bake_mask=True), "--bake-mask given without --mask-file"),
        (dict(use_4bit=True, use_8bit=True), "--use_4bit and --use_8bit exclude each other"),
        (dict(use_4bit=True, use_peft=False), "--use_4bit freezes the base weights in quantized form; drop --no_peft"),
        (dict(merge_adapter=True, use_peft=False), "--merge_adapter merges a LoRA adapter, but --no_peft"),
        (dict(mask_file=Path("m.json"), bake_mask=True), "--bake-mask writes full weights.*add --merge_adapter"),
        (dict(mask_file=Path("m.json"), ica_on_the_fly=True), "--mask-file and --ica-on-the-fly both give a mask"),
        (dict(mask_file=Path("m.json"), mask_mode="half"), "--mask-mode 'half' is unknown"),
    ],
)
def test_contradictory_settings_are_refused(settings: dict, message: str) -> None:
    refused_by_config(
        lambda: TrainConfig(dataset_name_or_path="x.csv", output_dir=Path("out"), **settings), TrainConfig, message
    )


def test_a_refusal_names_the_parameters_from_python_and_the_flags_on_the_command_line() -> None:
    """fn-train's flags: the seed's HF-style ones with underscores, its own hyphenated, an off-switch as itself."""
    refused_by_config(
        lambda: TrainConfig(dataset_name_or_path="x.csv", output_dir=Path("out"), use_4bit=True, use_peft=False),
        TrainConfig,
        "^--use_4bit freezes the base weights in quantized form; drop --no_peft$",
        python="use_4bit freezes the base weights in quantized form; drop use_peft=False",
    )
    refused_by_config(
        lambda: TrainConfig(dataset_name_or_path="x.csv", output_dir=Path("out"), networks="0"),
        TrainConfig,
        "^--networks given without --mask-file; add --mask-file or drop --networks$",
        python="networks given without mask_file; add mask_file or drop networks",
    )


def test_ica_on_the_fly_collects_with_every_setting_training_shares(monkeypatch, tmp_path) -> None:
    """--ica-on-the-fly's collect gets every setting its config shares with training, under either
    name (it once dropped --trust_remote_code, so collect refused a model that training accepts)."""
    import fn_train.ica_mask as ica_mask_module
    from fn_analyze.record.collect import CollectConfig

    config = TrainConfig(
        dataset_name_or_path="data.csv", output_dir=tmp_path / "out", model_name_or_path="org/model",
        data_format="qa", template_format="plain", max_seq_length=77, torch_dtype="float32", device="cpu",
        trust_remote_code=True, seed=3, ica_on_the_fly=True, ica_max_tokens=123,
    )  # fmt: skip
    collected: list[CollectConfig] = []
    monkeypatch.setattr(ica_mask_module, "collect", collected.append)
    monkeypatch.setattr(ica_mask_module, "run_ica", lambda ica_config: None)
    ica_mask_module.mask_from_training_data(config, resuming=False)

    same_name = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(CollectConfig)}
    assert {"trust_remote_code", "data_format", "template_format", "device"} <= same_name
    assert {name: getattr(collected[0], name) for name in same_name} == {
        name: getattr(config, name) for name in same_name
    }
    renamed = {"dataset": "data.csv", "model": "org/model", "max_length": 77, "dtype": "float32", "max_tokens": 123}
    assert {name: getattr(collected[0], name) for name in renamed} == renamed


@pytest.fixture
def built_trainers(monkeypatch) -> list:
    """Every trainer `train` builds, so tests can look at its model afterwards."""
    return record_results(monkeypatch, trainer_module, "build_trainer")


def test_no_hook_remains_after_training(tiny_lm_dir, demo_dir, tmp_path, built_trainers) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    train(small_run(tiny_lm_dir, demo_dir, tmp_path / "out", mask, max_steps=1))
    assert count_hooks(built_trainers[0].model) == 0


def test_no_hook_and_no_output_folder_remain_when_training_fails(
    tiny_lm_dir, demo_dir, tmp_path, built_trainers, monkeypatch
) -> None:
    from trl import SFTTrainer

    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")

    def fail(self, *args, **kwargs):
        assert count_hooks(self.model) == 2  # the mask is on while training runs
        raise RuntimeError("out of memory")

    monkeypatch.setattr(SFTTrainer, "train", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(small_run(tiny_lm_dir, demo_dir, tmp_path / "out", mask))
    assert count_hooks(built_trainers[0].model) == 0
    assert not (tmp_path / "out").exists()  # created by this run, no checkpoint in it: removed


def test_loss_is_on_the_answer_and_eos_only_by_default(tiny_lm_dir, demo_dir, tmp_path) -> None:
    from fn_train.trainer import build_trainer

    def first_labels(**settings):
        trainer = build_trainer(small_run(tiny_lm_dir, demo_dir, tmp_path / "out", None, **settings))
        batch = next(iter(trainer.get_train_dataloader()))
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        return trainer.processing_class, ids, labels, batch["attention_mask"][0]

    tokenizer, ids, labels, attention = first_labels()
    learned = ids[labels != -100]
    assert tokenizer.eos_token_id in learned.tolist()  # EOS is learned
    assert "<|im_start|>" not in tokenizer.decode(learned)  # nothing of the prompt is
    assert 0 < len(learned) < int(attention.sum())
    _, ids, labels, attention = first_labels(completion_only_loss=False)
    assert int((labels != -100).sum()) == int(attention.sum())  # every real token
