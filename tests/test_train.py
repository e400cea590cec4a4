"""Training with a mask: masked neurons' parameters do not move; wrong masks are refused; no hook remains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import fn_train.trainer as trainer_module
from fn_train.config import TrainConfig
from fn_train.trainer import train
from shared.errors import UserError
from shared.hooks import count_hooks
from tests.helpers import record_results, write_mask
from tests.tiny_models import tiny_model

MASKED = {0: {0: [0, 5, 9, 40, 100], 1: [3, 4, 170]}, 1: {1: [7, 8, 9]}}


def _config(tiny_lm_dir: Path, demo_dir: Path, out: Path, mask: Path | None, **overrides) -> TrainConfig:
    settings = dict(
        model_name_or_path=str(tiny_lm_dir),
        dataset_name_or_path=str(demo_dir / "train.csv"),
        output_dir=out,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,  # large, so that every open parameter visibly moves
        weight_decay=0.0,
        max_seq_length=64,
        logging_steps=1,
        device="cpu",
        mask_file=mask,
    )
    return TrainConfig(**{**settings, **overrides})


def _mlp_weights(model) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if any(key in name for key in ("gate_proj", "up_proj", "down_proj"))
    }


def _neuron_slices(name: str, neurons: list[int], size: int):
    """The parameter entries of the given neurons: rows of gate/up, columns of down."""
    if "down_proj" in name:
        return (slice(None), neurons)
    return (neurons, slice(None))


def _assert_masked_frozen_and_open_moved(before, after, masked_by_layer: dict[int, list[int]], size: int = 176):
    moved_open = False
    for name, old in before.items():
        layer = int(name.split("layers.")[1].split(".")[0])
        neurons = masked_by_layer.get(layer, [])
        new = after[name]
        if neurons:
            index = _neuron_slices(name, neurons, size)
            assert torch.equal(old[index], new[index]), f"{name}: a masked neuron's parameters moved"
        open_neurons = [n for n in range(size) if n not in neurons]
        index = _neuron_slices(name, open_neurons, size)
        moved_open |= not torch.equal(old[index], new[index])
    assert moved_open, "no open parameter moved: the check would pass vacuously"


def _masked_by_layer(networks: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for network in networks:
        for layer, neurons in MASKED[network].items():
            out.setdefault(layer, []).extend(neurons)
    return out


def test_full_fine_tuning_leaves_masked_neurons_bit_identical(tiny_lm_dir, demo_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    train(_config(tiny_lm_dir, demo_dir, tmp_path / "out", mask, use_peft=False, networks="0,1"))
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    _assert_masked_frozen_and_open_moved(_mlp_weights(base), _mlp_weights(tuned), _masked_by_layer([0, 1]))
    saved = json.loads((tmp_path / "out" / "fn_mask.json").read_text())
    assert saved["mode"] == "key" and saved["networks"] == [0, 1] and saved["masked_neurons"] == 11
    assert saved["mask"]["model"]["fingerprint"] == json.loads(mask.read_text())["model"]["fingerprint"]


def test_lora_leaves_masked_neurons_of_the_merged_model_bit_identical(tiny_lm_dir, demo_dir, tmp_path) -> None:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    train(_config(tiny_lm_dir, demo_dir, tmp_path / "out", mask, networks="0", lora_dropout=0.0))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), tmp_path / "out")
    merged = merged.merge_and_unload()
    _assert_masked_frozen_and_open_moved(_mlp_weights(base), _mlp_weights(merged), _masked_by_layer([0]))


def test_complement_training_freezes_every_unselected_neuron(tiny_lm_dir, demo_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    train(_config(tiny_lm_dir, demo_dir, tmp_path / "out", mask, use_peft=False, mask_mode="complement", networks="0"))
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    kept = _masked_by_layer([0])
    unselected = {layer: [n for n in range(176) if n not in kept[layer]] for layer in (0, 1)}
    before, after = _mlp_weights(base), _mlp_weights(tuned)
    for name, old in before.items():
        layer = int(name.split("layers.")[1].split(".")[0])
        index = _neuron_slices(name, unselected[layer], 176)
        assert torch.equal(old[index], after[name][index]), name
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_mask_for_another_model_is_refused_before_training(tiny_lm_dir, demo_dir, tmp_path) -> None:
    other = tiny_model("llama", intermediate_size=192)
    mask = write_mask(other, {0: {0: [1, 2]}}, tmp_path / "other.json")
    with pytest.raises(UserError, match="was made for model .*intermediate_size=192"):
        train(_config(tiny_lm_dir, demo_dir, tmp_path / "out", mask))
    assert not (tmp_path / "out").exists()


def test_mask_mode_without_mask_file_is_refused() -> None:
    with pytest.raises(UserError, match="--mask-mode given without --mask-file"):
        TrainConfig(dataset_name_or_path="x.csv", output_dir=Path("out"), mask_mode="key")


@pytest.fixture
def built_trainers(monkeypatch) -> list:
    """Every trainer `train` builds, so tests can look at its model afterwards."""
    return record_results(monkeypatch, trainer_module, "build_trainer")


def test_no_hook_remains_after_training(tiny_lm_dir, demo_dir, tmp_path, built_trainers) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    train(_config(tiny_lm_dir, demo_dir, tmp_path / "out", mask, max_steps=1))
    assert count_hooks(built_trainers[0].model) == 0


def test_no_hook_remains_when_training_fails(tiny_lm_dir, demo_dir, tmp_path, built_trainers, monkeypatch) -> None:
    from trl import SFTTrainer

    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")

    def fail(self, *args, **kwargs):
        assert count_hooks(self.model) == 2  # the mask is on while training runs
        raise RuntimeError("out of memory")

    monkeypatch.setattr(SFTTrainer, "train", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(_config(tiny_lm_dir, demo_dir, tmp_path / "out", mask))
    assert count_hooks(built_trainers[0].model) == 0
