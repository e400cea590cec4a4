"""Ablation modes: zero (default), mean (bit for bit the stored means), scale; baked forms
equal the hooked ones and survive a plain from_pretrained; the modes' bad settings are refused."""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fn_train.load import load_masked_model
from fn_train.run_mask import resolve_run_mask, run_mask_from_record
from shared.ablation import Ablation, NeuronMeans
from shared.ablation_modes import check_ablation
from shared.arch import find_down_projections
from shared.errors import UserError
from shared.hooks import count_hooks, pre_hooks
from shared.masked_model import MaskedModel
from tests.helpers.masks import make_mask, spread_networks, write_mask
from tests.helpers.tiny_models import forward_logits, intermediate_size, perturbed_inputs, random_ids, tiny_model


def _means(model) -> np.ndarray:
    """Made-up means, large enough that replacing a neuron by its mean changes the logits."""
    size = intermediate_size(model.config)
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 3.0, size=(model.config.num_hidden_layers, size)).astype(np.float32)


@contextmanager
def _replaced(model, replacement: dict[int, tuple[list[int], torch.Tensor]]):
    """By hand: overwrite the given neurons' down-projection inputs with the given values."""

    def make(indices, values):
        def hook(module, args):
            x = args[0].clone()
            x[..., indices] = values.to(x.dtype)
            return (x, *args[1:])

        return hook

    by_layer = {p.layer: p.module for p in find_down_projections(model)}
    with pre_hooks([(by_layer[layer], make(i, v)) for layer, (i, v) in replacement.items()]):
        yield


@pytest.mark.parametrize(("model_type", "mode"), [("llama", "key"), ("gpt2", "key"), ("llama", "complement")])
def test_mean_ablation_replaces_the_input_by_the_stored_means_bit_for_bit(model_type: str, mode: str) -> None:
    model = tiny_model(model_type)
    mask = make_mask(model, spread_networks(model))
    means = NeuronMeans(_means(model), "test", 1)
    size = intermediate_size(model.config)
    ids = random_ids(model)
    with MaskedModel(model, mask, mode, networks=[0], ablation=Ablation("mean", means=means)) as masked:
        hooked = forward_logits(model, ids)
    assert count_hooks(model) == 0 and masked.layer_masks.ablation == "mean"
    selected = {layer: list(neurons) for layer, neurons in mask.networks[0].layers.items()}
    if mode == "complement":
        selected = {layer: [n for n in range(size) if n not in selected.get(layer, [])] for layer in (0, 1)}
    by_hand = {layer: (neurons, torch.from_numpy(means.values[layer][neurons])) for layer, neurons in selected.items()}
    with _replaced(model, by_hand):
        expected = forward_logits(model, ids)
    assert torch.equal(hooked, expected)
    with MaskedModel(model, mask, mode, networks=[0]):
        zeroed = forward_logits(model, ids)
    assert not torch.equal(hooked, zeroed)  # mean is not zero


def test_scale_ablation_multiplies_the_selected_neurons() -> None:
    model = tiny_model("llama")
    mask = make_mask(model, spread_networks(model))
    ids = random_ids(model)
    neurons = mask.networks[1].layers[1]

    def scaled(module, args):
        x = args[0].clone()
        x[..., list(neurons)] *= 3.0
        return (x, *args[1:])

    with MaskedModel(model, mask, "key", networks=[1], ablation=Ablation("scale", 3.0)):
        hooked = forward_logits(model, ids)
    with pre_hooks([(find_down_projections(model)[1].module, scaled)]):
        expected = forward_logits(model, ids)
    assert torch.equal(hooked, expected)
    assert not torch.equal(hooked, forward_logits(model, ids))
    with MaskedModel(model, mask, "key", networks=[1], ablation=Ablation("scale", 0.0)):
        zero_scaled = forward_logits(model, ids)
    with MaskedModel(model, mask, "key", networks=[1]):
        assert torch.equal(zero_scaled, forward_logits(model, ids))  # a factor of 0 is zero ablation


@pytest.mark.parametrize(
    ("model_type", "mode", "ablation"),
    [
        ("llama", "key", "mean"),
        ("gpt2", "key", "mean"),
        ("llama", "complement", "mean"),
        ("llama", "key", "scale"),
        ("gpt2", "complement", "scale"),
    ],
)
def test_baked_ablation_equals_the_hooked_one(model_type: str, mode: str, ablation: str) -> None:
    model = tiny_model(model_type)
    mask = make_mask(model, spread_networks(model))
    ids = random_ids(model)
    settings = dict(means=NeuronMeans(_means(model), "test", 1)) if ablation == "mean" else dict(scale_factor=2.5)
    with MaskedModel(model, mask, mode, [0], Ablation(ablation, **settings)):
        hooked = forward_logits(model, ids)
    baked = MaskedModel(copy.deepcopy(model), mask, mode, [0], Ablation(ablation, **settings)).merge_and_unload()
    assert count_hooks(baked) == 0
    # Weight x mean summed into the bias is not the hooked order of sums: equal up to float rounding.
    torch.testing.assert_close(forward_logits(baked, ids), hooked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(forward_logits(model, ids), hooked, atol=1e-3)


def test_baked_mean_ablation_of_a_llama_without_mlp_bias_loads_plainly(tmp_path) -> None:
    model = tiny_model("llama")
    assert model.config.mlp_bias is False and model.model.layers[0].mlp.down_proj.bias is None
    mask = make_mask(model, spread_networks(model))
    means = NeuronMeans(_means(model), "test", 1)
    ids = random_ids(model)
    with MaskedModel(model, mask, "key", [0, 1], Ablation("mean", means=means)):
        hooked = forward_logits(model, ids)
    baked = MaskedModel(copy.deepcopy(model), mask, "key", [0, 1], Ablation("mean", means=means)).merge_and_unload()
    baked.save_pretrained(tmp_path / "baked")
    assert json.loads((tmp_path / "baked" / "config.json").read_text())["mlp_bias"] is True
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "baked")
    assert plain.model.layers[0].mlp.down_proj.bias is not None
    assert torch.count_nonzero(plain.model.layers[0].mlp.up_proj.bias) == 0  # added as zeros
    torch.testing.assert_close(forward_logits(plain, ids), hooked, atol=1e-5, rtol=1e-5)


def test_baking_a_mean_into_a_model_that_cannot_load_a_bias_is_refused() -> None:
    model = tiny_model("qwen2")  # no MLP bias and no config setting for one
    mask = make_mask(model, spread_networks(model))
    masked = MaskedModel(model, mask, "key", [0], Ablation("mean", means=NeuronMeans(_means(model), "t", 1)))
    with pytest.raises(UserError, match="qwen2's down-projection has none and its config cannot turn one on"):
        masked.merge_and_unload()
    assert masked.masked and count_hooks(model) == 2  # refused before any weight changed: the mask stays on
    masked.remove_mask()


def test_mean_ablation_needs_means_for_every_intervened_layer() -> None:
    model = tiny_model("llama")
    mask = make_mask(model, spread_networks(model))
    partial = _means(model)
    partial[1] = np.nan  # layer 1 not measured
    with pytest.raises(UserError, match="lack layer 1, where the mask intervenes"):
        MaskedModel(model, mask, "key", ablation=Ablation("mean", means=NeuronMeans(partial, "test", 1)))
    with pytest.raises(UserError, match="^ablation mean needs the neurons' mean activations"):
        MaskedModel(model, mask, "key", ablation=Ablation("mean"))
    assert count_hooks(model) == 0


@pytest.mark.parametrize(
    ("mode", "factor", "message"),
    [
        ("half", None, "ablation 'half' is unknown; use zero, mean or scale"),
        ("zero", 2.0, "scale_factor is given but ablation is zero; add ablation scale or drop scale_factor"),
        ("scale", float("inf"), "scale_factor must be a finite number"),
    ],
)
def test_bad_ablation_settings_are_refused(mode: str, factor, message: str) -> None:
    with pytest.raises(UserError, match=message):
        check_ablation(mode, factor)
    assert check_ablation("scale", None) == 2.0


def test_run_record_reproduces_the_mean_ablation_exactly(tmp_path) -> None:
    model = tiny_model("llama")
    path = write_mask(model, spread_networks(model), tmp_path / "mask.json")
    means = NeuronMeans(_means(model) * np.float32(1 / 3), "a pass over x", 7)  # values with long decimals
    run_mask = resolve_run_mask(path, "complement", [1], Ablation("mean", means=means))
    record = json.loads(json.dumps(run_mask.record()))
    assert record["ablation"] == "mean" and record["means_source"] == "a pass over x"
    again = run_mask_from_record(record, "fn_mask.json")
    assert again.digest == run_mask.digest
    for layer, fill in run_mask.layer_masks.fills.items():
        assert torch.equal(again.layer_masks.fills[layer], fill)
    zero = resolve_run_mask(path, "complement", [1])
    assert zero.digest != run_mask.digest and "ablation" in zero.record() and zero.record()["ablation"] == "zero"
    scaled = run_mask_from_record(
        json.loads(json.dumps(resolve_run_mask(path, "key", [1], Ablation("scale", 3.0)).record())), "f"
    )
    assert scaled.layer_masks.ablation == "scale" and scaled.layer_masks.scale_factor == 3.0
    assert "ablation scale x3" in scaled.label()


def test_loader_reapplies_a_recorded_mean_ablation(tiny_lm_dir, tmp_path) -> None:
    """A saved model folder with an fn_mask.json of a mean ablation: load_masked_model
    intervenes exactly as the run did."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    path = write_mask(model, spread_networks(model), tmp_path / "mask.json")
    means = NeuronMeans(_means(model), "test", 1)
    run_mask = resolve_run_mask(path, "key", [0], Ablation("mean", means=means))
    out = tmp_path / "out"
    model.save_pretrained(out)
    (out / "fn_mask.json").write_text(json.dumps(run_mask.record()))
    ids = random_ids(model)
    with MaskedModel(model, path, "key", [0], Ablation("mean", means=means)):
        expected = forward_logits(model, ids)
    with load_masked_model(out) as loaded:
        assert count_hooks(loaded) == 2
        assert torch.equal(forward_logits(loaded, ids), expected)
    assert count_hooks(loaded) == 0


@pytest.mark.parametrize("ablation", ["mean", "scale"])
def test_lora_on_the_down_projection_sees_the_ablated_input(ablation: str) -> None:
    """The hook sits on the LoRA wrapper: under mean ablation, noise on a masked neuron's input
    changes nothing, LoRA branch included; under scale the branch sees the scaled input."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    mask = make_mask(model, spread_networks(model))
    ids = random_ids(model)
    settings = dict(means=NeuronMeans(_means(model), "test", 1)) if ablation == "mean" else dict(scale_factor=2.0)
    with MaskedModel(model, mask, "key", [0], Ablation(ablation, **settings)):
        clean = forward_logits(model, ids)
        assert len(find_down_projections(model)[0].module._forward_pre_hooks) == 1
    noise = perturbed_inputs(model, {0: mask.networks[0].layers[0]})
    with noise, MaskedModel(model, mask, "key", [0], Ablation(ablation, **settings)):
        perturbed = forward_logits(model, ids)
    assert torch.equal(perturbed, clean) == (ablation == "mean")
    assert count_hooks(model) == 0
