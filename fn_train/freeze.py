"""Keep every masked neuron's parameters bit-identical through training.

The mask hook zeroes a masked neuron's input to the down-projection, so every gradient
that reaches its parameters is exactly zero, and gradient clipping (a rescaling) keeps it
zero; Adam then leaves them where they are. Decoupled weight decay does not: AdamW
multiplies every weight by (1 - lr * weight_decay) at each step, gradient or not. A weight
matrix holds masked and open neurons together, so the masked slices cannot be taken out
of the decay group; instead they are copied back from a snapshot after every optimizer
step (one `index_copy_` per trainable tensor of a masked layer).

A neuron's parameters, in every trainable tensor of its layer's MLP projections, lie
along the axis whose length is the intermediate size: rows of up/gate (`Linear`) and of
LoRA's B on them, columns of the down-projection and of LoRA's A on it, rows of GPT-2's
`Conv1D` down-projection and columns of its `c_fc`, entries of an up-projection's bias.
Tensors without such an axis (LoRA A on up/gate, B on down, the down bias) are shared by
all neurons and keep training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import TrainerCallback

from shared.arch import DownProjection, mlp_input_projections
from shared.layer_masks import LayerMasks


@dataclass
class FrozenSlice:
    """The masked neurons' entries of one parameter: `parameter.index_select(dim, index)`."""

    parameter: nn.Parameter
    dim: int
    index: torch.Tensor


def _neuron_axis(parameter: nn.Parameter, size: int, neurons: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """(axis, indices) of the given neurons in `parameter`, or None when it has no neuron axis."""
    for dim, length in enumerate(parameter.shape):
        if length == size:
            return dim, neurons
        if length == 2 * size:  # fused gate-and-up: neuron j at j and j + size
            return dim, torch.cat([neurons, neurons + size])
    return None


def masked_neuron_slices(
    model: nn.Module, projections: list[DownProjection], layer_masks: LayerMasks
) -> list[FrozenSlice]:
    """The trainable entries of every masked neuron (see the module docstring)."""
    by_layer = {p.layer: p for p in projections}
    slices = []
    for layer, vector in layer_masks.vectors.items():
        neurons = (vector == 0).nonzero().flatten()
        if len(neurons) == 0:
            continue
        projection = by_layer[layer]
        for module in (projection.module, *mlp_input_projections(model, projection)):
            for parameter in module.parameters():
                found = _neuron_axis(parameter, projection.in_features, neurons) if parameter.requires_grad else None
                if found is not None:
                    dim, index = found
                    slices.append(FrozenSlice(parameter, dim, index.to(parameter.device)))
    return slices


class KeepMaskedNeuronsFrozen(TrainerCallback):
    """Snapshot the masked slices when training begins (after a checkpoint is loaded) and
    write them back after every optimizer step."""

    def __init__(self, slices: list[FrozenSlice]) -> None:
        self.slices = slices
        self.saved: list[torch.Tensor] = []

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.saved = [s.parameter.detach().index_select(s.dim, s.index).clone() for s in self.slices]

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        with torch.no_grad():
            for frozen, saved in zip(self.slices, self.saved, strict=True):
                frozen.parameter.index_copy_(frozen.dim, frozen.index, saved)
