"""Masking: a masked neuron contributes nothing, bit for bit, and hooks never outlive their block."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from shared.arch import find_down_projections
from shared.hooks import apply_mask, count_hooks, pre_hooks
from tests.helpers import make_mask
from tests.tiny_models import intermediate_size, tiny_model

CAUSAL_TYPES = ["gpt2", "llama", "qwen2", "gpt_neox", "opt", "phi", "gemma"]


def _networks(model) -> dict[int, dict[int, list[int]]]:
    size = intermediate_size(model.config)
    return {0: {0: list(range(0, size, 3)), 1: list(range(1, size, 5))}, 1: {1: [2, 4, 6]}}


@contextmanager
def _perturbed(model, neurons: dict[int, list[int]]):
    """Add large noise to the given neurons' down-projection inputs (runs before any mask hook)."""
    generator = torch.Generator().manual_seed(1)

    def make(indices):
        def hook(module, args):
            x = args[0].clone()
            x[..., indices] += 10 * torch.randn(x[..., indices].shape, generator=generator)
            return (x, *args[1:])

        return hook

    by_layer = {p.layer: p.module for p in find_down_projections(model)}
    with pre_hooks([(by_layer[layer], make(indices)) for layer, indices in neurons.items()]):
        yield


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _inputs(model):
    return torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_key_mask_ignores_masked_neurons_bit_for_bit(model_type: str) -> None:
    model = tiny_model(model_type)
    mask = make_mask(model, _networks(model))
    ids = _inputs(model)
    masked = {0: mask.networks[0].layers[0], 1: mask.networks[0].layers[1] + mask.networks[1].layers[1]}
    unmasked = {1: [0]}  # neuron 0 of layer 1 is in no network
    with _perturbed(model, masked), apply_mask(model, mask, "key"):
        perturbed = _logits(model, ids)
    with apply_mask(model, mask, "key"):
        clean = _logits(model, ids)
        with _perturbed(model, unmasked):
            control = _logits(model, ids)
    assert torch.equal(perturbed, clean)
    assert not torch.equal(control, clean)  # the check can fail: an open neuron does matter
    assert not torch.equal(clean, _logits(model, ids))  # and the mask changes the model
    assert count_hooks(model) == 0


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_complement_mask_ignores_every_unselected_neuron(model_type: str) -> None:
    model = tiny_model(model_type)
    size = intermediate_size(model.config)
    mask = make_mask(model, _networks(model))
    ids = _inputs(model)
    selected = set(mask.networks[1].layers[1])
    outside = {0: list(range(size)), 1: [n for n in range(size) if n not in selected]}
    with _perturbed(model, outside), apply_mask(model, mask, "complement", networks=[1]):
        perturbed = _logits(model, ids)
    with apply_mask(model, mask, "complement", networks=[1]) as layer_masks:
        clean = _logits(model, ids)
        with _perturbed(model, {1: sorted(selected)}):
            control = _logits(model, ids)
    assert layer_masks.fully_closed_layers == (0,)
    assert torch.equal(perturbed, clean)
    assert not torch.equal(control, clean)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_lora_on_the_down_projection_does_not_leak(model_type: str) -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_model(model_type)
    leaf = "c_proj" if model_type == "gpt2" else "down_proj"
    # init_lora_weights=False: B is random too, so the LoRA branch really adds to the output.
    model = get_peft_model(base, LoraConfig(r=4, target_modules=[leaf], init_lora_weights=False))
    mask = make_mask(model, _networks(model))
    ids = _inputs(model)
    masked = {0: mask.networks[0].layers[0]}
    with _perturbed(model, masked), apply_mask(model, mask, "key", networks=[0]):
        perturbed = _logits(model, ids)
    with apply_mask(model, mask, "key", networks=[0]):
        clean = _logits(model, ids)
    assert torch.equal(perturbed, clean)
    # The hook sits on the LoRA wrapper, so the LoRA branch sees the masked input as well.
    with apply_mask(model, mask, "key", networks=[0]):
        projection = find_down_projections(model)[0]
        assert hasattr(projection.module, "lora_A")
        assert len(projection.module._forward_pre_hooks) == 1


def test_hooks_are_removed_when_the_block_fails() -> None:
    model = tiny_model("llama")
    mask = make_mask(model, _networks(model))
    with pytest.raises(RuntimeError, match="boom"):
        with apply_mask(model, mask, "key"):
            assert count_hooks(model) == 2
            raise RuntimeError("boom")
    assert count_hooks(model) == 0


def test_mask_keeps_the_input_dtype() -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    mask = make_mask(model, _networks(model))
    with apply_mask(model, mask, "key"):
        logits = _logits(model, _inputs(model))
    assert logits.dtype == torch.bfloat16
