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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from shared.arch import base_layer, find_down_projections, mlp_input_projections, projection_shape
from shared.errors import UserError
from shared.hooks import forward_hooks
from shared.masks import NeuronSet

DELTAS_ATTRIBUTE = "fn_neuron_deltas"  # the deltas' module on the model, so the optimizer and DDP see its parameters


@dataclass(frozen=True)
class _Target:
    """One projection the deltas of a layer's neurons are added to."""

    module: nn.Module  # as it sits in the model (wrappers included): the hook goes on it
    key: str  # its delta's name in `NeuronDeltas.deltas` (`<key>_bias`: its bias entries, if any)
    layer: int
    role: str  # "down" (the neurons are its input features) or "in" (its output features)
    index: int  # "in": which of the layer's input projections (`mlp_input_projections` order)
    rows: torch.Tensor  # the neurons' entries of its output ("in") or input ("down")


class NeuronDeltas(nn.Module):
    """The trainable deltas of the chosen neurons of every layer (zero at the start, so the model
    starts as its base), and the hooks that add them."""

    def __init__(self, model: nn.Module, neurons: NeuronSet, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.neurons = {layer: tuple(ns) for layer, ns in sorted(neurons.items()) if ns}
        self.deltas = nn.ParameterDict()
        by_layer = {p.layer: p for p in find_down_projections(model)}
        self._targets: list[_Target] = []
        for layer, chosen in self.neurons.items():
            if layer not in by_layer:
                raise UserError(f"the tuned neurons name layer {layer}, which the model does not have")
            projection = by_layer[layer]
            index = torch.tensor(chosen, dtype=torch.long)
            device, hidden = _device_of(projection.module), projection.out_features
            self._add(_Target(projection.module, f"layer{layer}_down", layer, "down", 0, index), hidden, dtype, device)
            for position, module in enumerate(mlp_input_projections(model, projection)):
                fused = projection_shape(module)[1] == 2 * projection.in_features  # neuron j at j and j + size
                rows = torch.cat([index, index + projection.in_features]) if fused else index
                target = _Target(module, f"layer{layer}_in{position}", layer, "in", position, rows)
                self._add(target, hidden, dtype, device, with_bias=base_layer(module).bias is not None)

    def _add(
        self, target: _Target, hidden: int, dtype: torch.dtype, device: torch.device, with_bias: bool = False
    ) -> None:
        """One (neurons x hidden) delta, zero, for `target` (and its bias entries' when it has a bias)."""
        self._targets.append(target)
        self.deltas[target.key] = nn.Parameter(torch.zeros(len(target.rows), hidden, dtype=dtype, device=device))
        if with_bias:
            self.deltas[target.key + "_bias"] = nn.Parameter(torch.zeros(len(target.rows), dtype=dtype, device=device))

    @property
    def n_neurons(self) -> int:
        return sum(len(ns) for ns in self.neurons.values())

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.deltas.values())

    def _bias(self, target: _Target) -> nn.Parameter | None:
        return self.deltas[target.key + "_bias"] if target.key + "_bias" in self.deltas else None

    def _hook(self, target: _Target):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            delta = self.deltas[target.key]
            rows = target.rows.to(output.device)
            x = args[0]
            if target.role == "down":
                # The chosen neurons' inputs times their rows of the delta, added to the whole output.
                return output + (x.index_select(-1, rows).to(delta.dtype) @ delta).to(output.dtype)
            added = nn.functional.linear(x.to(delta.dtype), delta, self._bias(target)).to(output.dtype)
            return output.index_add(-1, rows, added)

        return hook

    @contextmanager
    def applied(self) -> Iterator[NeuronDeltas]:
        """The deltas added to the model's outputs while the block runs (hooks removed after)."""
        with forward_hooks([(target.module, self._hook(target)) for target in self._targets]):
            yield self

    def merge_into(self, model: nn.Module) -> None:
        """Add the deltas to the weights of `model` (unquantized, the architecture they were made
        on): summed in float64, then cast, so every other entry is left exactly as it was."""
        by_layer = {p.layer: p for p in find_down_projections(model)}
        with torch.no_grad():
            for target in self._targets:
                projection = by_layer[target.layer]
                down = target.role == "down"
                module = base_layer(
                    projection.module if down else mlp_input_projections(model, projection)[target.index]
                )
                delta = self.deltas[target.key].detach().to(device=module.weight.device, dtype=torch.float64)
                rows = target.rows.to(module.weight.device)
                linear = isinstance(module, nn.Linear)  # weight (out, in); GPT-2's Conv1D holds (in, out)
                # The neuron axis: columns of a Linear down-projection and of a Conv1D input projection, else rows.
                neuron_dim = (1 if linear else 0) if down else (0 if linear else 1)
                _add_along(module.weight, neuron_dim, rows, delta.T if down == linear else delta)
                bias = None if down else self._bias(target)
                if bias is not None:
                    _add_along(module.bias, 0, rows, bias.detach().double().to(module.bias.device))

    def save(self, path: Path) -> None:
        """The deltas and the neurons they belong to, as one safetensors file."""
        tensors = {key: value.detach().contiguous().cpu() for key, value in self.deltas.items()}
        save_file(tensors, str(path), metadata={"neurons": json.dumps({str(k): v for k, v in self.neurons.items()})})

    def load(self, path: Path) -> None:
        """Copy the deltas of a file written by `save` for the same neurons into this module."""
        with safe_open(str(path), "pt") as handle:
            neurons = json.loads((handle.metadata() or {}).get("neurons", "{}"))
        loaded = load_file(str(path))
        same = {int(layer): tuple(ns) for layer, ns in neurons.items()} == self.neurons
        if not same or set(loaded) != set(self.deltas) or any(loaded[k].shape != self.deltas[k].shape for k in loaded):
            raise UserError(f"{path} holds deltas of other neurons than this run's; tune with the same mask flags")
        with torch.no_grad():
            for key, value in loaded.items():
                self.deltas[key].copy_(value)


def _device_of(module: nn.Module) -> torch.device:
    return next(base_layer(module).parameters()).device


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
