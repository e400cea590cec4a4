"""`fn-train` (alias `fnsft`): supervised fine-tuning with functional networks masked.

Flags keep the seed tool's underscore spelling (`--model_name_or_path`); each also
answers to its hyphenated form (`--model-name-or-path`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from shared.cli import setup_logging, user_errors_exit
from shared.constants import EMBEDDED_MODEL_NAME


def flag(name: str, help: str) -> typer.models.OptionInfo:
    """An option under both spellings: `--name_with_underscores` and `--name-with-hyphens`."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    return typer.Option(*names, help=help)


def switch(on: str, off: str, help: str) -> typer.models.OptionInfo:
    """A boolean that can be turned on and off, under both spellings."""
    decls = [f"--{on}/--{off}"]
    hyphenated = f"--{on.replace('_', '-')}/--{off.replace('_', '-')}"
    if hyphenated != decls[0]:
        decls.append(hyphenated)
    return typer.Option(*decls, help=help)


def run(
    dataset_name_or_path: Annotated[
        str, flag("dataset_name_or_path", "csv/json/jsonl/parquet file or HF dataset name.")
    ],
    output_dir: Annotated[Path, flag("output_dir", "Where the adapter/model, fn_mask.json and checkpoints go.")],
    model_name_or_path: Annotated[
        str, flag("model_name_or_path", "HF name, local path, or the embedded model.")
    ] = EMBEDDED_MODEL_NAME,
    data_format: Annotated[
        str, flag("data_format", "auto|qa|alpaca|prompt_completion|prompt_response|messages|text")
    ] = "auto",
    template_format: Annotated[str, flag("template_format", "auto|chat|alpaca|plain")] = "auto",
    validation_split: Annotated[
        float, flag("validation_split", "Share held out for evaluation when the data has no validation split.")
    ] = 0.0,
    max_seq_length: Annotated[int, flag("max_seq_length", "Truncate examples to this many tokens.")] = 512,
    num_train_epochs: Annotated[float, flag("num_train_epochs", "Epochs over the training set.")] = 1.0,
    max_steps: Annotated[int, flag("max_steps", "If > 0, stop after this many steps.")] = -1,
    per_device_train_batch_size: Annotated[int, flag("per_device_train_batch_size", "Training batch per device.")] = 4,
    per_device_eval_batch_size: Annotated[int, flag("per_device_eval_batch_size", "Evaluation batch per device.")] = 4,
    gradient_accumulation_steps: Annotated[int, flag("gradient_accumulation_steps", "Batches per optimizer step.")] = 1,
    learning_rate: Annotated[float, flag("learning_rate", "Peak learning rate.")] = 2e-4,
    weight_decay: Annotated[float, flag("weight_decay", "AdamW weight decay.")] = 0.0,
    max_grad_norm: Annotated[float, flag("max_grad_norm", "Gradient clipping norm.")] = 1.0,
    logging_steps: Annotated[int, flag("logging_steps", "Log every N steps.")] = 10,
    eval_steps: Annotated[Optional[int], flag("eval_steps", "Evaluate every N steps (default: each epoch).")] = None,
    save_steps: Annotated[int, flag("save_steps", "Checkpoint every N steps.")] = 500,
    seed: Annotated[int, flag("seed", "Seed of data split, initialisation and order.")] = 42,
    torch_dtype: Annotated[str, flag("torch_dtype", "auto|float32|float16|bfloat16")] = "auto",
    device: Annotated[str, flag("device", "auto|cpu|cuda|cuda:N|mps")] = "auto",
    use_peft: Annotated[bool, switch("use_peft", "no_peft", "LoRA through peft (default) or full fine-tuning.")] = True,
    lora_r: Annotated[int, flag("lora_r", "LoRA rank.")] = 16,
    lora_alpha: Annotated[int, flag("lora_alpha", "LoRA alpha.")] = 32,
    lora_dropout: Annotated[float, flag("lora_dropout", "LoRA dropout.")] = 0.05,
    lora_target_modules: Annotated[
        str, flag("lora_target_modules", "all-linear or comma-separated module names.")
    ] = "all-linear",
    mask_file: Annotated[Optional[Path], flag("mask_file", "Mask file written by `fn-analyze ica`.")] = None,
    mask_mode: Annotated[
        Optional[str], flag("mask_mode", "key: switch the networks off; complement: keep only them.")
    ] = None,
    networks: Annotated[Optional[str], flag("networks", "Network ids, e.g. 0,3,5-7 (default all).")] = None,
    report_to: Annotated[str, flag("report_to", "none, wandb, tensorboard, ...")] = "none",
    verbose: Annotated[bool, switch("verbose", "quiet", "Log progress details.")] = False,
) -> None:
    """Fine-tune with TRL's SFTTrainer while a mask switches functional networks off or isolates them."""
    params = dict(locals())
    setup_logging(params.pop("verbose"))
    from shared.models import check_model_reachable

    check_model_reachable(model_name_or_path)  # offline, an unknown model fails before the heavy imports
    from fn_train.config import TrainConfig
    from fn_train.trainer import train

    train(TrainConfig(**params))


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command(help=run.__doc__)(user_errors_exit(run))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
