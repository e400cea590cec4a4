"""Keep LoRA from moving a masked neuron's down-projection column.

The mask hook zeroes a masked neuron's input, so every gradient that reaches its
parameters is zero and the optimizer leaves them alone (weight decay aside). One LoRA
parameter is different: the down-projection's update is B @ A, and column j of it is
B @ A[:, j]. A[:, j] starts random and never moves, but B trains, so the merged
weight's column j would drift and the neuron would come back changed once the mask is
lifted (after `merge_and_unload`, say). Zeroing A[:, j] of every masked neuron before
training keeps that column of the update at exactly zero. (Up/gate rows need nothing:
LoRA's B starts at zero and row j of it gets no gradient.)
"""

from __future__ import annotations

import torch

from shared.arch import DownProjection
from shared.layer_masks import LayerMasks


def zero_lora_columns_of_masked_neurons(projections: list[DownProjection], layer_masks: LayerMasks) -> int:
    """Zero the masked neurons' columns of every LoRA A matrix on the down-projections;
    returns how many LoRA A matrices were touched."""
    by_layer = {p.layer: p for p in projections}
    touched = 0
    with torch.no_grad():
        for layer, vector in layer_masks.vectors.items():
            lora_a = getattr(by_layer[layer].module, "lora_A", None)
            if lora_a is None:
                continue
            for adapter in lora_a.values():
                keep = vector.to(device=adapter.weight.device, dtype=adapter.weight.dtype)
                adapter.weight.mul_(keep)  # weight is (r, in): scale each input column
                touched += 1
    return touched
