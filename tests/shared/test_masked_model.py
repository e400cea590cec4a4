"""MaskedModel, the one way to put a mask on a model: the same outputs as a mask written by hand,
`disable_mask()` for a block, no hook left by `remove_mask()` or a `with` block, and
`merge_and_unload()` writing the mask into the down-projections' weights."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from shared.ablation import Ablation, NeuronMeans
from shared.arch import find_down_projections
from shared.errors import UserError
from shared.hooks import count_hooks, pre_hooks
from shared.masked_model import MaskedModel
from tests.helpers.masks import make_mask, spread_networks
from tests.helpers.tiny_models import forward_logits, intermediate_size, random_ids, tiny_model


@contextmanager
def _zeroed_by_hand(model, neurons: dict[int, list[int]]):
    """The given neurons' down-projection inputs set to zero, written without the library's hooks."""

    def make(indices):
        def hook(module, args):
            x = args[0].clone()
            x[..., indices] = 0.0
            return (x, *args[1:])

        return hook

    by_layer = {p.layer: p.module for p in find_down_projections(model)}
    with pre_hooks([(by_layer[layer], make(indices)) for layer, indices in neurons.items() if indices]):
        yield


def _means(model) -> NeuronMeans:
    rng = np.random.default_rng(0)
    shape = (model.config.num_hidden_layers, intermediate_size(model.config))
    return NeuronMeans(rng.normal(0.0, 3.0, size=shape).astype(np.float32), "test", 1)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize(("mode", "networks"), [("key", [0, 1]), ("key", [1]), ("complement", [1])])
def test_masked_model_equals_a_mask_written_by_hand(model_type: str, mode: str, networks: list[int]) -> None:
    model = tiny_model(model_type)
    mask = make_mask(model, spread_networks(model))
    size = intermediate_size(model.config)
    chosen = mask.union(networks)
    if mode == "key":
        off = {layer: list(neurons) for layer, neurons in chosen.items()}
    else:  # every neuron but the chosen ones, in every layer (layer 0 holds none of network 1: all off)
        off = {layer: [n for n in range(size) if n not in chosen.get(layer, ())] for layer in (0, 1)}
    ids = random_ids(model)
    with _zeroed_by_hand(model, off):
        expected = forward_logits(model, ids)
    with MaskedModel(model, mask, mode, networks) as masked:
        assert torch.equal(forward_logits(masked, ids), expected)
    assert not torch.equal(forward_logits(model, ids), expected)  # the mask changes the model
    assert count_hooks(model) == 0


def test_disable_mask_gives_the_bare_model_for_the_block() -> None:
    model = tiny_model("llama")
    mask = make_mask(model, spread_networks(model))
    ids = random_ids(model)
    bare = forward_logits(model, ids)
    masked = MaskedModel(model, mask, "key", [0], Ablation("mean", means=_means(model)))
    on = forward_logits(masked, ids)
    assert not torch.equal(on, bare)
    with masked.disable_mask() as inner:
        assert inner is model and count_hooks(model) == 0 and not masked.masked
        assert torch.equal(forward_logits(masked, ids), bare)
    assert masked.masked and torch.equal(forward_logits(masked, ids), on)
    with pytest.raises(RuntimeError, match="boom"):
        with masked.disable_mask():
            raise RuntimeError("boom")
    assert torch.equal(forward_logits(masked, ids), on)  # back on after a failing block too
    masked.remove_mask()
    with pytest.raises(ValueError, match="the mask was removed"):
        with masked.disable_mask():
            pass


def test_remove_mask_and_the_end_of_with_leave_no_hook() -> None:
    model = tiny_model("llama")
    mask = make_mask(model, spread_networks(model))
    ids = random_ids(model)
    plain = forward_logits(model, ids)
    masked = MaskedModel(model, mask, "key", [0, 1])
    assert masked.masked and masked.model is model and masked.config is model.config  # the model's attributes
    assert count_hooks(model) == 2  # one per layer the networks touch
    expected = forward_logits(masked, ids)
    assert torch.equal(forward_logits(model, ids), expected)  # the hooks are on the model itself
    assert masked.remove_mask() is model
    assert count_hooks(model) == 0 and not masked.masked
    masked.remove_mask()  # twice: nothing more to lift
    assert torch.equal(forward_logits(model, ids), plain)
    with MaskedModel(model, mask, "complement", [1]) as kept:
        assert count_hooks(model) == 2  # complement: every layer has a vector
        assert not torch.equal(forward_logits(kept, ids), plain)
    assert count_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with MaskedModel(model, mask, "key"):
            raise RuntimeError("boom")
    assert count_hooks(model) == 0


def test_a_mask_made_for_another_model_is_refused_and_leaves_no_hook() -> None:
    mask = make_mask(tiny_model("llama"), spread_networks(tiny_model("llama")))
    other = tiny_model("llama", intermediate_size=96)
    with pytest.raises(UserError, match="was made for model"):
        MaskedModel(other, mask)
    assert count_hooks(other) == 0


def _neuron_axis_changes(before: torch.Tensor, after: torch.Tensor, linear: bool) -> set[int]:
    """The neurons whose column (Linear: weight[:, j]; Conv1D: weight[j, :]) differs."""
    differs = (before != after).any(dim=0 if linear else 1)
    return set(differs.nonzero().flatten().tolist())


@pytest.mark.parametrize(
    ("model_type", "ablation"), [("llama", "zero"), ("gpt2", "zero"), ("llama", "mean"), ("gpt2", "mean")]
)
def test_merge_and_unload_writes_the_mask_into_the_masked_columns_only(model_type: str, ablation: str) -> None:
    model = tiny_model(model_type)
    mask = make_mask(model, spread_networks(model))
    ids = random_ids(model)
    chosen = mask.union([0])
    settings = Ablation("mean", means=_means(model)) if ablation == "mean" else Ablation()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    masked = MaskedModel(model, mask, "key", [0], settings)
    hooked = forward_logits(masked, ids)
    plain = masked.merge_and_unload()
    assert plain is model and count_hooks(model) == 0 and not masked.masked
    # zero: the same products; mean: weight x mean summed into the bias in another order (float rounding).
    torch.testing.assert_close(forward_logits(plain, ids), hooked, atol=1e-5, rtol=1e-5)
    projections = {f"{p.name}.weight": p for p in find_down_projections(model)}
    after = dict(model.named_parameters())
    for name, value in before.items():
        if name in projections:
            projection = projections[name]
            linear = projection.orientation == "linear"
            changed = _neuron_axis_changes(value, after[name].detach(), linear)
            assert changed and changed <= set(chosen[projection.layer])
            index = torch.tensor(chosen[projection.layer])
            assert torch.count_nonzero(after[name].detach().index_select(1 if linear else 0, index)) == 0
        elif (
            ablation == "mean"
            and name.endswith(".bias")
            and name.removesuffix(".bias") in {p.name for p in projections.values()}
        ):
            assert not torch.equal(value, after[name].detach())  # the means went into the bias
        else:
            assert torch.equal(value, after[name].detach()), f"{name} changed"
    with pytest.raises(ValueError, match="the mask was removed"):
        masked.merge_and_unload()


def test_merge_and_unload_refuses_a_lora_wrapped_down_projection() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["down_proj"]))
    masked = MaskedModel(model, make_mask(model, spread_networks(model)), "key", [0])
    with pytest.raises(UserError, match="merge the adapter first"):
        masked.merge_and_unload()
    assert masked.masked  # refused before anything changed: the mask stays on
    masked.remove_mask()
    assert count_hooks(model) == 0
