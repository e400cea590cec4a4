"""Load what fn-train saved (an output folder or one of its checkpoints) as a model without any
hook: a full model folder as it is, a LoRA adapter on its base, tune mode's neuron deltas merged
into their base. Used by `fn_train.load` and by `fn-analyze evaluate --tuned`, which must not import
fn_train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.constants import ADAPTER_CONFIG_NAME, RUN_MASK_NAME, TUNED_DELTAS_NAME
from shared.errors import UserError
from shared.models import load_causal_lm
from shared.neuron_deltas import NeuronDeltas, neurons_from_record


def run_record(folder: Path) -> dict[str, Any] | None:
    """The folder's `fn_mask.json`, or None when the run had no mask."""
    path = Path(folder) / RUN_MASK_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def tuned_base_and_deltas(
    folder: Path, dtype: torch.dtype, device: str, trust_remote_code: bool = False
) -> tuple[nn.Module, NeuronDeltas]:
    """A tune run's base model (in eval mode) and its trained deltas, built for it but not yet applied."""
    record = run_record(folder)
    where = str(Path(folder) / RUN_MASK_NAME)
    if record is None or not record.get("base_model"):
        raise UserError(f"{folder} holds {TUNED_DELTAS_NAME} but no {RUN_MASK_NAME} naming its base model; train again")
    base = load_causal_lm(record["base_model"], dtype, torch.device(device), trust_remote_code=trust_remote_code)
    deltas = NeuronDeltas(base, neurons_from_record(record, where))
    deltas.load(Path(folder) / TUNED_DELTAS_NAME)
    return base.eval(), deltas


def load_trained(
    output_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False
) -> nn.Module:
    """The trained model (an output folder or one of its checkpoints), in eval mode, without any hook."""
    output_dir = Path(output_dir)
    if (output_dir / TUNED_DELTAS_NAME).is_file():
        base, deltas = tuned_base_and_deltas(output_dir, dtype, device, trust_remote_code)
        deltas.merge_into(base)
        return base
    adapter_config = output_dir / ADAPTER_CONFIG_NAME
    if not adapter_config.is_file():
        return load_causal_lm(str(output_dir), dtype, torch.device(device), trust_remote_code=trust_remote_code)
    from peft import PeftModel

    base_name = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    base = load_causal_lm(base_name, dtype, torch.device(device), trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, output_dir).eval()
