"""Context managers that put hooks on the down-projections and always take them off.

Hooks are global state on a model: a run that fails half-way must not leave one behind,
so every handle is removed in `finally` (as TransformerLens's `hooks()` does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from shared.arch import DownProjection
from shared.layer_masks import LayerMasks

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
def stacked_down_projections(projections: list[DownProjection], conditions: Sequence[LayerMasks]) -> Iterator[None]:
    """Several masks in one forward pass: a batch of C x B rows holds condition c's copy of the
    B rows at rows c*B to (c+1)*B - 1, and each copy gets its own mask: multiplied by the 0/1
    vector (`zero`), the intervened neurons replaced by their means (`mean`) or multiplied by a
    factor (`scale`). Every row is computed as it would be alone, so C conditions cost one pass of
    C times the rows instead of C passes. One condition is one mask on a whole batch: what
    `shared.masked_model.MaskedModel` installs."""
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
