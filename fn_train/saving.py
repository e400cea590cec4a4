"""The run's final save: adapter, merged model or full model, the mask baked in or recorded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fn_train.config import TrainConfig
from fn_train.output import staged_save
from fn_train.run_mask import RunMask
from shared.arch import config_of
from shared.constants import RUN_MASK_NAME, TUNED_DELTAS_NAME
from shared.device import choose_dtype
from shared.errors import UserError
from shared.jsonio import write_json_atomic
from shared.layer_masks import LayerMasks
from shared.masked_model import MaskedModel
from shared.mlp_bias import can_add_mlp_biases
from shared.models import load_causal_lm
from shared.neuron_deltas import deltas_of


def check_bakeable(model: nn.Module, layer_masks: LayerMasks) -> None:
    """Refuse, before training, a mean ablation that `MaskedModel.merge_and_unload` could not bake (its
    down-projection has no bias and its config cannot add one: `shared.mlp_bias`)."""
    if layer_masks.ablation != "mean":
        return
    if not can_add_mlp_biases(model):
        config = config_of(model)
        raise UserError(
            f"--bake-mask with --ablation mean writes the means into the down-projection's bias, but "
            f"{config.model_type}'s down-projection has none and its config cannot turn one on; "
            "drop --bake-mask (load the output with fn_train.load.load_masked_model) or use --ablation zero"
        )


def merged_model(trainer, config: TrainConfig) -> nn.Module:
    """The base model, freshly loaded unquantized in the run's dtype, with the trained LoRA
    update merged in (one path for LoRA and QLoRA: a 4/8-bit base cannot hold the merge)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    trained = trainer.accelerator.unwrap_model(trainer.model)
    fresh = get_peft_model(_fresh_base(trainer, config), trained.peft_config["default"])
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(trained))  # copied and cast into the fresh adapter
    return fresh.merge_and_unload()


def _fresh_base(trainer, config: TrainConfig) -> nn.Module:
    """The base model freshly loaded unquantized, in the run's dtype, on the CPU: what a merge is written into."""
    dtype = choose_dtype(config.torch_dtype, trainer.args.device.type)
    return load_causal_lm(
        config.model_name_or_path, dtype, torch.device("cpu"), trust_remote_code=config.trust_remote_code
    )


def _save_tuned(trainer, config: TrainConfig, stage: Path) -> str:
    """Tune mode: the deltas (a safetensors file beside the run's fn_mask.json, loaded onto the base by
    `fn_train.load`), or with --merge_adapter the base with them merged in, a plain model folder."""
    deltas = deltas_of(trainer.accelerator.unwrap_model(trainer.model))
    if config.merge_adapter:
        model = _fresh_base(trainer, config)
        deltas.merge_into(model)
        model.save_pretrained(stage)
        saved = "merged model"
    else:
        deltas.save(stage / TUNED_DELTAS_NAME)
        saved = f"neuron deltas ({(stage / TUNED_DELTAS_NAME).stat().st_size / 2**20:.2f} MiB)"
    trainer.processing_class.save_pretrained(stage)
    return saved


def save_outputs(trainer, config: TrainConfig, run_mask: RunMask | None) -> str:
    """Save into the output folder (main process only); returns what was saved, in words."""
    if not trainer.is_world_process_zero():
        return ""
    with staged_save(config.output_dir) as stage:
        if config.tunes:
            saved = _save_tuned(trainer, config, stage)
        elif config.use_peft and not config.merge_adapter:
            trainer.save_model(str(stage))
            saved = "adapter"
        else:
            if config.use_peft:
                model, saved = merged_model(trainer, config), "merged model"
            else:
                model, saved = trainer.accelerator.unwrap_model(trainer.model), "model"
            if config.bake_mask and run_mask is not None:
                model = MaskedModel.from_layer_masks(model, run_mask.layer_masks).merge_and_unload()
                saved += " with the mask baked in"
            model.save_pretrained(stage)
            trainer.processing_class.save_pretrained(stage)
        if run_mask is not None:
            # A merged tune run's weights hold its deltas as a baked mask's hold the mask: no hook is needed.
            baked = config.bake_mask or (config.tunes and config.merge_adapter)
            write_json_atomic(Path(stage) / RUN_MASK_NAME, run_mask.record(baked, config.model_name_or_path))
    return saved
