"""Mask files and network layouts for tiny models."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from shared.masks import MaskFile, Network, save_mask_file
from shared.models import model_info
from tests.helpers.tiny_models import intermediate_size


def spread_networks(model: nn.Module) -> dict[int, dict[int, list[int]]]:
    """Two networks over the model's width: every 3rd neuron of layer 0 and every 5th of layer 1,
    and three neurons of layer 1."""
    size = intermediate_size(model.config)
    return {0: {0: list(range(0, size, 3)), 1: list(range(1, size, 5))}, 1: {1: [2, 4, 6]}}


def make_mask(model: nn.Module, networks: dict[int, dict[int, list[int]]], name: str = "tiny") -> MaskFile:
    """A mask file for `model` with the given {network id: {layer: [neurons]}}."""
    return MaskFile(
        model=model_info(model, name),
        networks=tuple(
            Network(i, {layer: tuple(sorted(neurons)) for layer, neurons in layers.items()})
            for i, layers in networks.items()
        ),
        source={"method": "test"},
    )


def write_mask(model: nn.Module, networks: dict[int, dict[int, list[int]]], path: Path) -> Path:
    save_mask_file(make_mask(model, networks), path)
    return path


# Networks of the masks the training tests write: {network id: {layer: [neurons]}}.
MASKED = {0: {0: [0, 5, 9, 40, 100], 1: [3, 4, 170]}, 1: {1: [7, 8, 9]}}


def masked_by_layer(networks: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for network in networks:
        for layer, neurons in MASKED[network].items():
            out.setdefault(layer, []).extend(neurons)
    return out
