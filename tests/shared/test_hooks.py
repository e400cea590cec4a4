"""Masking through MaskedModel: a masked neuron contributes nothing, bit for bit, and hooks never outlive
their block."""

from __future__ import annotations

import pytest
import torch

from shared.arch import find_down_projections
from shared.hooks import count_hooks
from shared.masked_model import MaskedModel
from tests.helpers.masks import make_mask, spread_networks
from tests.helpers.tiny_models import forward_logits, intermediate_size, perturbed_inputs, random_ids, tiny_model

CAUSAL_TYPES = ["gpt2", "llama", "qwen2", "gpt_neox", "opt", "phi", "gemma"]


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_key_mask_ignores_masked_neurons_bit_for_bit(model_type: str) -> None:
    model = tiny_model(model_type)
    mask = make_mask(model, spread_networks(model))
    ids = random_ids(model)
    masked = {0: mask.networks[0].layers[0], 1: mask.networks[0].layers[1] + mask.networks[1].layers[1]}
    unmasked = {1: [0]}  # neuron 0 of layer 1 is in no network
    with perturbed_inputs(model, masked), MaskedModel(model, mask, "key"):
        perturbed = forward_logits(model, ids)
    with MaskedModel(model, mask, "key"):
        clean = forward_logits(model, ids)
        with perturbed_inputs(model, unmasked):
            control = forward_logits(model, ids)
    assert torch.equal(perturbed, clean)
    assert not torch.equal(control, clean)  # the check can fail: an open neuron does matter
    assert not torch.equal(clean, forward_logits(model, ids))  # and the mask changes the model
    assert count_hooks(model) == 0


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_complement_mask_ignores_every_unselected_neuron(model_type: str) -> None:
    model = tiny_model(model_type)
    size = intermediate_size(model.config)
    mask = make_mask(model, spread_networks(model))
    ids = random_ids(model)
    selected = set(mask.networks[1].layers[1])
    outside = {0: list(range(size)), 1: [n for n in range(size) if n not in selected]}
    with perturbed_inputs(model, outside), MaskedModel(model, mask, "complement", networks=[1]):
        perturbed = forward_logits(model, ids)
    with MaskedModel(model, mask, "complement", networks=[1]) as masked:
        clean = forward_logits(model, ids)
        with perturbed_inputs(model, {1: sorted(selected)}):
            control = forward_logits(model, ids)
    assert masked.layer_masks.fully_closed_layers == (0,)
    assert torch.equal(perturbed, clean)
    assert not torch.equal(control, clean)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_lora_on_the_down_projection_does_not_leak(model_type: str) -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_model(model_type)
    leaf = "c_proj" if model_type == "gpt2" else "down_proj"
    # init_lora_weights=False: B is random too, so the LoRA branch really adds to the output.
    model = get_peft_model(base, LoraConfig(r=4, target_modules=[leaf], init_lora_weights=False))
    mask = make_mask(model, spread_networks(model))
    ids = random_ids(model)
    masked = {0: mask.networks[0].layers[0]}
    with perturbed_inputs(model, masked), MaskedModel(model, mask, "key", networks=[0]):
        perturbed = forward_logits(model, ids)
    with MaskedModel(model, mask, "key", networks=[0]):
        clean = forward_logits(model, ids)
    assert torch.equal(perturbed, clean)
    # The hook sits on the LoRA wrapper, so the LoRA branch sees the masked input as well.
    with MaskedModel(model, mask, "key", networks=[0]):
        projection = find_down_projections(model)[0]
        assert hasattr(projection.module, "lora_A")
        assert len(projection.module._forward_pre_hooks) == 1


def test_hooks_are_removed_when_the_block_fails() -> None:
    model = tiny_model("llama")
    mask = make_mask(model, spread_networks(model))
    with pytest.raises(RuntimeError, match="boom"):
        with MaskedModel(model, mask, "key"):
            assert count_hooks(model) == 2
            raise RuntimeError("boom")
    assert count_hooks(model) == 0


def test_mask_keeps_the_input_dtype() -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    mask = make_mask(model, spread_networks(model))
    with MaskedModel(model, mask, "key"):
        logits = forward_logits(model, random_ids(model))
    assert logits.dtype == torch.bfloat16
