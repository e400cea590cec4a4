"""Short fn-train runs and checks on what moved and what stayed frozen."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from fn_train.config import TrainConfig
from tests.helpers.masks import MASKED, masked_by_layer, write_mask

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


def train_args(model: Path, dataset: Path, out: Path, *extra: str, max_steps: int = 1) -> list[str]:
    """fn-train's command line for a short run on the CPU."""
    return [
        "--model_name_or_path", str(model), "--dataset_name_or_path", str(dataset), "--output_dir", str(out),
        "--max_steps", str(max_steps), "--device", "cpu", *extra,
    ]  # fmt: skip


def neuron_parameters(model: nn.Module) -> dict[str, tuple[int, int, torch.Tensor]]:
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


def train_masked_and_check(model_dir: Path, demo_dir: Path, tmp_path: Path, use_peft: bool, **settings) -> Path:
    """Train the full model (or LoRA merged in) with networks 0 and 1 of MASKED off and weight
    decay 0.5, then check that every masked neuron's parameters are bit-identical and some open
    one's moved. Returns the output folder."""
    from fn_train.trainer import train

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    mask = write_mask(base, MASKED, tmp_path / "mask.json")
    out = tmp_path / "out"
    train(
        small_run(
            model_dir,
            demo_dir,
            out,
            mask,
            use_peft=use_peft,
            merge_adapter=use_peft,  # the saved model is then the full one, LoRA merged in
            lora_dropout=0.0,
            weight_decay=0.5,
            networks="0,1",
            **settings,
        )
    )
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert_masked_frozen_and_open_moved(neuron_parameters(base), neuron_parameters(tuned), masked_by_layer([0, 1]))
    return out
