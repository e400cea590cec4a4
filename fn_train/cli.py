"""`fn-train` (alias `fnsft`): supervised fine-tuning with functional networks masked.

Flags keep the seed tool's underscore spelling (`--model_name_or_path`); each also
answers to its hyphenated form (`--model-name-or-path`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from shared.cli import handle_errors, setup_logging
from shared.constants import EMBEDDED_MODEL_NAME
from shared.errors import UserError


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


def _config_keys(command: Any) -> dict[str, tuple[str, bool]]:
    """Every spelling of every option, as a config-file key (`mask-file`, `mask_file`,
    `no_peft`, ...) -> (parameter name, whether the key means the value as given
    (False: an off-switch such as `no_peft: true`, which sets use_peft to false))."""
    keys: dict[str, tuple[str, bool]] = {}
    for param in command.params:
        if param.param_type_name != "option" or param.name == "config":
            continue
        for opts, as_given in ((param.opts, True), (param.secondary_opts, False)):
            for opt in opts:
                key = opt.lstrip("-")
                keys[key] = keys[key.replace("-", "_")] = (str(param.name), as_given)
    return keys


def read_config_file(path: Path, command: Any) -> dict[str, Any]:
    """The settings of a YAML (or JSON) file as click's defaults: flags on the command line
    override them. Keys are flag names in either spelling."""
    import yaml

    if not path.is_file():
        raise UserError(f"--config {path} does not exist; give a YAML file of flag: value lines")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"--config {path} must hold flag: value lines (a mapping), not a {type(raw).__name__}")
    keys = _config_keys(command)
    defaults: dict[str, Any] = {}
    for key, value in raw.items():
        if str(key) not in keys:
            raise UserError(f"--config {path}: unknown setting {key!r}; use the flag names of fn-train --help")
        name, as_given = keys[str(key)]
        if not as_given:
            if not isinstance(value, bool):
                raise UserError(f"--config {path}: {key} must be true or false, got {value!r}")
            value = not value
        defaults[name] = value
    return defaults


def _load_config(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    """Eager: runs before the other options are read, so the file's settings become their defaults."""
    if value is not None:
        try:
            ctx.default_map = {**(ctx.default_map or {}), **read_config_file(value, ctx.command)}
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
    return value


def run(
    dataset_name_or_path: Annotated[
        str, flag("dataset_name_or_path", "csv/json/jsonl/parquet file or HF dataset name.")
    ],
    output_dir: Annotated[Path, flag("output_dir", "Where the adapter/model, fn_mask.json and checkpoints go.")],
    model_name_or_path: Annotated[
        str, flag("model_name_or_path", "HF name, local path, or the embedded model.")
    ] = EMBEDDED_MODEL_NAME,
    data_format: Annotated[
        str, flag("data_format", "auto|multiple_choice|qa|alpaca|prompt_completion|prompt_response|messages|text")
    ] = "auto",
    template_format: Annotated[str, flag("template_format", "auto|chat|alpaca|plain")] = "auto",
    completion_only_loss: Annotated[
        bool,
        switch("completion_only_loss", "no_completion_only_loss", "Loss on the answer tokens and EOS only, or on all."),
    ] = True,
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
    warmup_steps: Annotated[
        float, flag("warmup_steps", "Linear warmup: a number of steps, or a share of all steps in (0, 1).")
    ] = 0.0,
    weight_decay: Annotated[float, flag("weight_decay", "AdamW weight decay.")] = 0.0,
    max_grad_norm: Annotated[float, flag("max_grad_norm", "Gradient clipping norm.")] = 1.0,
    logging_steps: Annotated[int, flag("logging_steps", "Log every N steps.")] = 10,
    eval_steps: Annotated[Optional[int], flag("eval_steps", "Evaluate every N steps (default: each epoch).")] = None,
    save_steps: Annotated[int, flag("save_steps", "Checkpoint every N steps.")] = 500,
    seed: Annotated[int, flag("seed", "Seed of data split, initialisation and order.")] = 42,
    torch_dtype: Annotated[str, flag("torch_dtype", "auto|float32|float16|bfloat16")] = "auto",
    device: Annotated[str, flag("device", "auto|cpu|cuda|cuda:N|mps")] = "auto",
    trust_remote_code: Annotated[
        bool, switch("trust_remote_code", "no_trust_remote_code", "Run the model folder's own code (off by default).")
    ] = False,
    use_peft: Annotated[bool, switch("use_peft", "no_peft", "LoRA through peft (default) or full fine-tuning.")] = True,
    lora_r: Annotated[int, flag("lora_r", "LoRA rank.")] = 16,
    lora_alpha: Annotated[int, flag("lora_alpha", "LoRA alpha.")] = 32,
    lora_dropout: Annotated[float, flag("lora_dropout", "LoRA dropout.")] = 0.05,
    lora_target_modules: Annotated[
        str, flag("lora_target_modules", "all-linear or comma-separated module names.")
    ] = "all-linear",
    use_4bit: Annotated[
        bool, switch("use_4bit", "no_4bit", "QLoRA: base weights in 4-bit NF4 (bitsandbytes).")
    ] = False,
    use_8bit: Annotated[bool, switch("use_8bit", "no_8bit", "Base weights in 8-bit (bitsandbytes).")] = False,
    merge_adapter: Annotated[
        bool, switch("merge_adapter", "no_merge_adapter", "Save the base with LoRA merged in, not the adapter.")
    ] = False,
    mask_file: Annotated[Optional[Path], flag("mask_file", "Mask file written by `fn-analyze ica`.")] = None,
    mask_mode: Annotated[
        Optional[str], flag("mask_mode", "key: switch the networks off; complement: keep only them.")
    ] = None,
    networks: Annotated[Optional[str], flag("networks", "Network ids, e.g. 0,3,5-7 (default all).")] = None,
    ablation: Annotated[
        str, flag("ablation", "What the mask does to its neurons: zero, mean (their mean activation), scale.")
    ] = "zero",
    scale_factor: Annotated[
        Optional[float], flag("scale_factor", "With --ablation scale: the factor (default 2.0).")
    ] = None,
    means_from: Annotated[
        Optional[Path],
        flag("means_from", "With --ablation mean: activations folder of the means (default: the training data)."),
    ] = None,
    ica_on_the_fly: Annotated[
        bool,
        switch(
            "ica_on_the_fly", "no_ica_on_the_fly", "Compute the mask from the training data first (saved in output)."
        ),
    ] = False,
    ica_components: Annotated[int, flag("ica_components", "ICA components for --ica-on-the-fly.")] = 20,
    ica_max_tokens: Annotated[int, flag("ica_max_tokens", "Training tokens --ica-on-the-fly records.")] = 20000,
    bake_mask: Annotated[
        bool,
        switch(
            "bake_mask", "no_bake_mask", "Write the mask into the saved weights (zero/scaled columns; means as bias)."
        ),
    ] = False,
    resume_from_checkpoint: Annotated[
        Optional[str], flag("resume_from_checkpoint", "A checkpoint folder, or last; its mask must be this run's.")
    ] = None,
    report_to: Annotated[str, flag("report_to", "none, wandb, tensorboard, ...")] = "none",
    verbose: Annotated[bool, switch("verbose", "quiet", "Log progress details.")] = False,
    config: Annotated[
        Optional[Path],
        typer.Option(
            "--config",
            help="YAML file of flag: value settings; flags given here override it.",
            is_eager=True,
            callback=_load_config,
        ),
    ] = None,
) -> None:
    """Fine-tune with TRL's SFTTrainer while a mask switches functional networks off or isolates them."""
    params = dict(locals())
    params.pop("config")  # already read: its settings arrived as the other parameters' values
    setup_logging(params.pop("verbose"))
    from shared.models import check_model_reachable

    check_model_reachable(model_name_or_path)  # offline, an unknown model fails before the heavy imports
    from fn_train.config import TrainConfig
    from fn_train.trainer import train

    train(TrainConfig(**params))


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command(help=run.__doc__)(handle_errors("fn-train")(run))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
