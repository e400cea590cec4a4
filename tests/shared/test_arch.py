"""shared.arch.find_down_projections on tiny models of each supported family, wrapped or not."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import warnings

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

import shared.arch as arch
from shared.arch import DownProjection, base_layer, find_down_projections
from shared.errors import UserError
from tests.helpers.tiny_models import ATTENTION_PROJ, EXPECTED_DOWN_PROJ, MODEL_TYPES, intermediate_size, tiny_model

N_LAYERS = 2


def _expected_names(model_type: str) -> list[str]:
    return [EXPECTED_DOWN_PROJ[model_type].format(i=i) for i in range(N_LAYERS)]


def _assert_not_attention(projections: list[DownProjection]) -> None:
    for p in projections:
        lowered = p.name.lower()
        assert "attn" not in lowered and "attention" not in lowered, p.name


def test_tiny_models_cover_every_type() -> None:
    assert set(MODEL_TYPES) == set(EXPECTED_DOWN_PROJ) == set(ATTENTION_PROJ)
    assert set(MODEL_TYPES) <= set(arch.DOWN_PROJ_BY_MODEL_TYPE)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_finds_down_projection_of_every_block(model_type: str) -> None:
    model = tiny_model(model_type)
    config = model.config
    assert config.model_type == model_type and config.num_hidden_layers == N_LAYERS
    projections = find_down_projections(model)

    assert [p.layer for p in projections] == list(range(N_LAYERS))
    assert [p.name for p in projections] == _expected_names(model_type)
    modules = dict(model.named_modules())
    for p in projections:
        assert p.module is modules[p.name]
        assert p.in_features == intermediate_size(config)
        assert p.in_features > config.hidden_size
        assert p.out_features == config.hidden_size
        assert p.orientation == ("conv1d" if model_type == "gpt2" else "linear")
    _assert_not_attention(projections)
    assert arch.intermediate_size_of(projections) == intermediate_size(config)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sees_through_lora_wrappers(model_type: str) -> None:
    from peft import LoraConfig, get_peft_model

    model = tiny_model(model_type)
    config = model.config
    leaf = EXPECTED_DOWN_PROJ[model_type].rsplit(".", 1)[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpt2: fan_in_fan_out notice for Conv1D
        peft_model = get_peft_model(model, LoraConfig(target_modules=[leaf, ATTENTION_PROJ[model_type]], r=4))
    projections = find_down_projections(peft_model)

    assert len(projections) == N_LAYERS
    assert [p.layer for p in projections] == list(range(N_LAYERS))
    modules = dict(peft_model.named_modules())
    for p, expected in zip(projections, _expected_names(model_type), strict=True):
        assert p.name.endswith("." + expected), (p.name, expected)
        assert p.module is modules[p.name]
        assert hasattr(p.module, "base_layer") and hasattr(p.module, "lora_A")
        assert base_layer(p.module) is p.module.base_layer
        assert p.in_features == intermediate_size(config)
        assert p.out_features == config.hidden_size
        assert p.orientation == ("conv1d" if model_type == "gpt2" else "linear")
    _assert_not_attention(projections)


@pytest.mark.parametrize("wrap_lora", [False, True], ids=["plain", "lora"])
def test_structural_fallback_finds_mlp_down_proj(monkeypatch: pytest.MonkeyPatch, wrap_lora: bool) -> None:
    model = tiny_model("llama")
    if wrap_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(target_modules=["down_proj", "o_proj"], r=4))
    monkeypatch.delitem(arch.DOWN_PROJ_BY_MODEL_TYPE, "llama")
    projections = find_down_projections(model)

    assert len(projections) == N_LAYERS
    for p, expected in zip(projections, _expected_names("llama"), strict=True):
        assert p.name == expected or p.name.endswith("." + expected), (p.name, expected)
        assert "o_proj" not in p.name
        assert (p.in_features, p.out_features, p.orientation) == (176, 64, "linear")
    _assert_not_attention(projections)


def test_structural_fallback_without_table_for_other_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule also holds for layouts without an `mlp` submodule name of the llama kind."""
    for model_type in ("gpt2", "opt", "bert", "gpt_neox", "phi"):
        model = tiny_model(model_type)
        monkeypatch.delitem(arch.DOWN_PROJ_BY_MODEL_TYPE, model_type)
        projections = find_down_projections(model)
        assert [p.name for p in projections] == _expected_names(model_type), model_type
        _assert_not_attention(projections)


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_quantized_llama(tmp_path, bits: int) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama").save_pretrained(tmp_path)
    if bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    import bitsandbytes as bnb

    expected_class = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    projections = find_down_projections(model)
    assert [p.name for p in projections] == _expected_names("llama")
    for p in projections:
        assert isinstance(p.module, expected_class)
        assert (p.in_features, p.out_features, p.orientation) == (176, 64, "linear")
    if bits == 4:  # the packed weight's shape says nothing about the layer's features
        assert tuple(projections[0].module.weight.shape) != (64, 176)


class _MysteryConfig(PretrainedConfig):
    model_type = "mystery"


class _MysteryBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mixer = nn.Linear(hidden, 4 * hidden)
        self.proj = nn.Linear(4 * hidden, hidden)  # in > out == hidden, but in no MLP-named submodule


class _MysteryModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = _MysteryConfig(num_hidden_layers=2, hidden_size=16)
        self.blocks = nn.ModuleList([_MysteryBlock(16) for _ in range(2)])


def test_unknown_architecture_is_a_user_error() -> None:
    model = _MysteryModel()
    assert model.config.model_type == "mystery"
    with pytest.raises(UserError, match=r"(?s)'mystery'.*table.*structural rule") as info:
        find_down_projections(model)
    message = str(info.value)
    assert "no entry for model_type 'mystery'" in message
    assert "DOWN_PROJ_BY_MODEL_TYPE" in message


def test_model_without_config_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no `config`"):
        find_down_projections(nn.Sequential(nn.Linear(4, 4)))


def test_sees_through_modules_to_save_wrapper() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model("llama"), LoraConfig(target_modules=["o_proj"], modules_to_save=["down_proj"], r=4)
    )
    projections = find_down_projections(model)
    assert [p.name.rsplit(".", 3)[-3:] for p in projections] == [["0", "mlp", "down_proj"], ["1", "mlp", "down_proj"]]
    assert all(hasattr(p.module, "original_module") for p in projections)
    assert all(p.in_features == 176 and p.out_features == 64 for p in projections)
