"""How a mask intervenes on the neurons it selects (`key`: the networks' neurons;
`complement`: every other neuron).

- `zero` (the default): the neuron's down-projection input is multiplied by 0.
- `mean`: the input is replaced by the neuron's mean activation over recorded tokens (the
  field's standard control: zeroing a "massive activation" neuron throws the model off its
  distribution, a constant at its mean does not). Baked into saved weights, the masked
  columns of the down-projection become part of its bias (as FLAP-style pruning does).
- `scale`: the input is multiplied by a factor (2.0 amplifies, as Liu et al. do; 0.5 damps).

The means come from an activations folder or a forward pass over data (`fn_analyze.neurons.magnitude`)
and travel with a training run's `fn_mask.json` (the masked neurons' values only), so
inference reproduces them bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from shared.ablation_modes import ABLATIONS, check_ablation
from shared.errors import ParameterError, UserError
from shared.layer_masks import LayerMasks


@dataclass(frozen=True)
class NeuronMeans:
    """Mean down-projection input of every neuron over some tokens."""

    values: np.ndarray  # (n_layers, intermediate_size) float32; NaN for layers not measured
    source: str  # where it was measured, for the report and fn_mask.json
    n_tokens: int


@dataclass(frozen=True)
class Ablation:
    """What happens to the neurons a mask selects; `apply` turns 0/1 layer masks into it."""

    mode: str = "zero"
    scale_factor: float | None = None
    means: NeuronMeans | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_factor", check_ablation(self.mode, self.scale_factor))
        if self.mode == "mean" and self.means is None:
            raise ParameterError(
                "{ablation} mean needs the neurons' mean activations; give an activations folder "
                "(fn_analyze.neurons.magnitude.stats_from_activations) or measure them on data"
            )

    def describe(self) -> str:
        if self.mode == "scale":
            return f"scaled by {self.scale_factor:g}"
        if self.mode == "mean":
            assert self.means is not None
            return f"set to their mean (from {self.means.source})"
        return "set to zero"

    def apply(self, layer_masks: LayerMasks) -> LayerMasks:
        """The same masks, intervening by this ablation; `mean` checks that every intervened
        neuron has a measured mean."""
        if self.mode == "zero":
            return replace(layer_masks, ablation="zero", scale_factor=None, fills={})
        if self.mode == "scale":
            return replace(layer_masks, ablation="scale", scale_factor=self.scale_factor, fills={})
        assert self.means is not None
        values = self.means.values
        fills: dict[int, torch.Tensor] = {}
        for layer, vector in sorted(layer_masks.vectors.items()):
            if values.ndim != 2 or layer >= values.shape[0] or values.shape[1] != vector.numel():
                raise UserError(
                    f"the mean activations ({self.means.source}) have shape {tuple(values.shape)}, which does not "
                    f"cover layer {layer} of {vector.numel()} neurons; measure them on the mask's model"
                )
            off = (vector == 0).numpy()
            row = np.asarray(values[layer], dtype=np.float32)
            if np.isnan(row[off]).any():
                raise UserError(
                    f"the mean activations ({self.means.source}) lack layer {layer}, where the mask intervenes; "
                    "record every layer, or measure the means on data"
                )
            fill = np.where(off, row, np.float32(0.0)).astype(np.float32)
            fills[layer] = torch.from_numpy(fill)
        return replace(layer_masks, ablation="mean", scale_factor=None, fills=fills)


def ablation_record(layer_masks: LayerMasks, means_source: str | None = None) -> dict[str, Any]:
    """What `fn_mask.json` keeps of the ablation: the mode, the factor, and for `mean` the
    value of every intervened neuron (layer -> values in neuron order; float32, exact in JSON)."""
    record: dict[str, Any] = {"ablation": layer_masks.ablation}
    if layer_masks.ablation == "scale":
        record["scale_factor"] = layer_masks.scale_factor
    if layer_masks.ablation == "mean":
        record["means"] = {
            str(layer): [float(v) for v in fill[layer_masks.vectors[layer] == 0].tolist()]
            for layer, fill in sorted(layer_masks.fills.items())
        }
        record["means_source"] = means_source
    return record


def ablation_from_record(record: dict[str, Any], layer_masks: LayerMasks, where: str) -> Ablation:
    """The Ablation a saved record describes (a record without `ablation` is `zero`)."""
    mode = record.get("ablation", "zero")
    if mode not in ABLATIONS:
        raise UserError(f"{where}: unknown ablation {mode!r}; use zero, mean or scale")
    if mode == "scale":
        return Ablation("scale", record.get("scale_factor"))
    if mode == "zero":
        return Ablation()
    stored = record.get("means")
    if not isinstance(stored, dict):
        raise UserError(f"{where}: ablation mean without 'means'; the file is damaged, train again")
    first = next(iter(layer_masks.vectors.values()))
    n_layers = max(layer_masks.vectors) + 1
    values = np.full((n_layers, first.numel()), np.nan, dtype=np.float32)
    for layer, vector in layer_masks.vectors.items():
        off = (vector == 0).numpy()
        given = stored.get(str(layer), [])
        if len(given) != int(off.sum()):
            raise UserError(
                f"{where}: 'means' of layer {layer} hold {len(given)} values for {int(off.sum())} masked neurons; "
                "the file is damaged, train again"
            )
        values[layer, off] = np.asarray(given, dtype=np.float32)
    source = str(record.get("means_source") or where)
    return Ablation("mean", means=NeuronMeans(values, source, 0))


def ablation_digest_payload(layer_masks: LayerMasks) -> dict[str, Any]:
    """What two runs must share to intervene alike, beyond the neurons (empty for `zero`, so a
    zero-ablation run keeps the digest it had before ablations existed)."""
    if layer_masks.ablation == "zero":
        return {}
    record = ablation_record(layer_masks)
    record.pop("means_source", None)
    return record
