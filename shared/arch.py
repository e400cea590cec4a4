"""Find the MLP down-projection of every transformer block.

The unit of this project is an MLP intermediate neuron: one feature of the input of the
block's down-projection. A table keyed by `model_type` (like PEFT's feed-forward table)
is tried first; a structural rule (a Linear/Conv1D with in > out == hidden inside the
block's MLP submodule) second; otherwise an error lists what was tried. Wrappers that
PEFT (LoRA) and bitsandbytes put in place are seen through for the shapes, while the
module returned is the one *in* the model, so a hook on it also covers a LoRA branch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from shared.errors import UserError

# model_type -> path of the down-projection inside one block.
DOWN_PROJ_BY_MODEL_TYPE: dict[str, str] = {
    "gpt2": "mlp.c_proj",
    "gpt_bigcode": "mlp.c_proj",
    "starcoder2": "mlp.c_proj",
    "gptj": "mlp.fc_out",
    "codegen": "mlp.fc_out",
    "gpt_neox": "mlp.dense_4h_to_h",
    "falcon": "mlp.dense_4h_to_h",
    "bloom": "mlp.dense_4h_to_h",
    "opt": "fc2",
    "phi": "mlp.fc2",
    "llama": "mlp.down_proj",
    "mistral": "mlp.down_proj",
    "qwen2": "mlp.down_proj",
    "qwen3": "mlp.down_proj",
    "gemma": "mlp.down_proj",
    "gemma2": "mlp.down_proj",
    "gemma3_text": "mlp.down_proj",
    "phi3": "mlp.down_proj",
    "olmo": "mlp.down_proj",
    "olmo2": "mlp.down_proj",
    "stablelm": "mlp.down_proj",
    "granite": "mlp.down_proj",
    "bert": "output.dense",
    "roberta": "output.dense",
    "xlm-roberta": "output.dense",
    "electra": "output.dense",
}

# model_type -> paths inside one block of the layers that compute the neurons, where they are not the
# down-projection's siblings: the BERT family's `intermediate.dense` sits beside the block's `output`.
MLP_INPUTS_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    "bert": ("intermediate.dense",),
    "roberta": ("intermediate.dense",),
    "xlm-roberta": ("intermediate.dense",),
    "electra": ("intermediate.dense",),
}

# Names of a block's feed-forward submodule, used to check the structural fallback.
_MLP_NAMES = ("mlp", "ffn", "feed_forward", "feedforward", "fc2", "output")
_ATTENTION_NAMES = ("attn", "attention", "self_attn")
# Submodules inside PEFT wrappers: the wrapper itself is the candidate, not its parts.
_WRAPPER_PARTS = ("base_layer", "lora_A", "lora_B", "original_module", "modules_to_save")


@dataclass(frozen=True)
class DownProjection:
    """The down-projection of one block."""

    layer: int
    name: str  # qualified name inside the model as given (wrappers included)
    module: nn.Module  # the module in the model: hook this one
    in_features: int  # the MLP intermediate size: one feature per neuron
    out_features: int  # the hidden size
    orientation: str  # "linear" (weight out x in) or "conv1d" (GPT-2, weight in x out)


def base_layer(module: nn.Module) -> nn.Module:
    """The innermost layer under PEFT wrappers (`lora.Linear.base_layer`,
    `ModulesToSaveWrapper.original_module`, ...)."""
    while True:
        inner = getattr(module, "base_layer", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "original_module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def projection_shape(module: nn.Module) -> tuple[int, int, str] | None:
    """(in_features, out_features, orientation) of a linear-like layer, else None.

    bitsandbytes layers subclass nn.Linear and keep `in_features`/`out_features`
    while their weight is packed, so the attributes are read, not the weight shape.
    """
    layer = base_layer(module)
    if isinstance(layer, Conv1D):
        return int(layer.weight.shape[0]), int(layer.nf), "conv1d"
    if isinstance(layer, nn.Linear):
        return int(layer.in_features), int(layer.out_features), "linear"
    return None


def config_of(model: nn.Module):
    """The model's transformers config, through PEFT wrappers."""
    config = getattr(model, "config", None)
    if config is None:
        raise UserError(f"{type(model).__name__} has no `config`; pass a transformers model.")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def hidden_size(config) -> int | None:
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _by_table(model: nn.Module, suffix: str, n_layers: int) -> list[tuple[int, str, nn.Module]]:
    """Modules named `<blocks>.<i>.<suffix>`, grouped by the block list, the one with n_layers."""
    pattern = re.compile(rf"^(.*)\.(\d+)\.{re.escape(suffix)}$")
    groups: dict[str, list[tuple[int, str, nn.Module]]] = {}
    for name, module in model.named_modules():
        match = pattern.match(name)
        if match:
            groups.setdefault(match.group(1), []).append((int(match.group(2)), name, module))
    for found in groups.values():
        if len(found) == n_layers:
            return sorted(found, key=lambda item: item[0])
    return []


def _block_lists(model: nn.Module, n_layers: int) -> list[tuple[str, nn.ModuleList]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name
    ]


def _by_structure(model: nn.Module, n_layers: int, hidden: int) -> list[tuple[int, str, nn.Module]]:
    """The structural rule: in each block, the one projection with in > out == hidden that
    lies in the block's MLP submodule and not in its attention."""
    for list_name, blocks in _block_lists(model, n_layers):
        found = []
        for index, block in enumerate(blocks):
            candidates = []
            for sub_name, sub in block.named_modules():
                parts = sub_name.split(".")
                if any(p in _WRAPPER_PARTS for p in parts):
                    continue
                shape = projection_shape(sub)
                if shape is None or not (shape[0] > shape[1] == hidden):
                    continue
                if any(p in _ATTENTION_NAMES for p in parts):
                    continue
                if any(p in _MLP_NAMES for p in parts):
                    candidates.append((index, f"{list_name}.{index}.{sub_name}", sub))
            if len(candidates) != 1:
                break
            found.append(candidates[0])
        if len(found) == n_layers:
            return found
    return []


def find_down_projections(model: nn.Module) -> list[DownProjection]:
    """The down-projection of every block, in layer order.

    Raises UserError naming the table entry and the structural rule that were tried.
    """
    config = config_of(model)
    model_type = getattr(config, "model_type", "?")
    n_layers = num_layers(config)
    hidden = hidden_size(config)
    if n_layers is None or hidden is None:
        raise UserError(
            f"cannot read the layer count and hidden size of model_type {model_type!r} from its config; "
            "this architecture is not supported"
        )
    tried = []
    found: list[tuple[int, str, nn.Module]] = []
    suffix = DOWN_PROJ_BY_MODEL_TYPE.get(model_type)
    if suffix is not None:
        found = _by_table(model, suffix, n_layers)
        tried.append(f"table entry {model_type!r} -> '*.<layer>.{suffix}'")
    else:
        tried.append(f"table (no entry for model_type {model_type!r})")
    if not found:
        found = _by_structure(model, n_layers, hidden)
        tried.append(f"structural rule (one Linear/Conv1D with in > out == {hidden} in each block's MLP)")
    if not found:
        raise UserError(
            f"no MLP down-projection found in {n_layers} blocks of model_type {model_type!r}; tried: "
            + "; ".join(tried)
            + ". Add the model_type to shared/arch.py DOWN_PROJ_BY_MODEL_TYPE"
        )
    result = []
    for index, name, module in found:
        shape = projection_shape(module)
        if shape is None or shape[1] != hidden or shape[0] <= hidden:
            raise UserError(
                f"{name} of model_type {model_type!r} does not look like an MLP down-projection "
                f"(shape {shape}, hidden size {hidden}); fix the table entry in shared/arch.py"
            )
        result.append(DownProjection(index, name, module, shape[0], shape[1], shape[2]))
    return result


def mlp_input_projections(model: nn.Module, projection: DownProjection) -> list[nn.Module]:
    """The layers that compute the neurons read by `projection`: the table's layers of the block
    (MLP_INPUTS_BY_MODEL_TYPE, BERT's `intermediate.dense`), else its siblings in the block's
    MLP whose output is one feature per neuron (LLaMA `gate_proj` and `up_proj`, GPT-2 `c_fc`,
    GPT-NeoX `dense_h_to_4h`, OPT/Phi `fc1`), or two per neuron for a fused gate-and-up layer
    (Phi-3 `gate_up_proj`: neuron j at j and j + intermediate size). Wrappers are returned
    as they sit in the model."""
    model_type = getattr(config_of(model), "model_type", None)
    paths = MLP_INPUTS_BY_MODEL_TYPE.get(model_type or "", ())
    down = "." + DOWN_PROJ_BY_MODEL_TYPE.get(model_type or "", "")
    if paths and projection.name.endswith(down):
        block = projection.name.removesuffix(down)
        found = [model.get_submodule(f"{block}.{path}") for path in paths]
        for path, module in zip(paths, found, strict=True):
            shape = projection_shape(module)
            if shape is None or shape[1] != projection.in_features:
                raise UserError(
                    f"{block}.{path} of model_type {model_type!r} does not compute the {projection.in_features} "
                    f"neurons of {projection.name} (shape {shape}); fix MLP_INPUTS_BY_MODEL_TYPE in shared/arch.py"
                )
        return found
    parent_name = projection.name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    found = []
    for child in parent.children():
        if child is projection.module:
            continue
        shape = projection_shape(child)
        if shape is not None and shape[1] in (projection.in_features, 2 * projection.in_features):
            found.append(child)
    return found


def intermediate_size_of(projections: list[DownProjection]) -> int:
    """The common intermediate size; models with per-layer sizes are refused."""
    sizes = {p.in_features for p in projections}
    if len(sizes) != 1:
        raise UserError(f"MLP intermediate size differs across layers ({sorted(sizes)}); not supported")
    return sizes.pop()
