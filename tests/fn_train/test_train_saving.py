"""What fn-train saves: adapter or full model, LoRA merged, the mask baked into the weights or
re-applied by the loader; QLoRA (bitsandbytes runs on CPU) keeps masking."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import fn_train.quantization as quantization_module
from fn_train.config import TrainConfig
from fn_train.load import load_masked_model
from fn_train.trainer import train
from shared.hooks import count_hooks
from shared.masked_model import MaskedModel
from tests.helpers.masks import MASKED, make_mask, masked_by_layer, write_mask
from tests.helpers.processes import refused_by_config
from tests.helpers.tiny_models import forward_logits, intermediate_size, perturbed_inputs, random_ids, tiny_model
from tests.helpers.training import small_run


@pytest.mark.parametrize(("model_type", "mode"), [("llama", "key"), ("gpt2", "key"), ("llama", "complement")])
def test_baked_model_without_hooks_equals_the_hooked_model(model_type: str, mode: str) -> None:
    model = tiny_model(model_type)
    size = intermediate_size(model.config)
    mask = make_mask(model, {0: {0: list(range(0, size, 3))}, 1: {1: [2, 4, 6]}})
    ids = random_ids(model)
    with MaskedModel(model, mask, mode, networks=[1]):
        hooked = forward_logits(model, ids)
    baked = MaskedModel(copy.deepcopy(model), mask, mode, networks=[1]).merge_and_unload()
    assert count_hooks(baked) == 0
    assert torch.equal(forward_logits(baked, ids), hooked)
    assert not torch.equal(forward_logits(model, ids), hooked)  # the mask does change the model


def test_bake_mask_output_loads_plainly_and_matches_the_loader(tiny_lm_dir, demo_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    hooked_dir, baked_dir = tmp_path / "hooked", tmp_path / "baked"
    train(small_run(tiny_lm_dir, demo_dir, hooked_dir, mask, use_peft=False, networks="0,1"))
    train(small_run(tiny_lm_dir, demo_dir, baked_dir, mask, use_peft=False, networks="0,1", bake_mask=True))
    ids = random_ids(base)
    with load_masked_model(hooked_dir) as model:
        assert count_hooks(model) == 2  # fn_mask.json re-applied, one hook per masked layer
        with_hooks = forward_logits(model, ids)
    assert count_hooks(model) == 0
    assert not torch.equal(forward_logits(model, ids), with_hooks)  # without its mask the trained model differs
    plain = AutoModelForCausalLM.from_pretrained(baked_dir)
    assert torch.equal(forward_logits(plain, ids), with_hooks)
    assert json.loads((baked_dir / "fn_mask.json").read_text())["baked"] is True
    with load_masked_model(baked_dir) as model:
        assert count_hooks(model) == 0  # the weights hold the mask


def test_merged_and_baked_lora_matches_the_adapter_with_hooks(tiny_lm_dir, demo_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    train(small_run(tiny_lm_dir, demo_dir, adapter_dir, mask, networks="0", lora_dropout=0.0))
    train(
        small_run(
            tiny_lm_dir, demo_dir, merged_dir, mask, networks="0", lora_dropout=0.0, merge_adapter=True, bake_mask=True
        )
    )
    assert (adapter_dir / "adapter_model.safetensors").is_file() and not (adapter_dir / "config.json").is_file()
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").is_file()
    ids = random_ids(base)
    with load_masked_model(adapter_dir) as model:
        with_hooks = forward_logits(model, ids)
    merged = forward_logits(AutoModelForCausalLM.from_pretrained(merged_dir), ids)
    # W + BA merged is not summed in the adapter's order: equal up to float rounding.
    torch.testing.assert_close(merged, with_hooks, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged, forward_logits(base, ids), atol=1e-3)  # training did change the model


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_lora_still_masks_bit_for_bit(tiny_lm_dir, bits: int) -> None:
    from peft import LoraConfig, get_peft_model

    from fn_train.config import TrainConfig
    from fn_train.quantization import quantization_config
    from shared.models import load_causal_lm

    flags = {"use_4bit": bits == 4, "use_8bit": bits == 8}
    quantization = quantization_config(TrainConfig("x.csv", Path("unused"), **flags), torch.float32)
    base = load_causal_lm(
        str(tiny_lm_dir), torch.float32, torch.device("cpu"), quantization_config=quantization, device_map={"": "cpu"}
    )
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    # Train mode (no dropout here) as in fine-tuning: bitsandbytes' CPU inference kernel
    # needs layer sizes that are multiples of its block, which the tiny model's are not.
    model.train()
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert type(down.base_layer).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    mask = make_mask(model, {0: {0: list(range(0, 176, 3)), 1: [1, 2, 3]}})
    ids = random_ids(model)
    with perturbed_inputs(model, {0: list(range(0, 176, 3)), 1: [1, 2, 3]}), MaskedModel(model, mask, "key"):
        perturbed = forward_logits(model, ids)
    with MaskedModel(model, mask, "key"):
        clean = forward_logits(model, ids)
        with perturbed_inputs(model, {0: [1]}):
            control = forward_logits(model, ids)
    assert torch.equal(perturbed, clean)
    assert not torch.equal(control, clean)


def test_qlora_run_keeps_masked_lora_entries_zero_and_merges_into_a_full_model(tiny_lm_dir, demo_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    train(small_run(tiny_lm_dir, demo_dir, tmp_path / "qlora", mask, networks="0", use_4bit=True, weight_decay=0.1))
    adapter = load_file(tmp_path / "qlora" / "adapter_model.safetensors")
    frozen = masked_by_layer([0])
    for layer, neurons in frozen.items():
        prefix = f"base_model.model.model.layers.{layer}.mlp"
        assert torch.count_nonzero(adapter[f"{prefix}.down_proj.lora_A.weight"][:, neurons]) == 0
        for name in ("up_proj", "gate_proj"):
            lora_b = adapter[f"{prefix}.{name}.lora_B.weight"]
            assert torch.count_nonzero(lora_b[neurons]) == 0  # the masked neurons' rows of B @ A stay zero
            assert torch.count_nonzero(lora_b) > 0  # while the open neurons' rows trained

    train(
        small_run(
            tiny_lm_dir,
            demo_dir,
            tmp_path / "merged",
            mask,
            networks="0",
            use_4bit=True,
            merge_adapter=True,
            bake_mask=True,
        )
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    for layer, neurons in frozen.items():
        down = merged.model.layers[layer].mlp.down_proj.weight
        assert torch.count_nonzero(down[:, neurons]) == 0 and torch.count_nonzero(down) > 0


def test_quantization_where_bitsandbytes_does_not_load_is_a_clear_refusal(
    tiny_lm_dir, demo_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(quantization_module, "bitsandbytes_available", lambda: False)
    refused_by_config(
        lambda: train(small_run(tiny_lm_dir, demo_dir, tmp_path / "out", None, use_8bit=True)),
        TrainConfig,
        "^--use_8bit needs bitsandbytes, which does not load on this platform; drop --use_8bit",
        python="use_8bit needs bitsandbytes",
    )
    assert not (tmp_path / "out").exists()
