"""Mask files and network layouts for tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import nn

from fn_analyze.config import CollectConfig
from fn_analyze.record.collect import collect
from shared.masks import MaskFile, ModelInfo, Network, save_mask_file
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


def tiny_run_with_z(folder: Path, tiny_lm_dir: Path, demo_dir: Path) -> tuple[Path, Path]:
    """An activations folder of the tiny LLaMA on 600 demo tokens (`folder`/acts) and a mask file
    for it (`folder`/mask.json): two networks with signed z, and a set-aside group of three neurons."""
    collect(CollectConfig(dataset=str(demo_dir / "data.jsonl"), out=folder / "acts", model=str(tiny_lm_dir),
                          max_tokens=600))  # fmt: skip
    model = ModelInfo(**json.loads((folder / "acts" / "manifest.json").read_text())["model"])
    rng = np.random.default_rng(0)
    networks = []
    for n, layers in enumerate([{0: range(0, 40, 2)}, {0: range(100, 110), 1: range(20, 50)}]):
        chosen = {layer: tuple(ns) for layer, ns in layers.items()}
        z = {layer: tuple(float(v) for v in rng.choice([-4.0, 5.0], len(ns))) for layer, ns in chosen.items()}
        networks.append(Network(n, chosen, z=z))
    mask = MaskFile(model, tuple(networks), {"ica": {"set_aside": {"size": 3, "layers": {"1": [1, 2, 3]}}}})
    save_mask_file(mask, folder / "mask.json")
    return folder / "acts", folder / "mask.json"
