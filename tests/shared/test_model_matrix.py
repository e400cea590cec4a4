"""One set of checks over a tiny model of every model type shared/arch.py names (as PEFT's
testing_common runs its checks over every model x config pair): the hook sits on the table's
module, key and complement, zero / mean / scale against the same change written into the
weights, masked parameters bit-identical after a training step, and tune's deltas where the
type's MLP input projections are found (every type). docs/commands.md lists what each type is tested for."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from fn_train.freeze import KeepMaskedNeuronsFrozen, masked_neuron_slices
from shared.ablation import Ablation, NeuronMeans
from shared.arch import DOWN_PROJ_BY_MODEL_TYPE, base_layer, find_down_projections, mlp_input_projections
from shared.hooks import count_hooks
from shared.layer_masks import build_layer_masks
from shared.masked_model import MaskedModel
from shared.neuron_deltas import attach_neuron_deltas
from tests.helpers.masks import make_mask
from tests.helpers.tiny_models import HIDDEN, MODEL_TYPES, tiny_config

pytestmark = pytest.mark.slow

_GENERIC = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=128,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    intermediate_size=160,
)
_GPT_STYLE = dict(n_embd=HIDDEN, n_layer=2, n_head=4, n_inner=None, n_positions=64, vocab_size=128)
# Tiny configs of the types tests/helpers/tiny_models.py has none for (it holds the first nine).
_MORE: dict[str, dict] = {
    "gpt_bigcode": dict(_GPT_STYLE, bos_token_id=1, eos_token_id=2),
    "starcoder2": dict(_GENERIC, num_key_value_heads=2),
    "gptj": dict(_GPT_STYLE, rotary_dim=8, bos_token_id=1, eos_token_id=2),
    "codegen": dict(_GPT_STYLE, n_ctx=64, rotary_dim=8, bos_token_id=1, eos_token_id=2),
    "falcon": dict(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, ffn_hidden_size=4 * HIDDEN
    ),
    "bloom": dict(hidden_size=HIDDEN, n_layer=2, n_head=4, vocab_size=128),
    "qwen3": dict(_GENERIC, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(_GENERIC, num_key_value_heads=2, head_dim=16),
    "gemma3_text": dict(_GENERIC, num_key_value_heads=2, head_dim=16),
    "phi3": dict(_GENERIC, num_key_value_heads=2),
    "olmo": dict(_GENERIC, num_key_value_heads=2),
    "olmo2": dict(_GENERIC, num_key_value_heads=2),
    "stablelm": dict(_GENERIC, num_key_value_heads=2),
    "granite": dict(_GENERIC, num_key_value_heads=2),
    "roberta": dict(_GENERIC, max_position_embeddings=80),
    "xlm-roberta": dict(_GENERIC, max_position_embeddings=80),
    "electra": dict(_GENERIC, embedding_size=HIDDEN),
}
MASKED_LM = ("bert", "roberta", "xlm-roberta", "electra")
ALL_TYPES = tuple(DOWN_PROJ_BY_MODEL_TYPE)


def test_every_listed_type_has_a_tiny_config() -> None:
    assert set(ALL_TYPES) == set(MODEL_TYPES) | set(_MORE)


def _model(model_type: str) -> nn.Module:
    if model_type in MODEL_TYPES:
        config = tiny_config(model_type)
    else:
        config = AutoConfig.for_model(model_type, attn_implementation="eager", **_MORE[model_type])
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if model_type in MASKED_LM else AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_config(config).eval()


def _ids(model: nn.Module) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _network(width: int) -> dict[int, dict[int, list[int]]]:
    """Network 0: a few neurons of each layer; network 1: more of layer 1."""
    return {0: {0: [1, 5, width - 1], 1: [2, 3]}, 1: {1: list(range(10, 30))}}


def _written_into_weights(model: nn.Module, neurons: dict[int, list[int]], ablation: str, fill=None, factor=2.0):
    """A copy of `model` whose down-projection weights hold the ablation of `neurons`: their columns
    zeroed (zero, mean) or multiplied (scale); for mean, weight x mean added to the output by a hook."""
    copied = copy.deepcopy(model)
    for projection in find_down_projections(copied):
        chosen = neurons.get(projection.layer)
        if not chosen:
            continue
        weight = base_layer(projection.module).weight
        linear = projection.orientation == "linear"
        index = torch.tensor(chosen)
        with torch.no_grad():
            columns = weight.index_select(1 if linear else 0, index).clone()
            multiplier = factor if ablation == "scale" else 0.0
            if linear:
                weight[:, index] *= multiplier
            else:
                weight[index, :] *= multiplier
        if ablation == "mean":
            values = torch.as_tensor(fill[projection.layer][chosen], dtype=torch.float32)
            shift = columns @ values if linear else values @ columns

            def add(module, args, output, shift=shift):
                return output + shift

            projection.module.register_forward_hook(add)
    return copied


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_masks_act_on_the_down_projection_as_written_weights_do(model_type: str) -> None:
    model = _model(model_type)
    projections = find_down_projections(model)
    suffix = DOWN_PROJ_BY_MODEL_TYPE[model_type]
    assert [p.name.endswith("." + suffix) for p in projections] == [True, True]
    width = projections[0].in_features
    mask = make_mask(model, _network(width))
    ids = _ids(model)
    plain = _logits(model, ids)
    off = {0: [1, 5, width - 1], 1: [2, 3]}
    means = np.random.default_rng(0).normal(0.0, 1.0, (2, width)).astype(np.float32)
    ablations = (Ablation(), Ablation("mean", means=NeuronMeans(means, "test", 1)), Ablation("scale", 2.0))
    for ablation in ablations:
        with MaskedModel(model, mask, "key", [0], ablation):
            assert count_hooks(model) == 2
            hooked = _logits(model, ids)
        assert count_hooks(model) == 0
        written = _written_into_weights(model, off, ablation.mode, fill=means, factor=2.0)
        torch.testing.assert_close(hooked, _logits(written, ids), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(hooked, plain, atol=1e-6), ablation.mode
    # complement of network 1 is key of every other neuron (layer 0 wholly off)
    everything_else = {0: list(range(width)), 1: [n for n in range(width) if n not in range(10, 30)]}
    with MaskedModel(model, mask, "complement", [1]):
        kept = _logits(model, ids)
    torch.testing.assert_close(kept, _logits(_written_into_weights(model, everything_else, "zero"), ids))


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_masked_neurons_parameters_stay_bit_identical_through_a_training_step(model_type: str) -> None:
    model = _model(model_type).train()
    projections = find_down_projections(model)
    width = projections[0].in_features
    mask = make_mask(model, _network(width))
    layer_masks = build_layer_masks(mask, [mask.networks[0]], "key")
    slices = masked_neuron_slices(model, projections, layer_masks)
    inputs = [mlp_input_projections(model, p) for p in projections]
    assert all(len(found) >= 1 for found in inputs)
    if model_type in MASKED_LM:  # the block's `intermediate.dense`, not a sibling of `output.dense`
        assert [[name for name, m in model.named_modules() if m is found[0]] for found in inputs] == [
            [f"{p.name.removesuffix('output.dense')}intermediate.dense"] for p in projections
        ]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    keeper = KeepMaskedNeuronsFrozen(slices)
    keeper.on_train_begin(None, None, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with MaskedModel(model, mask, "key", [0]):
        model(input_ids=_ids(model)).logits.float().pow(2).mean().backward()
    optimizer.step()
    keeper.on_optimizer_step(None, None, None)
    names = {id(p): name for name, p in model.named_parameters()}
    for frozen in slices:
        name = names[id(frozen.parameter)]
        now = frozen.parameter.detach().index_select(frozen.dim, frozen.index)
        assert torch.equal(now, before[name].index_select(frozen.dim, frozen.index)), name
        assert not torch.equal(frozen.parameter.detach(), before[name]), f"{name}: open neurons did not move"
    frozen_weights = {id(s.parameter) for s in slices}
    down_weights = {id(base_layer(p.module).weight) for p in projections}
    assert down_weights <= frozen_weights  # every down-projection's masked columns
    input_weights = {id(base_layer(module).weight) for found in inputs for module in found}
    assert input_weights <= frozen_weights  # and the rows of every layer that computes the neurons


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_tune_deltas_start_at_the_base_and_merge_into_the_weights(model_type: str) -> None:
    model = _model(model_type)
    ids = _ids(model)
    plain = _logits(model, ids)
    deltas = attach_neuron_deltas(model, {0: (1, 5), 1: (2,)})
    with deltas.applied():
        torch.testing.assert_close(_logits(model, ids), plain, atol=0, rtol=0)  # zero deltas: the base
        with torch.no_grad():
            for value in deltas.deltas.values():
                value.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
        hooked = _logits(model, ids)
    assert count_hooks(model) == 0
    merged = copy.deepcopy(model)
    deltas.merge_into(merged)
    torch.testing.assert_close(_logits(merged, ids), hooked, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(hooked, plain, atol=1e-6)
