"""fn-train under mean and scale ablation: masked neurons' parameters stay bit-identical (their
down-projection columns do get gradients now), the run's means travel in fn_mask.json, a baked
mean ablation loads plainly, and a checkpoint is resumed only with the same ablation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import fn_train.trainer as trainer_module
from fn_analyze.neurons.magnitude import stats_from_activations
from fn_analyze.record.collect import CollectConfig, collect
from fn_train.config import TrainConfig
from fn_train.load import load_masked_model
from fn_train.trainer import train
from shared.errors import UserError
from shared.hooks import count_hooks
from shared.models import model_info
from tests.helpers.masks import MASKED, masked_by_layer, write_mask
from tests.helpers.processes import record_results, refused_by_config
from tests.helpers.training import small_run, train_masked_and_check


@pytest.mark.parametrize(
    ("model_fixture", "use_peft", "settings"),
    [
        ("tiny_lm_dir", False, dict(ablation="mean")),
        ("tiny_lm_dir", True, dict(ablation="mean")),
        ("tiny_gpt2_dir", False, dict(ablation="mean")),
        ("tiny_lm_dir", False, dict(ablation="scale", scale_factor=2.0)),
        ("tiny_lm_dir", True, dict(ablation="scale", scale_factor=0.5)),
    ],
)
def test_masked_neurons_stay_bit_identical_under_mean_and_scale(
    model_fixture: str, use_peft: bool, settings: dict, demo_dir, tmp_path, request
) -> None:
    """Under mean and scale the masked neurons' down-projection columns (and, under scale, their
    up/gate rows) get non-zero gradients: only the restore after each step keeps them."""
    model_dir = request.getfixturevalue(model_fixture)
    out = train_masked_and_check(model_dir, demo_dir, tmp_path, use_peft=use_peft, **settings)
    record = json.loads((out / "fn_mask.json").read_text())
    assert record["ablation"] == settings["ablation"]
    if settings["ablation"] == "mean":
        assert [len(v) for v in record["means"].values()] == [5, 6]  # the masked neurons of layers 0 and 1
        assert "rows of" in record["means_source"]


def test_baked_mean_ablation_of_a_training_run_loads_plainly(tiny_lm_dir, demo_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FN_CACHE_DIR", str(tmp_path / "cache"))
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    acts = tmp_path / "acts"
    collect(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=acts, model=str(tiny_lm_dir), device="cpu"))
    hooked_dir, baked_dir = tmp_path / "hooked", tmp_path / "baked"
    common = dict(use_peft=False, networks="0,1", ablation="mean", means_from=acts)
    train(small_run(tiny_lm_dir, demo_dir, hooked_dir, mask, **common))
    train(small_run(tiny_lm_dir, demo_dir, baked_dir, mask, bake_mask=True, **common))
    record = json.loads((hooked_dir / "fn_mask.json").read_text())
    means = stats_from_activations(acts, model_info(base, "tiny"), ["mean"]).means().values
    for layer, neurons in masked_by_layer([0, 1]).items():
        assert record["means"][str(layer)] == [float(v) for v in means[layer][sorted(neurons)]]
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with load_masked_model(hooked_dir) as model, torch.no_grad():
        assert count_hooks(model) == 2
        with_hooks = model(input_ids=ids).logits
    plain = AutoModelForCausalLM.from_pretrained(baked_dir)
    assert plain.config.mlp_bias is True
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, with_hooks, atol=1e-5, rtol=1e-5)


def test_mean_bake_on_an_architecture_without_mlp_bias_setting_is_refused_before_training(
    tiny_tokenizer, demo_dir, tmp_path, monkeypatch
) -> None:
    from tests.conftest import _save_tiny_lm

    qwen_dir = _save_tiny_lm("qwen2", tmp_path / "qwen2", tiny_tokenizer)  # no MLP bias, no setting for one
    base = AutoModelForCausalLM.from_pretrained(qwen_dir)
    mask = write_mask(base, {0: {0: [1, 2, 3]}}, tmp_path / "mask.json")
    trainers = record_results(monkeypatch, trainer_module, "build_trainer")
    with pytest.raises(UserError, match="drop --bake-mask .* or use --ablation zero"):
        train(small_run(qwen_dir, demo_dir, tmp_path / "out", mask, use_peft=False, ablation="mean", bake_mask=True))
    assert trainers and trainers[0].state.global_step == 0
    assert not (tmp_path / "out").exists()


def test_checkpoint_is_resumed_only_with_the_same_ablation(tiny_lm_dir, demo_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    out = tmp_path / "out"
    train(small_run(tiny_lm_dir, demo_dir, out, mask, max_steps=2, save_steps=1, ablation="scale", scale_factor=2.0))
    checkpoint = out / "checkpoint-1"
    with pytest.raises(UserError, match=r"trained with mask .*\(key, ablation scale x2, networks all\), not with"):
        train(small_run(tiny_lm_dir, demo_dir, out, mask, max_steps=2, resume_from_checkpoint=str(checkpoint)))
    with pytest.raises(UserError, match="ablation scale x2.*not with .*ablation mean"):
        train(
            small_run(
                tiny_lm_dir, demo_dir, out, mask, max_steps=2, resume_from_checkpoint=str(checkpoint), ablation="mean"
            )
        )
    train(
        small_run(
            tiny_lm_dir,
            demo_dir,
            out,
            mask,
            max_steps=2,
            resume_from_checkpoint=str(checkpoint),
            ablation="scale",
            scale_factor=2.0,
        )
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(ablation="mean"), "--ablation given without --mask-file"),
        (dict(mask_file=Path("m.json"), ablation="scale", scale_factor=float("nan")), "must be a finite number"),
        (dict(mask_file=Path("m.json"), scale_factor=2.0), "--scale-factor is given but --ablation is zero"),
        (dict(mask_file=Path("m.json"), means_from=Path("acts")), "--means-from is given but --ablation is zero"),
        (dict(mask_file=Path("m.json"), ablation="half"), "--ablation 'half' is unknown"),
    ],
)
def test_contradictory_ablation_settings_are_refused(settings: dict, message: str) -> None:
    refused_by_config(
        lambda: TrainConfig(dataset_name_or_path="x.csv", output_dir=Path("out"), **settings), TrainConfig, message
    )
