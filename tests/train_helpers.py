"""What the training tests share: a small run's config, and the parameters of each MLP neuron."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fn_train.config import TrainConfig

# Networks of the masks the training tests write: {network id: {layer: [neurons]}}.
MASKED = {0: {0: [0, 5, 9, 40, 100], 1: [3, 4, 170]}, 1: {1: [7, 8, 9]}}

# Parameter name suffix -> the axis holding one entry per MLP neuron (LLaMA, GPT-2's Conv1D).
NEURON_AXIS = {
    "mlp.gate_proj.weight": 0,
    "mlp.up_proj.weight": 0,
    "mlp.down_proj.weight": 1,
    "mlp.c_fc.weight": 1,
    "mlp.c_fc.bias": 0,
    "mlp.c_proj.weight": 0,
}


def small_run(model_dir: Path, demo_dir: Path, out: Path, mask: Path | None, **overrides) -> TrainConfig:
    settings = dict(
        model_name_or_path=str(model_dir),
        dataset_name_or_path=str(demo_dir / "train.csv"),
        output_dir=out,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,  # large, so that every open parameter visibly moves
        weight_decay=0.0,
        max_seq_length=64,
        logging_steps=1,
        device="cpu",
        mask_file=mask,
    )
    return TrainConfig(**{**settings, **overrides})


def neuron_parameters(model) -> dict[str, tuple[int, int, torch.Tensor]]:
    """name -> (layer, neuron axis, a copy) of every MLP parameter that holds per-neuron entries."""
    found = {}
    for name, parameter in model.named_parameters():
        suffix = next((s for s in NEURON_AXIS if name.endswith(s)), None)
        if suffix is not None:
            layer = int(re.search(r"\.(?:h|layers)\.(\d+)\.", name).group(1))
            found[name] = (layer, NEURON_AXIS[suffix], parameter.detach().clone())
    return found


def assert_masked_frozen_and_open_moved(before: dict, after: dict, frozen_by_layer: dict[int, list[int]]) -> None:
    """Every frozen neuron's entries are bit-identical; some open neuron's entries moved."""
    assert before and before.keys() == after.keys()
    moved_open = False
    for name, (layer, axis, old) in before.items():
        new = after[name][2]
        frozen = torch.tensor(sorted(frozen_by_layer.get(layer, [])), dtype=torch.long)
        open_ = torch.tensor([n for n in range(old.shape[axis]) if n not in set(frozen.tolist())], dtype=torch.long)
        if len(frozen):
            assert torch.equal(old.index_select(axis, frozen), new.index_select(axis, frozen)), (
                f"{name}: a masked neuron's parameters moved"
            )
        moved_open |= not torch.equal(old.index_select(axis, open_), new.index_select(axis, open_))
    assert moved_open, "no open parameter moved: the check would pass vacuously"


def masked_by_layer(networks: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for network in networks:
        for layer, neurons in MASKED[network].items():
            out.setdefault(layer, []).extend(neurons)
    return out
