"""The run's final save: adapter, merged model or full model, the mask baked in or recorded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fn_train.config import TrainConfig
from fn_train.output import staged_save
from fn_train.run_mask import RunMask
from shared.arch import find_down_projections
from shared.constants import RUN_MASK_NAME
from shared.device import choose_dtype
from shared.jsonio import write_json_atomic
from shared.masks import LayerMasks
from shared.models import load_causal_lm


def bake_mask(model: nn.Module, layer_masks: LayerMasks) -> None:
    """Write each masked neuron's down-projection weights as zero, so the plain model behaves
    as the masked one: the neuron's input is multiplied by a zero weight instead of a zero
    mask (the bias, added after, is the same in both)."""
    by_layer = {p.layer: p for p in find_down_projections(model)}
    with torch.no_grad():
        for layer, vector in layer_masks.vectors.items():
            projection = by_layer[layer]
            weight = projection.module.weight
            keep = vector.to(device=weight.device, dtype=weight.dtype)
            # Linear weight is (out, in): scale the columns; Conv1D weight is (in, out): the rows.
            weight.mul_(keep if projection.orientation == "linear" else keep[:, None])


def merged_model(trainer, config: TrainConfig) -> nn.Module:
    """The base model, freshly loaded unquantized in the run's dtype, with the trained LoRA
    update merged in (one path for LoRA and QLoRA: a 4/8-bit base cannot hold the merge)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    trained = trainer.accelerator.unwrap_model(trainer.model)
    dtype = choose_dtype(config.torch_dtype, trainer.args.device.type)
    base = load_causal_lm(
        config.model_name_or_path, dtype, torch.device("cpu"), trust_remote_code=config.trust_remote_code
    )
    fresh = get_peft_model(base, trained.peft_config["default"])
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(trained))  # copied and cast into the fresh adapter
    return fresh.merge_and_unload()


def save_outputs(trainer, config: TrainConfig, run_mask: RunMask | None) -> str:
    """Save into the output folder (main process only); returns what was saved, in words."""
    if not trainer.is_world_process_zero():
        return ""
    with staged_save(config.output_dir) as stage:
        if config.use_peft and not config.merge_adapter:
            trainer.save_model(str(stage))
            saved = "adapter"
        else:
            if config.use_peft:
                model, saved = merged_model(trainer, config), "merged model"
            else:
                model, saved = trainer.accelerator.unwrap_model(trainer.model), "model"
            if config.bake_mask and run_mask is not None:
                bake_mask(model, run_mask.layer_masks)
                saved += " with the mask baked in"
            model.save_pretrained(stage)
            trainer.processing_class.save_pretrained(stage)
        if run_mask is not None:
            write_json_atomic(Path(stage) / RUN_MASK_NAME, run_mask.record(baked=config.bake_mask))
    return saved
