"""The configuration of one training run, and fn-train's options: each field's default and help
text are the command line's (fn_train/cli.py builds the command from them); flags keep the seed
tool's underscore spelling."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from shared.ablation_modes import check_ablation
from shared.constants import EMBEDDED_MODEL_NAME
from shared.errors import ParameterError
from shared.keystone import parse_keep
from shared.options import option

# key and complement switch neurons off; tune trains only the chosen neurons' own weights (fn_train/run_mask.py).
TRAIN_MODES: tuple[str, ...] = ("key", "complement", "tune")
RANDOM_NEURONS: tuple[str, ...] = ("layer", "magnitude")  # what a random control set is matched on


@dataclass
class TrainConfig:
    """One fine-tuning run. Checked when made; an error names the parameter (`mask_mode`, `use_peft=False`),
    which fn-train words as its flag (`--mask-mode`, `--no_peft`)."""

    dataset_name_or_path: str = option(help="csv/json/jsonl/parquet file or HF dataset name.")
    output_dir: Path = option(help="Where the adapter/model, fn_mask.json and checkpoints go.")
    model_name_or_path: str = option(EMBEDDED_MODEL_NAME, help="HF name, local path, or the embedded model.")
    data_format: str = option(
        "auto", help="auto, multiple_choice, qa, alpaca, prompt_completion, prompt_response, messages or text"
    )
    # auto: the tokenizer's chat template when it has one, else plain
    template_format: str = option("auto", help="auto|chat|alpaca|plain")
    completion_only_loss: bool = option(
        True, off="no_completion_only_loss", help="Loss on the answer tokens and EOS only, or on all."
    )
    validation_split: float = option(  # used only when the dataset has no validation/test split
        0.0, help="Share held out for evaluation when the data has no validation split."
    )
    max_seq_length: int = option(512, help="Truncate examples to this many tokens.")
    num_train_epochs: float = option(1.0, help="Epochs over the training set.")
    max_steps: int = option(-1, help="If > 0, stop after this many steps.")  # overrides num_train_epochs
    per_device_train_batch_size: int = option(4, help="Training batch per device.")
    per_device_eval_batch_size: int = option(4, help="Evaluation batch per device.")
    gradient_accumulation_steps: int = option(1, help="Batches per optimizer step.")
    learning_rate: float = option(2e-4, help="Peak learning rate.")  # a LoRA rate; use ~1e-5 with --no_peft
    warmup_steps: float = option(0.0, help="Linear warmup: a number of steps, or a share of all steps in (0, 1).")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    max_grad_norm: float = option(1.0, help="Gradient clipping norm.")
    logging_steps: int = option(10, help="Log every N steps.")
    # None: evaluate once per epoch when there is validation data
    eval_steps: int | None = option(None, help="Evaluate every N steps (default: each epoch).")
    save_steps: int = option(500, help="Checkpoint every N steps and at the last one (0: no checkpoints).")
    seed: int = option(42, help="Seed of data split, initialisation and order.")
    torch_dtype: str = option("auto", help="auto|float32|float16|bfloat16")
    device: str = option("auto", help="auto|cpu|cuda|cuda:N|mps")
    trust_remote_code: bool = option(  # never run a model folder's own code unless asked
        False, off="no_trust_remote_code", help="Run the model folder's own code (off by default)."
    )
    use_peft: bool = option(True, off="no_peft", help="LoRA through peft (default) or full fine-tuning.")
    lora_r: int = option(16, help="LoRA rank.")
    lora_alpha: int = option(32, help="LoRA alpha.")
    lora_dropout: float = option(0.05, help="LoRA dropout.")
    # peft resolves all-linear per architecture (every linear layer but the head)
    lora_target_modules: str = option("all-linear", help="all-linear or comma-separated module names.")
    use_4bit: bool = option(False, off="no_4bit", help="QLoRA: base weights in 4-bit NF4 (bitsandbytes).")
    use_8bit: bool = option(False, off="no_8bit", help="Base weights in 8-bit (bitsandbytes).")
    merge_adapter: bool = option(
        False,
        off="no_merge_adapter",
        help="Save the base with LoRA (or tune mode's deltas) merged in, not the adapter.",
    )
    mask_file: Path | None = option(None, hyphenated=True, help="Mask file written by `fn-analyze ica`.")
    mask_mode: str | None = option(  # key is the default when there is a mask
        None,
        hyphenated=True,
        help="key: switch the networks off; complement: keep only them; tune: train only their neurons' own weights.",
    )
    networks: str | None = option(None, hyphenated=True, help="Network ids, e.g. 0,3,5-7, or massive (default all).")
    # The control of --mask-mode tune: as many neurons per layer (and per magnitude bin: magnitude) as the
    # networks hold, drawn from --seed as fn-analyze evaluate draws its random sets; recorded in fn_mask.json.
    random_neurons: str | None = option(
        None,
        hyphenated=True,
        help="With --mask-mode tune: tune random neurons of the networks' counts, matched on layer or magnitude.",
    )
    # The keystone regime (shared.keystone): of the selected networks' neurons, only the strongest by |z| in their
    # maps are switched off, kept or tuned (and matched by --random-neurons); recorded in fn_mask.json.
    keystone: int | float | None = option(
        None,
        text=True,
        hyphenated=True,
        help="Only the networks' strongest neurons by |z|: a count (50) or a fraction of their neurons (0.01, 1%).",
    )
    ablation: str = option(
        "zero", hyphenated=True, help="What the mask does to its neurons: zero, mean (their mean activation), scale."
    )
    scale_factor: float | None = option(None, hyphenated=True, help="With --ablation scale: the factor (default 2.0).")
    # With --ablation mean: an activations folder of the model to take the means from; default: a pass of the
    # base model over the first MEANS_MAX_TOKENS tokens of the training data, as training renders it.
    means_from: Path | None = option(
        None,
        hyphenated=True,
        help="With --ablation mean: activations folder of the means (default: the training data).",
    )
    ica_on_the_fly: bool = option(  # fn-analyze collect + ica on the training data
        False,
        off="no_ica_on_the_fly",
        hyphenated=True,
        help="Compute the mask from the training data first (saved in output).",
    )
    ica_components: int = option(20, help="ICA components for --ica-on-the-fly.")
    ica_max_tokens: int = option(20000, help="Training tokens --ica-on-the-fly records.")
    bake_mask: bool = option(  # masked neurons' down-projection columns written as zeros: no hook needed to load
        False,
        off="no_bake_mask",
        hyphenated=True,
        help="Write the mask into the saved weights (zero/scaled columns; means as bias).",
    )
    resume_from_checkpoint: str | None = option(  # "last": the latest complete checkpoint
        None, help="A checkpoint folder, or last; its mask must be this run's."
    )
    # The Trainer's name. Without it (or a resume), a folder holding an earlier run's output is refused.
    overwrite_output_dir: bool = option(
        False, off="no_overwrite_output_dir", help="Replace an earlier run's output in --output_dir (checkpoints too)."
    )
    # The Trainer's trackers, comma-separated
    report_to: str = option("none", help="none, wandb, tensorboard, ...")

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self._check_mask_flags()
        self._check_model_flags()
        if not 0.0 <= self.validation_split < 1.0:
            raise ParameterError("{validation_split} must lie in [0, 1), got {value}", value=self.validation_split)
        for name in (
            "max_seq_length",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "lora_r",
            "ica_components",
            "ica_max_tokens",
        ):
            if getattr(self, name) < 1:
                raise ParameterError("{" + name + "} must be at least 1, got {value}", value=getattr(self, name))
        if self.save_steps < 0:
            raise ParameterError(
                "{save_steps} must be at least 0 (0: no checkpoints), got {value}", value=self.save_steps
            )
        if self.overwrite_output_dir and self.resume_from_checkpoint is not None:
            raise ParameterError(
                "{overwrite_output_dir} removes the checkpoints that {resume_from_checkpoint} continues from; "
                "keep one of them"
            )
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ParameterError("{eval_steps} must be at least 1, got {value}", value=self.eval_steps)
        self._check_schedule()

    def _check_schedule(self) -> None:
        """What the optimizer and scheduler would refuse only after the model loaded."""
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ParameterError(
                "{learning_rate} must be a positive number such as 2e-4, got {value}", value=self.learning_rate
            )
        if self.max_steps != -1 and self.max_steps < 1:
            raise ParameterError(
                "{max_steps} must be at least 1, or -1 to train {num_train_epochs}, got {value}", value=self.max_steps
            )
        if self.max_steps == -1 and not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise ParameterError(
                "{num_train_epochs} must be a positive number, got {value}", value=self.num_train_epochs
            )
        if self.warmup_steps < 0 or not (self.warmup_steps < 1 or float(self.warmup_steps).is_integer()):
            raise ParameterError(
                "{warmup_steps} must be a whole number of steps or a share of the steps in [0, 1), got {value}",
                value=self.warmup_steps,
            )
        for name in ("weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ParameterError("{" + name + "} must be 0 or more, got {value}", value=getattr(self, name))
        if not 0 <= self.lora_dropout < 1:
            raise ParameterError("{lora_dropout} must lie in [0, 1), got {value}", value=self.lora_dropout)

    def _check_mask_flags(self) -> None:
        if self.mask_file is not None:
            self.mask_file = Path(self.mask_file)
            if self.ica_on_the_fly:
                raise ParameterError("{mask_file} and {ica_on_the_fly} both give a mask; keep one of them")
        if self.has_mask:
            self.mask_mode = self.mask_mode or "key"
        else:
            for name, given in (
                ("mask_mode", self.mask_mode is not None),
                ("networks", self.networks is not None),
                ("keystone", self.keystone is not None),
                ("bake_mask", self.bake_mask),
                ("ablation", self.ablation != "zero"),
                ("scale_factor", self.scale_factor is not None),
                ("means_from", self.means_from is not None),
            ):
                if given:
                    flag = "{" + name + "}"
                    raise ParameterError(f"{flag} given without {{mask_file}}; add {{mask_file}} or drop {flag}")
        if self.keystone is not None:
            self.keystone = parse_keep(self.keystone, "keystone")
        if self.mask_mode is not None and self.mask_mode not in TRAIN_MODES:
            raise ParameterError("{mask_mode} {value!r} is unknown; use key, complement or tune", value=self.mask_mode)
        if self.random_neurons is not None:
            if self.random_neurons not in RANDOM_NEURONS:
                raise ParameterError(
                    "{random_neurons} {value!r} is unknown; use layer or magnitude", value=self.random_neurons
                )
            if not self.tunes:
                raise ParameterError(
                    "{random_neurons} is the control of {mask_mode} tune; add {mask_mode} tune or drop it"
                )
        if self.tunes:
            self._check_tune_flags()
        self.scale_factor = check_ablation(self.ablation, self.scale_factor)
        if self.means_from is not None:
            self.means_from = Path(self.means_from)
            if self.ablation != "mean":
                raise ParameterError(
                    "{means_from} is given but {ablation} is {value}; add {ablation} mean or drop {means_from}",
                    value=self.ablation,
                )
        if self.bake_mask and self.use_peft and not self.merge_adapter:
            raise ParameterError(
                "{bake_mask} writes full weights, but LoRA saves an adapter; "
                "add {merge_adapter} or use {use_peft=False}"
            )

    def _check_tune_flags(self) -> None:
        """Tune mode switches nothing off and trains its own deltas, not LoRA: the flags of either are refused."""
        for name, given in (
            ("ablation", self.ablation != "zero"),
            ("bake_mask", self.bake_mask),
            ("use_peft=False", not self.use_peft),
            # LoRA's settings, given other than their defaults: tune mode would ignore them.
            *((f.name, getattr(self, f.name) != f.default) for f in fields(self) if f.name.startswith("lora_")),
        ):
            if given:
                raise ParameterError(
                    "{" + name + "} does not apply to {mask_mode} tune, which trains the neurons' own weights "
                    "(no LoRA, nothing switched off); drop it"
                )

    def _check_model_flags(self) -> None:
        if self.use_4bit and self.use_8bit:
            raise ParameterError("{use_4bit} and {use_8bit} exclude each other; keep one of them")
        if self.tunes:  # its deltas train on a quantized base and merge like an adapter
            return
        if self.quantized and not self.use_peft:
            raise ParameterError(
                "{" + self.quantization + "} freezes the base weights in quantized form; drop {use_peft=False}"
            )
        if self.merge_adapter and not self.use_peft:
            raise ParameterError(
                "{merge_adapter} merges a LoRA adapter, but {use_peft=False} trains no adapter; drop one of them"
            )

    @property
    def has_mask(self) -> bool:
        return self.mask_file is not None or self.ica_on_the_fly

    @property
    def tunes(self) -> bool:
        return self.mask_mode == "tune"

    @property
    def trains_lora(self) -> bool:
        return self.use_peft and not self.tunes

    @property
    def quantized(self) -> bool:
        return self.use_4bit or self.use_8bit

    @property
    def quantization(self) -> str:
        """The parameter that quantizes the base (`use_4bit` or `use_8bit`), for messages."""
        return "use_4bit" if self.use_4bit else "use_8bit"

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
