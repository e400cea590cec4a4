"""Assemble and run one SFT run: model, data, LoRA, the mask hook, saving."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, cast

import torch

from fn_train.config import TrainConfig
from fn_train.data import build_datasets
from fn_train.lora_mask import zero_lora_columns_of_masked_neurons
from shared.arch import find_down_projections
from shared.constants import RUN_MASK_NAME
from shared.device import choose_device, choose_dtype
from shared.hooks import masked_down_projections
from shared.jsonio import write_json_atomic
from shared.masks import (
    MaskFile,
    MaskMode,
    build_layer_masks,
    check_compatible,
    load_mask_file,
    parse_network_ids,
    select_networks,
)
from shared.models import load_causal_lm, load_tokenizer, model_info

log = logging.getLogger(__name__)

RUN_CONFIG_NAME = "fn_train_config.json"


def _sft_config(config: TrainConfig, device_type: str, bf16: bool, has_eval: bool):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(config.output_dir),
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        eval_strategy=("steps" if config.eval_steps else "epoch") if has_eval else "no",
        eval_steps=config.eval_steps,
        seed=config.seed,
        max_length=config.max_seq_length,
        report_to=config.report_to,
        # TRL turns these on by default; checkpointing costs ~30% speed and bf16 autocast
        # is wrong on CPU and on float32 weights the user asked for.
        gradient_checkpointing=False,
        bf16=bf16,
        fp16=False,
        use_cpu=device_type == "cpu",
        packing=False,
    )


def _lora_config(config: TrainConfig):
    from peft import LoraConfig

    targets: str | list[str] = config.lora_target_modules
    if config.lora_target_modules != "all-linear":
        targets = [t.strip() for t in config.lora_target_modules.split(",") if t.strip()]
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def build_trainer(config: TrainConfig, mask: MaskFile | None = None):
    """The SFTTrainer for `config`, with PEFT already applied (the mask is not yet installed)."""
    from trl import SFTTrainer

    device = choose_device(config.device)
    dtype = choose_dtype(config.torch_dtype, device.type)
    tokenizer = load_tokenizer(config.model_name_or_path)
    train_set, eval_set, template = build_datasets(
        config.dataset_name_or_path,
        config.data_format,
        config.template_format,
        tokenizer,
        config.validation_split,
        config.seed,
        max_length=config.max_seq_length,
    )
    log.info("template: %s, %d training rows", template, len(train_set))
    model = load_causal_lm(config.model_name_or_path, dtype, device)
    if mask is not None:  # refuse a mask made for another model before PEFT and training
        check_compatible(mask, model_info(model, config.model_name_or_path), where=f"mask file {config.mask_file}")
    return SFTTrainer(
        model=model,
        args=_sft_config(config, device.type, dtype == torch.bfloat16 and device.type == "cuda", eval_set is not None),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=_lora_config(config) if config.use_peft else None,
    )


def train(config: TrainConfig) -> dict[str, Any]:
    """Fine-tune, with the mask hooked on the down-projections that are in the model when
    training starts (after PEFT wrapped them, so a LoRA branch sees the masked input too).
    Returns the trainer's final metrics."""
    mask = None
    networks = parse_network_ids(config.networks)
    if config.mask_file is not None:  # a bad file or selection fails before any model is loaded
        mask = load_mask_file(config.mask_file)
        selected = select_networks(mask, networks)
    trainer = build_trainer(config, mask)  # refuses a mask made for another model
    masking: contextlib.AbstractContextManager = contextlib.nullcontext()
    run_mask: dict[str, Any] | None = None  # what fn_mask.json will say the run trained with
    if mask is not None:
        mode = cast(MaskMode, config.mask_mode)
        projections = find_down_projections(trainer.model)  # the modules PEFT put in place
        layer_masks = build_layer_masks(mask, selected, mode)
        masking = masked_down_projections(projections, layer_masks)
        zero_lora_columns_of_masked_neurons(projections, layer_masks)
        closed = layer_masks.fully_closed_layers
        print(
            f"fn-train: mask {config.mask_file} ({mode}, networks {config.networks or 'all'}): "
            f"{layer_masks.masked_neurons} neurons switched off"
            + (f"; layers {','.join(map(str, closed))} have no selected neuron and their MLP is off" if closed else "")
        )
        run_mask = {
            "mode": mode,
            "networks": networks,
            "masked_neurons": layer_masks.masked_neurons,
            "fully_closed_layers": list(closed),
            "mask_file": str(config.mask_file),
            "mask": mask.to_dict(),
        }
    config.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.output_dir / RUN_CONFIG_NAME, config.to_dict())
    with masking:
        result = trainer.train()
        metrics = dict(result.metrics)
        if trainer.eval_dataset is not None:
            metrics.update(trainer.evaluate())
        trainer.save_model(str(config.output_dir))
    if run_mask is not None:
        write_json_atomic(config.output_dir / RUN_MASK_NAME, run_mask)
    print(f"fn-train: saved {'adapter' if config.use_peft else 'model'} to {config.output_dir}")
    return metrics
