"""Tiny, randomly initialised transformers models for tests (built offline from a config)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig

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


def tiny_model(model_type: str, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised (seed 0) tiny model in eval mode: a causal LM, or a masked LM for bert."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if model_type == "bert" else AutoModelForCausalLM
    return auto.from_config(config).eval()
