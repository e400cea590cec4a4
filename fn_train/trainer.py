"""Assemble and run one SFT run: model, data, LoRA/QLoRA, the mask, checkpoints, saving."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from fn_train.config import TrainConfig
from fn_train.data import build_datasets, leading_sequences
from fn_train.freeze import KeepMaskedNeuronsFrozen, masked_neuron_slices
from fn_train.lora_mask import zero_lora_columns_of_masked_neurons
from fn_train.output import check_output_dir, clear_output_dir, removed_on_failure
from fn_train.quantization import quantization_config
from fn_train.run_mask import (
    MaskRecordInCheckpoints,
    RunMask,
    TrainMode,
    check_same_mask,
    latest_checkpoint,
    remove_incomplete_checkpoints,
    resolve_checkpoint,
    resolve_run_mask,
)
from fn_train.saving import check_bakeable, save_outputs
from fn_train.step_progress import use_our_step_bars
from shared.ablation import Ablation, NeuronMeans
from shared.arch import find_down_projections
from shared.constants import CHECKPOINT_PREFIX, ICA_MASK_NAME, RUN_CONFIG_NAME
from shared.device import choose_device, choose_dtype
from shared.distributed import ranks_from_env
from shared.errors import Interrupted, ParameterError, UserError, is_disk_full
from shared.jsonio import write_json_atomic
from shared.masked_model import MaskedModel
from shared.masks import MaskFile, check_compatible, parse_network_ids
from shared.models import load_causal_lm, load_tokenizer, model_info
from shared.progress import progress_log
from shared.signals import StopRequest, stop_on_signals

log = logging.getLogger(__name__)
say = progress_log("train")

MEANS_MAX_TOKENS = 50_000  # tokens of training data the means of --ablation mean are measured on (default)


def _say(message: str) -> None:
    """One progress line (shared.progress: the command prints it); under torchrun, each rank says which it is."""
    ranks = ranks_from_env()
    who = f"fn-train[rank {ranks.rank}]" if ranks.distributed else "fn-train"
    say.info(f"{who}: {message}")


def check_report_to(report_to: str) -> None:
    """Refuse an unknown or uninstalled tracker before anything is loaded."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names in ([], ["none"], ["all"]):
        return
    available = get_available_reporting_integrations()
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
            raise UserError(f"--report_to {name!r} is unknown; use none or one of {known}")
        if name not in available:
            raise UserError(f"--report_to {name}: its package is not installed; pip install {name} or drop the flag")


def _sft_config(config: TrainConfig, device_type: str, bf16: bool, has_eval: bool):
    from fn_train.tracking import MaskedSFTConfig
    from shared.progress import progress_shown

    return MaskedSFTConfig(
        output_dir=str(config.output_dir),
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        **({"save_steps": config.save_steps} if config.save_steps else {}),
        eval_strategy=("steps" if config.eval_steps else "epoch") if has_eval else "no",
        eval_steps=config.eval_steps,
        seed=config.seed,
        max_length=config.max_seq_length,
        # None: TRL's rule, loss on the completion of prompt/completion records (plain text has none).
        completion_only_loss=None if config.completion_only_loss else False,
        report_to=config.report_to,
        # TRL turns these on by default; checkpointing costs ~30% speed and bf16 autocast
        # is wrong on CPU and on float32 weights the user asked for.
        gradient_checkpointing=False,
        bf16=bf16,
        fp16=False,
        use_cpu=device_type == "cpu",
        packing=False,
        disable_tqdm=not progress_shown(),  # the step bar: on in the command unless --quiet
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


def _load_model(config: TrainConfig, dtype: torch.dtype, device: torch.device):
    quantization = quantization_config(config, dtype)
    if quantization is None:
        return load_causal_lm(config.model_name_or_path, dtype, device, trust_remote_code=config.trust_remote_code)
    try:
        return load_causal_lm(
            config.model_name_or_path,
            dtype,
            device,
            trust_remote_code=config.trust_remote_code,
            quantization_config=quantization,
            device_map={"": device},
        )
    except (RuntimeError, NotImplementedError, ImportError) as exc:  # bitsandbytes lacks a kernel for this device
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        flag = "{" + config.quantization + "}"
        raise ParameterError(
            f"{flag}: bitsandbytes cannot quantize on {{device}} here ({{first}}); drop {flag}",
            device=device,
            first=first,
        ) from exc


def build_trainer(config: TrainConfig, mask: MaskFile | None = None, callbacks: Sequence = ()):
    """The SFTTrainer for `config`, with PEFT already applied (the mask is not yet installed);
    in tune mode, the TuneTrainer, without PEFT (the deltas are attached by `_install_tuning`)."""
    from trl import SFTTrainer

    from fn_train.tune import TuneTrainer, adapter_declared

    device = choose_device(config.device)
    dtype = choose_dtype(config.torch_dtype, device.type)
    tokenizer = load_tokenizer(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
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
    model = _load_model(config, dtype, device)
    if mask is not None:  # refuse a mask made for another model before PEFT and training
        check_compatible(
            mask, model_info(model, config.model_name_or_path), where=f"mask file {config.mask_file or ICA_MASK_NAME}"
        )
    with adapter_declared(model, config.tunes and config.quantized):
        return (TuneTrainer if config.tunes else SFTTrainer)(
            model=model,
            args=_sft_config(
                config, device.type, dtype == torch.bfloat16 and device.type == "cuda", eval_set is not None
            ),
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            peft_config=_lora_config(config) if config.trains_lora else None,
            callbacks=list(callbacks),
        )


def training_means(trainer, config: TrainConfig, run_mask: RunMask) -> NeuronMeans:
    """The neurons' mean activations for --ablation mean: from --means-from (an activations
    folder of this model), else a pass of the model as it starts training (LoRA adds nothing
    yet) over the first MEANS_MAX_TOKENS tokens of the tokenized training rows."""
    from fn_analyze.neurons.magnitude import stats_from_activations, stats_from_sequences

    if config.means_from is not None:
        return stats_from_activations(config.means_from, run_mask.mask.model, ["mean"], cache=True).means()
    sequences = leading_sequences(trainer.train_dataset, MEANS_MAX_TOKENS)
    return stats_from_sequences(
        trainer.model,
        find_down_projections(trainer.model),
        sequences,
        f"{len(sequences)} rows of {config.dataset_name_or_path}",
        ["mean"],
        batch_size=config.per_device_train_batch_size,
        pad_id=trainer.processing_class.pad_token_id or 0,
    ).means()


def _install_mask(trainer, run_mask: RunMask) -> MaskedModel:
    """Zero LoRA's A columns of masked neurons, add the callbacks that keep them frozen and
    record the mask in checkpoints; returns the model with the mask hooked on the
    down-projections in the model now (after PEFT wrapped them: a LoRA branch on the
    down-projection sees the masked input too), lifted at the end of a `with` block."""
    projections = find_down_projections(trainer.model)
    layer_masks = run_mask.layer_masks
    zero_lora_columns_of_masked_neurons(projections, layer_masks)
    trainer.add_callback(KeepMaskedNeuronsFrozen(masked_neuron_slices(trainer.model, projections, layer_masks)))
    trainer.add_callback(MaskRecordInCheckpoints(run_mask))
    return MaskedModel.from_layer_masks(trainer.model, layer_masks)


def _install_tuning(trainer, run_mask: RunMask, base_model: str) -> MaskedModel:
    """Tune mode: freeze the model, attach the deltas of the run's neurons, say what trains, record the
    neurons in checkpoints; returns the model with the deltas added to its outputs until the end of a `with`
    block."""
    from fn_train.tune import attach_tuned_neurons

    deltas, trainable = attach_tuned_neurons(trainer.model, run_mask)
    _say(trainable)
    trainer.add_callback(MaskRecordInCheckpoints(run_mask, base_model))
    return MaskedModel.from_deltas(trainer.model, deltas)


def _tune_control(run_mask: RunMask, config: TrainConfig, trainer=None) -> RunMask:
    """Tune mode with --random-neurons: the random set of the networks' counts; a magnitude-matched one
    needs the model (`trainer`), a layer-matched one does not (drawn before the model loads)."""
    if config.random_neurons is None:
        return run_mask
    needs_model = config.random_neurons == "magnitude"
    if needs_model != (trainer is not None):  # drawn at the other call
        return run_mask
    from fn_train.tune import random_control, training_magnitude

    magnitude = training_magnitude(trainer, config, run_mask) if trainer is not None else None
    return random_control(run_mask, config.random_neurons, config.seed, magnitude)


def _disk_full(output_dir: Path, exc: BaseException) -> UserError:
    kept = latest_checkpoint(output_dir) if output_dir.is_dir() else None
    then = (
        f"{kept.name} is kept: free some space and re-run with --resume_from_checkpoint last"
        if kept
        else "no checkpoint was complete: free some space and re-run the same command"
    )
    return UserError(f"the disk holding {output_dir} is full ({' '.join(str(exc).split())}); {then}")


def _no_room_for_a_checkpoint(output_dir: Path) -> bool:
    """Whether the disk has less room than a checkpoint takes: torch's writer reports a full disk
    as "unexpected pos", without the errno, so a failed save is judged by the space left."""
    if not output_dir.is_dir():
        return False
    kept = latest_checkpoint(output_dir)
    needed = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file()) if kept else 2**20
    return shutil.disk_usage(output_dir).free < needed


def _train_and_save(
    trainer,
    config: TrainConfig,
    run_mask: RunMask | None,
    masking: contextlib.AbstractContextManager,
    checkpoint: Path | None,
    stop: StopRequest,
) -> dict[str, Any]:
    """Train and evaluate with the mask hooked, then save without the hooks; on a stop request,
    end after the checkpoint of the current step. A full disk (or any failure) leaves no
    incomplete checkpoint behind; the complete ones stay."""
    try:
        with masking:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            if stop.signal_number is not None:
                step = trainer.state.global_step
                raise Interrupted(
                    f"fn-train saved {config.output_dir / f'checkpoint-{step}'} at the end of step {step}; "
                    "re-run the same command with --resume_from_checkpoint last to continue",
                    stop.signal_number,
                )
            metrics = dict(result.metrics)
            if trainer.eval_dataset is not None:
                metrics.update(trainer.evaluate())
        saved = save_outputs(trainer, config, run_mask)
    except Exception as exc:
        full = is_disk_full(exc) or _no_room_for_a_checkpoint(config.output_dir)
        if ranks_from_env().is_main:
            remove_incomplete_checkpoints(config.output_dir)
        if full:
            raise _disk_full(config.output_dir, exc) from exc
        raise
    if saved:
        _say(f"saved {saved} to {config.output_dir}")
    step = trainer.state.global_step
    if config.save_steps and step % config.save_steps and (config.output_dir / f"{CHECKPOINT_PREFIX}{step}").is_dir():
        _say(
            f"{CHECKPOINT_PREFIX}{step}: the Trainer also checkpoints the last step (not a multiple of --save_steps "
            f"{config.save_steps}), so that --resume_from_checkpoint last can train on from it; delete it if not"
        )
    return metrics


def train(config: TrainConfig, callbacks: Sequence = ()) -> dict[str, Any]:
    """Fine-tune with the mask on (see `_install_mask`); `callbacks` are extra TrainerCallbacks.
    Returns the trainer's final metrics. On SIGTERM or Ctrl-C after the model loaded, the run
    saves a checkpoint at the end of the current step and raises `Interrupted`.

    Everything that can be checked without a model is checked before anything is written:
    the output folder, the checkpoint to resume and the mask it was made with, the mask file
    and selection, the tracker. The output folder is removed again if this run created it
    and fails before its first checkpoint.

    Under a launcher only the main rank judges the output folder: the others would look at it while
    the main rank clears it or writes its config there, and refuse what they half-see. A refusal of
    the main rank ends the launch."""
    main_process = ranks_from_env().is_main
    if main_process:
        check_output_dir(config.output_dir, config.overwrite_output_dir, config.resume_from_checkpoint is not None)
    check_report_to(config.report_to)
    checkpoint = None
    if config.resume_from_checkpoint is not None:
        checkpoint = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
    mode = cast(TrainMode, config.mask_mode)
    networks = parse_network_ids(config.networks)
    # A mean ablation is added once its means are measured, a magnitude-matched random set drawn once the
    # magnitudes are: after the model loads.
    ablation = Ablation(config.ablation, config.scale_factor) if config.ablation != "mean" else None
    after_load = config.ablation == "mean" or config.random_neurons == "magnitude"
    run_mask = (
        resolve_run_mask(config.mask_file, mode, networks, ablation, config.keystone)
        if config.mask_file is not None
        else None
    )
    if run_mask is not None:
        run_mask = _tune_control(run_mask, config)
    if checkpoint is not None and not config.ica_on_the_fly and not after_load:
        check_same_mask(checkpoint, run_mask)
    from fn_train.tracking import SaveAndStopOnSignal, track_mask

    with removed_on_failure(config.output_dir, main_process), contextlib.ExitStack() as stack:
        if main_process:  # first into the folder: it marks the folder as fn-train's
            if config.overwrite_output_dir:
                clear_output_dir(config.output_dir)
            write_json_atomic(config.output_dir / RUN_CONFIG_NAME, config.to_dict())
        if config.ica_on_the_fly:
            from fn_train.ica_mask import mask_from_training_data

            run_mask = resolve_run_mask(
                mask_from_training_data(config, checkpoint is not None), mode, networks, ablation, config.keystone
            )
            run_mask = _tune_control(run_mask, config)
            if checkpoint is not None and not after_load:
                check_same_mask(checkpoint, run_mask)
        trainer = build_trainer(config, run_mask.mask if run_mask else None, callbacks)
        use_our_step_bars(trainer)  # plain lines into a log file, as every bar of ours
        stop = stack.enter_context(stop_on_signals())
        trainer.add_callback(SaveAndStopOnSignal(stop))  # before the mask's callbacks: see its docstring
        masking: contextlib.AbstractContextManager = contextlib.nullcontext()
        if run_mask is not None and config.ablation == "mean":
            run_mask = run_mask.with_ablation(Ablation("mean", means=training_means(trainer, config, run_mask)))
        if run_mask is not None:
            run_mask = _tune_control(run_mask, config, trainer)
        if checkpoint is not None and after_load:
            check_same_mask(checkpoint, run_mask)
        if run_mask is not None and config.bake_mask:
            check_bakeable(trainer.model, run_mask.layer_masks)
        if run_mask is not None:
            # On the stack too, so that a failure before training starts leaves no hook behind.
            masking = stack.enter_context(
                _install_tuning(trainer, run_mask, config.model_name_or_path)
                if run_mask.tunes
                else _install_mask(trainer, run_mask)
            )
            track_mask(trainer.args, run_mask)
            _say(run_mask.describe())
            if (note := run_mask.recipe_note()) is not None:
                _say(note)
        if checkpoint is not None:
            _say(f"resuming from {checkpoint}")
        return _train_and_save(trainer, config, run_mask, masking, checkpoint, stop)
