"""Targeted fine-tuning of chosen MLP neurons (`fn-train --mask-mode tune`): each chosen neuron's
own weights get a small trainable delta, and nothing else in the model can change.

A neuron's own weights are its rows of the MLP's input projections (LLaMA `gate_proj` and
`up_proj`, GPT-2 `c_fc`'s columns and bias entries, both halves of a fused gate-and-up layer)
and its column of the down-projection. The deltas are gathered: one (K, hidden) tensor per
projection of a layer with K chosen neurons (and K bias entries where the input projection has
a bias), added to the projections' outputs by forward hooks. So the base weights stay frozen and
untouched (bit-identical, whatever weight decay or clipping does), they may be 4-bit or 8-bit
(bitsandbytes layers are hooked like any other), and the trainable parameters and their optimizer
state grow with the neurons, not with the model, as LoRA's grow with its rank.

Every delta is stored as one row per neuron (K, hidden), whatever the layer's orientation:
- input projection: output[..., neuron] += x . delta[k] (+ bias delta[k]);
- down-projection: output += sum_k input[..., neuron_k] * delta[k].
`merge_into` writes them into the weights of a plain (unquantized) model of the same
architecture, which then computes the same function with no hook.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shared.arch import base_layer, find_down_projections, mlp_input_projections, projection_shape
from shared.errors import UserError
from shared.hooks import forward_hooks
from shared.masks import NeuronSet

DELTAS_ATTRIBUTE = "fn_neuron_deltas"  # the deltas' module on the model, so the optimizer and DDP see its parameters


def _key(layer: int, part: str) -> str:
    return f"layer{layer}_{part}"


class NeuronDeltas(nn.Module):
    """The trainable deltas of the chosen neurons of every layer (zero at the start, so the model
    starts as its base), and the hooks that add them."""

    def __init__(self, model: nn.Module, neurons: NeuronSet, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.neurons = {layer: tuple(ns) for layer, ns in sorted(neurons.items()) if ns}
        self.deltas = nn.ParameterDict()
        by_layer = {p.layer: p for p in find_down_projections(model)}
        self._targets: list[tuple[nn.Module, str, int, str]] = []  # (module in the model, key, layer, role)
        for layer, chosen in self.neurons.items():
            if layer not in by_layer:
                raise UserError(f"the tuned neurons name layer {layer}, which the model does not have")
            projection = by_layer[layer]
            hidden = projection.out_features
            device = _device_of(projection.module)
            self.deltas[_key(layer, "down")] = nn.Parameter(
                torch.zeros(len(chosen), hidden, dtype=dtype, device=device)
            )
            self._targets.append((projection.module, _key(layer, "down"), layer, "down"))
            for index, module in enumerate(mlp_input_projections(model, projection)):
                width = projection_shape(module)[1] // projection.in_features  # 2 for a fused gate-and-up layer
                key = _key(layer, f"in{index}")
                rows = width * len(chosen)
                self.deltas[key] = nn.Parameter(torch.zeros(rows, hidden, dtype=dtype, device=device))
                if base_layer(module).bias is not None:
                    self.deltas[key + "_bias"] = nn.Parameter(torch.zeros(rows, dtype=dtype, device=device))
                self._targets.append((module, key, layer, "in"))
        self._rows = {
            key: _rows(self.neurons[layer], role, projection_shape(module), by_layer[layer].in_features)
            for module, key, layer, role in self._targets
        }

    @property
    def n_neurons(self) -> int:
        return sum(len(ns) for ns in self.neurons.values())

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.deltas.values())

    def _hook(self, key: str, role: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            delta = self.deltas[key]
            rows = self._rows[key].to(output.device)
            x = args[0]
            if role == "down":
                # The chosen neurons' inputs times their rows of the delta, added to the whole output.
                return output + (x.index_select(-1, rows).to(delta.dtype) @ delta).to(output.dtype)
            bias = self.deltas[key + "_bias"] if key + "_bias" in self.deltas else None
            added = nn.functional.linear(x.to(delta.dtype), delta, bias).to(output.dtype)
            return output.index_add(-1, rows, added)

        return hook

    @contextmanager
    def applied(self) -> Iterator[NeuronDeltas]:
        """The deltas added to the model's outputs while the block runs (hooks removed after)."""
        with forward_hooks([(module, self._hook(key, role)) for module, key, _, role in self._targets]):
            yield self

    def merge_into(self, model: nn.Module) -> None:
        """Add the deltas to the weights of `model` (unquantized, the architecture they were made
        on): summed in float64, then cast, so every other entry is left exactly as it was."""
        by_layer = {p.layer: p for p in find_down_projections(model)}
        with torch.no_grad():
            for _, key, layer, role in self._targets:
                projection = by_layer[layer]
                modules = [projection.module] if role == "down" else mlp_input_projections(model, projection)
                module = base_layer(modules[0] if role == "down" else modules[int(key.rpartition("in")[2])])
                delta = self.deltas[key].detach().to(device=module.weight.device, dtype=torch.float64)
                rows = self._rows[key].to(module.weight.device)
                linear = isinstance(module, nn.Linear)
                # The neuron axis: Linear down-projection and Conv1D input: columns; the others: rows.
                neuron_dim = (1 if linear else 0) if role == "down" else (0 if linear else 1)
                oriented = delta.T if (role == "down") == linear else delta
                _add_along(module.weight, neuron_dim, rows, oriented)
                if role == "in" and key + "_bias" in self.deltas:
                    _add_along(module.bias, 0, rows, self.deltas[key + "_bias"].detach().double())

    def save(self, path: Path) -> None:
        """The deltas and the neurons they belong to, as one safetensors file."""
        tensors = {key: value.detach().contiguous().cpu() for key, value in self.deltas.items()}
        save_file(tensors, str(path), metadata={"neurons": json.dumps({str(k): v for k, v in self.neurons.items()})})

    def load(self, path: Path) -> None:
        """Copy the deltas of a file written by `save` for the same neurons into this module."""
        loaded = load_file(str(path))
        if set(loaded) != set(self.deltas) or any(loaded[k].shape != self.deltas[k].shape for k in loaded):
            raise UserError(f"{path} holds deltas of other neurons than this run's; tune with the same mask flags")
        with torch.no_grad():
            for key, value in loaded.items():
                self.deltas[key].copy_(value)


def _device_of(module: nn.Module) -> torch.device:
    return next(base_layer(module).parameters()).device


def _rows(neurons: tuple[int, ...], role: str, shape, intermediate: int) -> torch.Tensor:
    """The entries of a projection's output (input projection) or input (down) that are the neurons'."""
    index = torch.tensor(neurons, dtype=torch.long)
    if role == "in" and shape[1] == 2 * intermediate:
        return torch.cat([index, index + intermediate])
    return index


def _add_along(parameter: torch.Tensor, dim: int, index: torch.Tensor, values: torch.Tensor) -> None:
    current = parameter.index_select(dim, index).double()
    parameter.index_copy_(dim, index, (current + values).to(parameter.dtype))


def attach_neuron_deltas(model: nn.Module, neurons: NeuronSet, dtype: torch.dtype = torch.float32) -> NeuronDeltas:
    """Freeze every parameter of `model` and give it trainable deltas for `neurons` (the model's
    `fn_neuron_deltas` submodule: the optimizer, checkpoints and DDP see them as the model's)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    deltas = NeuronDeltas(model, neurons, dtype)
    model.add_module(DELTAS_ATTRIBUTE, deltas)
    return deltas


def deltas_of(model: nn.Module) -> NeuronDeltas:
    """The deltas `attach_neuron_deltas` gave `model` (through DDP and PEFT-style wrappers)."""
    for module in model.modules():
        found = getattr(module, DELTAS_ATTRIBUTE, None)
        if isinstance(found, NeuronDeltas):
            return found
    raise ValueError("the model has no neuron deltas; attach them with attach_neuron_deltas")


def model_parameter_count(model: nn.Module) -> int:
    """The base model's parameters, the deltas left out; a 4-bit weight counts its unpacked size."""
    total = 0
    for name, parameter in model.named_parameters():
        if DELTAS_ATTRIBUTE in name:
            continue
        state = getattr(parameter, "quant_state", None)
        total += state.shape.numel() if state is not None else parameter.numel()
    return total


def neurons_from_record(record: dict, where: str) -> NeuronSet:
    """The tuned neurons a run's `fn_mask.json` lists (`tuned_neurons`: layer -> indices)."""
    listed = record.get("tuned_neurons")
    if not isinstance(listed, dict):
        raise UserError(f"{where} lists no tuned_neurons; it is not the record of a --mask-mode tune run")
    return {int(layer): tuple(neurons) for layer, neurons in listed.items()}
