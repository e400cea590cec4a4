"""Context managers that put hooks on the down-projections and always take them off.

Hooks are global state on a model: a run that fails half-way must not leave one behind,
so every handle is removed in `finally` (as TransformerLens's `hooks()` does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.ablation import Ablation, NeuronMeans
from shared.arch import DownProjection, find_down_projections
from shared.masks import (
    LayerMasks,
    MaskFile,
    MaskMode,
    NetworkId,
    build_layer_masks,
    check_compatible,
    load_mask_file,
    select_networks,
)
from shared.models import model_info

log = logging.getLogger(__name__)

PreHook = Callable[[nn.Module, tuple], tuple | None]
Hook = Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]


@contextmanager
def pre_hooks(hooks: list[tuple[nn.Module, PreHook]]) -> Iterator[None]:
    """Register forward pre-hooks for the duration of the block, then remove every one."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def forward_hooks(hooks: list[tuple[nn.Module, Hook]]) -> Iterator[None]:
    """Register forward hooks (they see the input and may replace the output) for the block, then remove every one."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(model: nn.Module) -> int:
    """Forward and pre-forward hooks on any module of `model` (for tests and sanity checks)."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _by_condition(x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's rows grouped by condition, (C, rows / C, ..., neurons), and the (C, neurons) table
    shaped to broadcast over them. Rows are condition-major: the first rows / C are condition 0's."""
    conditions = table.shape[0]
    return x.reshape(conditions, -1, *x.shape[1:]), table.view(conditions, *([1] * (x.dim() - 1)), table.shape[1])


def _mask_hook(factors: torch.Tensor) -> PreHook:
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = factors.to(device=x.device, dtype=x.dtype)
        grouped, table = _by_condition(x, cache[key])
        # As PEFT's IA3 feed-forward path: scale the input, keep its dtype.
        return ((grouped * table).reshape(x.shape).to(x.dtype), *args[1:])

    return hook


def _mean_hook(keep: torch.Tensor, fill: torch.Tensor) -> PreHook:
    cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (keep.to(x.device), fill.to(device=x.device, dtype=x.dtype))
        grouped, where = _by_condition(x, cache[key][0])
        # An intervened neuron's input is its mean, exactly (not x * 0 + mean).
        return (torch.where(where, grouped, _by_condition(x, cache[key][1])[1]).reshape(x.shape), *args[1:])

    return hook


def _factors(layer_masks: LayerMasks, layer: int, size: int) -> torch.Tensor:
    """What one mask multiplies a layer's inputs by: the 0/1 vector (`zero`), 1 or the factor
    (`scale`), the keep flags (`mean`); all ones where the mask leaves the layer alone."""
    vector = layer_masks.vectors.get(layer)
    if vector is None:
        return torch.ones(size)
    if layer_masks.ablation == "scale":
        assert layer_masks.scale_factor is not None
        # Open neurons are multiplied by exactly 1.0, intervened ones by the factor.
        return torch.where(vector.bool(), torch.ones_like(vector), vector + layer_masks.scale_factor)
    return vector


def layer_hook(conditions: Sequence[LayerMasks], layer: int) -> PreHook:
    """The pre-hook that applies each condition's ablation to its rows of one layer's down-projection
    input (condition-major rows: with C conditions, a batch holds C groups of rows, in order)."""
    size = next(masks.vectors[layer].numel() for masks in conditions if layer in masks.vectors)
    ablations = {masks.ablation for masks in conditions}
    if len(ablations) != 1:
        raise ValueError(f"conditions stacked in one forward must share their ablation, got {sorted(ablations)}")
    factors = torch.stack([_factors(masks, layer, size) for masks in conditions])
    if ablations == {"mean"}:
        fills = torch.stack([masks.fills.get(layer, torch.zeros(size)) for masks in conditions])
        return _mean_hook(factors.bool(), fills)
    return _mask_hook(factors)


@contextmanager
def masked_down_projections(projections: list[DownProjection], layer_masks: LayerMasks) -> Iterator[LayerMasks]:
    """Apply each layer's mask to its down-projection's input while the block runs: multiply
    by the 0/1 vector (`zero`), replace the intervened neurons by their means (`mean`) or
    multiply them by a factor (`scale`)."""
    with stacked_down_projections(projections, [layer_masks]):
        yield layer_masks


@contextmanager
def stacked_down_projections(projections: list[DownProjection], conditions: Sequence[LayerMasks]) -> Iterator[None]:
    """Several masks in one forward pass: a batch of C x B rows holds condition c's copy of the
    B rows at rows c*B to (c+1)*B - 1, and each copy gets its own mask (as
    `masked_down_projections` applies one). Every row is computed as it would be alone, so
    C conditions cost one pass of C times the rows instead of C passes."""
    by_layer = {p.layer: p for p in projections}
    layers = sorted({layer for masks in conditions for layer in masks.vectors})
    with pre_hooks([(by_layer[layer].module, layer_hook(conditions, layer)) for layer in layers]):
        yield


def _capture_hook(layer: int, store: dict[int, torch.Tensor]) -> PreHook:
    def hook(module: nn.Module, args: tuple) -> None:
        store[layer] = args[0].detach()

    return hook


@contextmanager
def captured_down_proj_inputs(
    projections: list[DownProjection], layers: list[int] | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Yield a dict that each forward pass fills with layer -> down-projection input."""
    store: dict[int, torch.Tensor] = {}
    wanted = [p for p in projections if layers is None or p.layer in layers]
    with pre_hooks([(p.module, _capture_hook(p.layer, store)) for p in wanted]):
        yield store


def resolve_mask(
    model: nn.Module,
    mask: MaskFile | str | Path,
    networks: list[NetworkId] | None,
    mode: MaskMode,
    ablation: Ablation | None = None,
) -> tuple[list[DownProjection], LayerMasks]:
    """Load (if a path), check against `model`, select networks and build per-layer vectors
    (intervening by `ablation`, default zero)."""
    if not isinstance(mask, MaskFile):
        mask = load_mask_file(Path(mask))
    projections = find_down_projections(model)
    name = str(getattr(getattr(model, "config", None), "name_or_path", "model"))
    check_compatible(mask, model_info(model, name, projections))
    layer_masks = (ablation or Ablation()).apply(build_layer_masks(mask, select_networks(mask, networks), mode))
    if layer_masks.fully_closed_layers:
        log.warning(
            "complement mask: no selected neuron in layer(s) %s; %s",
            ",".join(str(layer) for layer in layer_masks.fully_closed_layers),
            {"zero": "their MLP output is zero", "mean": "their MLP output is constant (every neuron at its mean)"}.get(
                layer_masks.ablation, "every neuron of them is scaled"
            ),
        )
    return projections, layer_masks


@contextmanager
def apply_mask(
    model: nn.Module,
    mask: MaskFile | str | Path,
    mode: MaskMode = "key",
    networks: list[NetworkId] | None = None,
    ablation: str = "zero",
    scale_factor: float | None = None,
    means: NeuronMeans | np.ndarray | None = None,
) -> Iterator[LayerMasks]:
    """One call: mask `model`'s down-projection inputs with a mask file, for the block.

    `ablation` says what happens to the selected neurons: zero (default), mean (replaced by
    `means`, an (n_layers, intermediate_size) array or `NeuronMeans`, e.g.
    `fn_analyze.magnitude.stats_from_activations(folder, model, ["mean"]).means()`), or scale
    (multiplied by `scale_factor`).

    >>> with apply_mask(model, "mask_artifacts/smollm2-demo.json", "key", [0, 3]):
    ...     logits = model(**batch).logits
    """
    if means is not None and not isinstance(means, NeuronMeans):
        means = NeuronMeans(np.asarray(means, dtype=np.float32), "means given to apply_mask", 0)
    projections, layer_masks = resolve_mask(model, mask, networks, mode, Ablation(ablation, scale_factor, means))
    with masked_down_projections(projections, layer_masks):
        yield layer_masks


class MaskedModel(nn.Module):
    """A model with a mask installed (hooks on its down-projections, or tune deltas), until
    `remove_mask()` lifts it or a `with` block around it ends, as PEFT's `PeftModel` wraps a model
    with its adapter. It runs, and answers every attribute, as the model does; `model` is the
    model itself. The hooks belong to this object, not to the call that made it: lift them
    (or use `with`) before using the model without its mask.

    >>> masked = MaskFile.load("mask_artifacts/smollm2-demo.json").apply(model, "key", [0, 3])
    >>> masked(**batch).logits          # networks 0 and 3 off
    >>> model = masked.remove_mask()    # the hooks are gone
    """

    def __init__(self, model: nn.Module, installed: ExitStack, layer_masks: LayerMasks | None = None) -> None:
        super().__init__()
        self.model = model
        self._installed = installed  # what lifts the mask: the hooks' context managers, entered
        self.layer_masks = layer_masks  # None for a mask that is not per-layer vectors (tune deltas)

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
        """Whether the mask is still installed."""
        return self._installed is not None

    def remove_mask(self) -> nn.Module:
        """Lift the mask (every hook it put on the model); returns the model. Lifting twice is a no-op."""
        if self._installed is not None:
            installed, self._installed = self._installed, None
            installed.close()
        return self.model

    def __enter__(self) -> MaskedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_mask()


def keep_entered(masks: Iterable[AbstractContextManager[Any]]) -> tuple[ExitStack, list[Any]]:
    """Enter each context manager that puts a mask on a model, and keep them open; on a failure the ones
    entered are left again (no hook stays behind). Returns the stack that leaves them and what each gave."""
    with ExitStack() as stack:
        given = [stack.enter_context(mask) for mask in masks]
        return stack.pop_all(), given


def mask_model(
    model: nn.Module,
    mask: MaskFile | str | Path,
    mode: MaskMode = "key",
    networks: list[NetworkId] | None = None,
    ablation: str = "zero",
    scale_factor: float | None = None,
    means: NeuronMeans | np.ndarray | None = None,
) -> MaskedModel:
    """`apply_mask`, kept on: the model with its mask installed until `remove_mask()` or the end of `with`."""
    stack, (layer_masks,) = keep_entered([apply_mask(model, mask, mode, networks, ablation, scale_factor, means)])
    return MaskedModel(model, stack, layer_masks)
