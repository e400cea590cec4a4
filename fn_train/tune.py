"""`--mask-mode tune`: train only the chosen neurons' own weights, as deltas (shared.neuron_deltas),
with the rest of the model frozen; and the random control of the same counts (`--random-neurons`).

The Trainer checkpoints and resumes the deltas only (`fn_tune.safetensors`, kilobytes to megabytes),
not the frozen base. A quantized base is accepted as for QLoRA: the Trainer refuses a quantized model
without an adapter it knows (PEFT's), so the check is told that one is attached while the Trainer is
built; the deltas are then attached, in float32, and are all that trains.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.trainer import TRAINING_ARGS_NAME
from trl import SFTTrainer

from fn_analyze.neurons.magnitude import NeuronMagnitude, stats_from_sequences
from fn_analyze.neurons.neuron_sets import draw_control
from fn_train.data import leading_sequences
from fn_train.run_mask import RunMask
from shared.arch import find_down_projections
from shared.constants import TUNED_DELTAS_NAME
from shared.neuron_deltas import NeuronDeltas, attach_neuron_deltas, deltas_of, model_parameter_count

MAGNITUDE_MAX_TOKENS = 50_000  # training tokens the magnitudes of --random-neurons magnitude are measured on
# The magnitude bins of --random-neurons magnitude, in decades of max |activation|: fn-analyze evaluate's default.
BIN_WIDTH = 0.1
RANDOM_STREAM = 25  # seeds the random control's draw apart from the run's other uses of --seed


class TuneTrainer(SFTTrainer):
    """TRL's SFTTrainer that checkpoints and resumes the neuron deltas only."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        os.makedirs(folder, exist_ok=True)
        deltas_of(self.model).save(folder / TUNED_DELTAS_NAME)
        self.processing_class.save_pretrained(folder)
        torch.save(self.args, folder / TRAINING_ARGS_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        deltas_of(model if model is not None else self.model).load(Path(resume_from_checkpoint) / TUNED_DELTAS_NAME)


@contextlib.contextmanager
def adapter_declared(model: nn.Module, quantized: bool) -> Iterator[None]:
    """While the Trainer is built, a quantized base says it carries an adapter (transformers' own flag
    for adapters it loaded), which it will: the deltas, attached once the Trainer has placed the model."""
    if not quantized:
        yield
        return
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        del model._hf_peft_config_loaded


def training_magnitude(trainer, config, run_mask: RunMask) -> NeuronMagnitude:
    """Max |activation| per neuron over the first MAGNITUDE_MAX_TOKENS tokens of the training rows, on the base."""
    sequences = leading_sequences(trainer.train_dataset, MAGNITUDE_MAX_TOKENS)
    projections = find_down_projections(trainer.model)
    return stats_from_sequences(
        trainer.model,
        projections,
        sequences,
        f"{len(sequences)} rows of {config.dataset_name_or_path}",
        ["max_abs"],
        batch_size=config.per_device_train_batch_size,
        pad_id=trainer.processing_class.pad_token_id or 0,
    ).magnitude()


def random_control(run_mask: RunMask, matched_on: str, seed: int, magnitude: NeuronMagnitude | None) -> RunMask:
    """The same run tuning random neurons: as many per layer (`layer`) or per layer and magnitude bin
    (`magnitude`) as the networks hold, drawn as fn-analyze evaluate draws its controls (the mask
    file's set-aside neurons left out)."""
    rng = np.random.default_rng([seed, RANDOM_STREAM])
    drawn = draw_control(run_mask.mask, run_mask.chosen_neurons, matched_on, magnitude, BIN_WIDTH, rng)
    return run_mask.with_neurons(drawn, matched_on, seed)


def attach_tuned_neurons(model: nn.Module, run_mask: RunMask) -> tuple[NeuronDeltas, str]:
    """Freeze the model and give it the deltas of the run's neurons; returns them and the line that says
    what trains: `trainable: N parameters (x% of the model) in K neurons`."""
    deltas = attach_neuron_deltas(model, run_mask.chosen_neurons)
    share = 100 * deltas.n_parameters / model_parameter_count(model)
    line = f"trainable: {deltas.n_parameters:,} parameters ({share:.3g}% of the model) in {deltas.n_neurons:,} neurons"
    return deltas, line
