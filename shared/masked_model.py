"""The one way to put a mask on a model: `MaskedModel`, as PEFT's `PeftModel` puts an adapter on one.

    masked = MaskedModel(model, "mask_artifacts/smollm2-demo.json", mode="key", networks=[0, 3])
    masked(**batch).logits              # networks 0 and 3 off
    with masked.disable_mask():         # the bare model for a block
        base = masked(**batch).logits
    model = masked.remove_mask()        # every hook gone; or
    model = masked.merge_and_unload()   # the mask written into the weights, no hook needed

The mask multiplies (or, for a mean ablation, replaces) the input of every down-projection,
through `shared.hooks.stacked_down_projections` with one condition. The hooks belong to the
MaskedModel: they are on the model from its construction until `remove_mask()`,
`merge_and_unload()` or the end of a `with` block around it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from shared.ablation import Ablation
from shared.arch import DownProjection, base_layer, find_down_projections
from shared.errors import UserError
from shared.hooks import stacked_down_projections
from shared.layer_masks import LayerMasks, build_layer_masks
from shared.masks import MaskFile, MaskMode, NetworkId, check_compatible, load_mask_file, select_networks
from shared.mlp_bias import add_mlp_biases
from shared.models import model_info

if TYPE_CHECKING:
    from shared.neuron_deltas import NeuronDeltas

log = logging.getLogger(__name__)


class _Intervention(Protocol):
    """What a MaskedModel puts on its model: hooks for a block, or the same change written into the weights."""

    def installed(self) -> AbstractContextManager[Any]: ...

    def merge(self) -> None: ...


@dataclass(frozen=True)
class _OnDownProjections:
    """Per-layer masks on the down-projections' inputs."""

    model: nn.Module
    projections: list[DownProjection]
    layer_masks: LayerMasks

    def installed(self) -> AbstractContextManager[Any]:
        return stacked_down_projections(self.projections, [self.layer_masks])

    def merge(self) -> None:
        _bake(self.model, self.projections, self.layer_masks)


@dataclass(frozen=True)
class _TunedDeltas:
    """A tune run's neuron deltas, added to the outputs of the layers they belong to."""

    model: nn.Module
    deltas: NeuronDeltas

    def installed(self) -> AbstractContextManager[Any]:
        return self.deltas.applied()

    def merge(self) -> None:
        self.deltas.merge_into(self.model)


class MaskedModel(nn.Module):
    """`model` with a mask file's networks switched off (`key`) or alone kept (`complement`), the
    selected neurons intervened on by `ablation` (default zero; `Ablation("mean", means=...)`,
    `Ablation("scale", 0.5)`). `mask` is a MaskFile or its path; `networks` are ids (None: all).
    A mask made for another model is refused.

    It runs, and answers every attribute, as the model does; `model` is the model itself.
    `remove_mask()` returns the bare model, `disable_mask()` lifts the mask for a block, and
    `merge_and_unload()` writes it into the down-projections' weights and returns the plain model.
    """

    def __init__(
        self,
        model: nn.Module,
        mask: MaskFile | str | Path,
        mode: MaskMode = "key",
        networks: list[NetworkId] | None = None,
        ablation: Ablation | None = None,
    ) -> None:
        super().__init__()
        projections, layer_masks = _resolve(model, mask, networks, mode, ablation or Ablation())
        self._start(model, _OnDownProjections(model, projections, layer_masks), layer_masks)

    @classmethod
    def from_layer_masks(cls, model: nn.Module, layer_masks: LayerMasks | None) -> MaskedModel:
        """`model` with masks already built (a training run's, checked against the model by the caller);
        None: nothing to install (a model whose weights already hold its mask)."""
        masked = cls.__new__(cls)
        nn.Module.__init__(masked)
        projections = find_down_projections(model)
        empty = LayerMasks({}, (), 0)
        masked._start(model, _OnDownProjections(model, projections, layer_masks or empty), layer_masks)
        return masked

    @classmethod
    def from_deltas(cls, model: nn.Module, deltas: NeuronDeltas) -> MaskedModel:
        """`model` with a tune run's neuron deltas added (`merge_and_unload` adds them to the weights)."""
        masked = cls.__new__(cls)
        nn.Module.__init__(masked)
        masked._start(model, _TunedDeltas(model, deltas), None)
        return masked

    def _start(self, model: nn.Module, intervention: _Intervention, layer_masks: LayerMasks | None) -> None:
        self.model = model
        self.layer_masks = layer_masks  # None for tune deltas, or for nothing to install
        self._intervention: _Intervention | None = intervention  # None once removed or merged
        self._installed: ExitStack | None = None  # what lifts the hooks, while they are on
        self._install()

    def _install(self) -> None:
        if self._intervention is None:
            return
        with ExitStack() as stack:
            stack.enter_context(self._intervention.installed())
            self._installed = stack.pop_all()

    def _lift(self) -> None:
        if self._installed is not None:
            installed, self._installed = self._installed, None
            installed.close()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not set yet (inside __init__): no model to ask
                raise
            return getattr(self.model, name)

    @property
    def masked(self) -> bool:
        """Whether the mask is installed now."""
        return self._installed is not None

    def remove_mask(self) -> nn.Module:
        """Lift the mask (every hook it put on the model); returns the model. Lifting twice is a no-op."""
        self._lift()
        self._intervention = None
        return self.model

    @contextmanager
    def disable_mask(self) -> Iterator[nn.Module]:
        """The bare model for the block (no hook of the mask on it), the mask back on after."""
        if self._intervention is None:
            raise ValueError("the mask was removed; there is nothing to disable")
        self._lift()
        try:
            yield self.model
        finally:
            self._install()

    def merge_and_unload(self) -> nn.Module:
        """Write the mask into the down-projections' weights and lift its hooks; returns the plain model,
        which computes what the masked one did. `zero` zeroes each masked neuron's column of the
        down-projection, `scale` multiplies it by the factor, `mean` adds its constant contribution
        (column x mean) to the bias and zeroes the column (a down-projection without a bias gets one:
        see `shared.mlp_bias`); tune deltas are added to the weights. Written while the hooks are still
        on: they act on inputs, not on weights."""
        if self._intervention is None:
            raise ValueError("the mask was removed; there is nothing to merge")
        self._intervention.merge()  # a refused merge changes nothing and leaves the mask on
        return self.remove_mask()

    def __enter__(self) -> MaskedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_mask()


def _resolve(
    model: nn.Module, mask: MaskFile | str | Path, networks: list[NetworkId] | None, mode: MaskMode, ablation: Ablation
) -> tuple[list[DownProjection], LayerMasks]:
    """Load (if a path), check against `model`, select networks and build per-layer vectors intervening by
    `ablation`."""
    if not isinstance(mask, MaskFile):
        mask = load_mask_file(Path(mask))
    projections = find_down_projections(model)
    name = str(getattr(getattr(model, "config", None), "name_or_path", "model"))
    check_compatible(mask, model_info(model, name, projections))
    layer_masks = ablation.apply(build_layer_masks(mask, select_networks(mask, networks), mode))
    if layer_masks.fully_closed_layers:
        log.warning(
            "complement mask: no selected neuron in layer(s) %s; %s",
            ",".join(str(layer) for layer in layer_masks.fully_closed_layers),
            {"zero": "their MLP output is zero", "mean": "their MLP output is constant (every neuron at its mean)"}.get(
                layer_masks.ablation, "every neuron of them is scaled"
            ),
        )
    return projections, layer_masks


def _bake(model: nn.Module, projections: list[DownProjection], layer_masks: LayerMasks) -> None:
    """Write `layer_masks` into the down-projections' weights: a masked neuron's input meets a zero (or
    scaled) weight instead of a zero (or scaled) input; the bias, added after, is the same in both."""
    by_layer = {p.layer: p for p in projections}
    wrapped = [
        layer for layer in layer_masks.vectors if base_layer(by_layer[layer].module) is not by_layer[layer].module
    ]
    if wrapped:
        raise UserError(
            f"the down-projection of layer {wrapped[0]} is wrapped (a LoRA adapter on it), so its weights alone "
            "cannot hold the mask; merge the adapter first (PEFT's merge_and_unload), or keep the mask as hooks"
        )
    if layer_masks.ablation == "mean" and layer_masks.vectors:
        add_mlp_biases(
            model,
            "merging a mean ablation writes the means into the down-projection's bias",
            "keep the mask as hooks (MaskedModel), or use zero ablation",
            projections,
        )
    with torch.no_grad():
        for layer, vector in layer_masks.vectors.items():
            projection = by_layer[layer]
            module = projection.module
            weight = module.weight
            linear = projection.orientation == "linear"  # Linear weight is (out, in); Conv1D's is (in, out)
            if layer_masks.ablation == "mean":
                # float64 sum, then cast: the bias holds sum_j W[:, j] * mean_j over the masked neurons.
                fill = layer_masks.fills[layer].to(device=weight.device, dtype=torch.float64)
                off = (vector == 0).nonzero().flatten().to(weight.device)
                columns = weight.double().index_select(1 if linear else 0, off)
                shift = columns @ fill[off] if linear else fill[off] @ columns
                module.bias.add_(shift.to(module.bias.dtype))
            if layer_masks.ablation == "scale":
                multiplier = torch.where(vector.bool(), torch.ones_like(vector), vector + layer_masks.scale_factor)
            else:
                multiplier = vector
            keep = multiplier.to(device=weight.device, dtype=weight.dtype)
            weight.mul_(keep if linear else keep[:, None])
