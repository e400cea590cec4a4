"""Tiny models built from configs (offline, fast) and forward passes over them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig

from shared.arch import find_down_projections
from shared.hooks import pre_hooks

HIDDEN = 64


N_LAYERS = 2


N_HEADS = 4


VOCAB = 128


MAX_POSITIONS = 64


# Generic (transformers' standard names) settings; gpt2 and opt use their own keys below.
_COMMON: dict[str, Any] = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=N_HEADS,
    vocab_size=VOCAB,
    max_position_embeddings=MAX_POSITIONS,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


_PER_TYPE: dict[str, dict[str, Any]] = {
    # n_inner=None: the MLP is 4 * n_embd = 256 wide.
    "gpt2": dict(
        n_embd=HIDDEN,
        n_layer=N_LAYERS,
        n_head=N_HEADS,
        n_inner=None,
        n_positions=MAX_POSITIONS,
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama": dict(_COMMON, intermediate_size=176, num_key_value_heads=2),
    "qwen2": dict(_COMMON, intermediate_size=160, num_key_value_heads=2),
    "gpt_neox": dict(_COMMON, intermediate_size=192),
    "opt": dict(_COMMON, ffn_dim=144, word_embed_proj_dim=HIDDEN),
    "phi": dict(_COMMON, intermediate_size=208),
    "gemma": dict(_COMMON, intermediate_size=224, head_dim=HIDDEN // N_HEADS, num_key_value_heads=1),
    "bert": dict(_COMMON, intermediate_size=240),
    "mistral": dict(_COMMON, intermediate_size=168, num_key_value_heads=2, head_dim=HIDDEN // N_HEADS),
}


MODEL_TYPES: tuple[str, ...] = tuple(_PER_TYPE)


# Qualified name of block {i}'s MLP down-projection in the model built by `tiny_model`.
EXPECTED_DOWN_PROJ: dict[str, str] = {
    "gpt2": "transformer.h.{i}.mlp.c_proj",
    "llama": "model.layers.{i}.mlp.down_proj",
    "qwen2": "model.layers.{i}.mlp.down_proj",
    "gpt_neox": "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
    "opt": "model.decoder.layers.{i}.fc2",
    "phi": "model.layers.{i}.mlp.fc2",
    "gemma": "model.layers.{i}.mlp.down_proj",
    "bert": "bert.encoder.layer.{i}.output.dense",
    "mistral": "model.layers.{i}.mlp.down_proj",
}


# An attention projection of each type (leaf name), e.g. for LoRA target_modules.
ATTENTION_PROJ: dict[str, str] = {
    "gpt2": "c_attn",
    "llama": "o_proj",
    "qwen2": "o_proj",
    "gpt_neox": "query_key_value",
    "opt": "out_proj",
    "phi": "dense",
    "gemma": "o_proj",
    "bert": "query",
    "mistral": "o_proj",
}


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config of `model_type` (2 layers, hidden 64, 4 heads, vocab 128, 64 positions)."""
    if model_type not in _PER_TYPE:
        raise KeyError(f"no tiny config for model_type {model_type!r}; known: {', '.join(MODEL_TYPES)}")
    kwargs = {**_PER_TYPE[model_type], **overrides}
    kwargs.setdefault("attn_implementation", "eager")
    return AutoConfig.for_model(model_type, **kwargs)


def intermediate_size(config: PretrainedConfig) -> int:
    """The MLP width of a config built by `tiny_config`."""
    if config.model_type == "gpt2":
        return config.n_inner or 4 * config.n_embd
    if config.model_type == "opt":
        return config.ffn_dim
    return config.intermediate_size


def tiny_model(model_type: str, **overrides: Any) -> nn.Module:
    """A randomly initialised (seed 0) tiny model in eval mode: a causal LM, or a masked LM for bert."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if model_type == "bert" else AutoModelForCausalLM
    return auto.from_config(config).eval()


# The Python file of a model that ships its own code; it writes the file $FN_TEST_MARKER names, where set.
_OWN_CODE = """
import os
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

if "FN_TEST_MARKER" in os.environ:
    Path(os.environ["FN_TEST_MARKER"]).write_text("the model's own code ran")


class CustomLlamaConfig(LlamaConfig):
    model_type = "custom-llama"


class CustomLlamaForCausalLM(LlamaForCausalLM):
    config_class = CustomLlamaConfig
"""


def model_with_its_own_code(tiny_lm_dir: Path, folder: Path) -> Path:
    """A copy of the tiny LLaMA whose classes live in the folder's own Python file (`auto_map`):
    transformers runs that code only with trust_remote_code."""
    shutil.copytree(tiny_lm_dir, folder)
    (folder / "custom_llama.py").write_text(_OWN_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="custom-llama",
        architectures=["CustomLlamaForCausalLM"],
        auto_map={
            "AutoConfig": "custom_llama.CustomLlamaConfig",
            "AutoModelForCausalLM": "custom_llama.CustomLlamaForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def random_ids(model: nn.Module) -> torch.Tensor:
    """Two seeded rows of 12 token ids (no special token) for `model`."""
    return torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@contextmanager
def perturbed_inputs(model: nn.Module, neurons: dict[int, list[int]]) -> Iterator[None]:
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
