"""A mask file's selection as what the hooks apply: a 0/1 vector per layer of down-projection inputs.

The mask file (`shared.masks`) is data and imports no torch; these vectors are the tensors a
`shared.masked_model.MaskedModel` hooks on a model, baked into weights, or stacked by
`shared.hooks.stacked_down_projections` to score several masks in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.errors import UserError
from shared.masks import MASK_MODES, MaskFile, MaskMode, Network, union


@dataclass(frozen=True)
class LayerMasks:
    """Per-layer 0/1 vectors for the down-projection inputs, and what they imply.

    A 0 marks a neuron the mask intervenes on; how it does (`shared.ablation`): `zero`
    multiplies its input by 0, `mean` replaces it by `fills[layer][neuron]` (the neuron's
    mean activation), `scale` multiplies it by `scale_factor`.
    """

    vectors: dict[int, torch.Tensor]  # layer -> float 0/1 of length intermediate_size
    fully_closed_layers: tuple[int, ...]  # layers whose MLP is switched off entirely
    masked_neurons: int  # neurons set to zero over all layers
    ablation: str = "zero"  # zero | mean | scale (see shared.ablation)
    scale_factor: float | None = None  # with `scale`: what an intervened neuron's input is multiplied by
    fills: dict[int, torch.Tensor] = field(default_factory=dict)  # with `mean`: layer -> float32 means (0 where open)


def build_layer_masks(mask: MaskFile, networks: list[Network], mode: MaskMode) -> LayerMasks:
    """0/1 vectors: `key` zeroes the networks' neurons; `complement` zeroes all others.

    In `complement` mode a layer where no selected neuron lies gets an all-zero vector:
    that layer's MLP is switched off, and `fully_closed_layers` says so.
    Layers that a `key` mask leaves untouched get no vector (no hook needed).
    """
    if mode not in MASK_MODES:
        raise UserError(f"unknown mask mode {mode!r}; use key or complement")
    size = mask.model.intermediate_size
    selected = union(networks)
    vectors: dict[int, torch.Tensor] = {}
    if mode == "key":
        for layer, chosen in selected.items():
            vector = torch.ones(size)
            vector[list(chosen)] = 0.0
            vectors[layer] = vector
    else:
        for layer in range(mask.model.n_layers):
            vector = torch.zeros(size)
            if layer in selected:
                vector[list(selected[layer])] = 1.0
            vectors[layer] = vector
    closed = tuple(layer for layer, vector in sorted(vectors.items()) if not vector.any())
    masked = int(sum(int((vector == 0).sum()) for vector in vectors.values()))
    return LayerMasks(vectors, closed, masked)
