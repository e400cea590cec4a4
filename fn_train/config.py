"""The configuration of one training run; flags keep the seed tool's underscore spelling."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.ablation import check_ablation
from shared.constants import EMBEDDED_MODEL_NAME
from shared.errors import UserError
from shared.masks import MASK_MODES


@dataclass
class TrainConfig:
    dataset_name_or_path: str
    output_dir: Path
    model_name_or_path: str = EMBEDDED_MODEL_NAME
    data_format: str = "auto"
    template_format: str = "auto"  # auto: the tokenizer's chat template when it has one, else plain
    completion_only_loss: bool = True  # loss on the answer tokens (and EOS) only; False: on every token
    validation_split: float = 0.0  # used only when the dataset has no validation/test split
    max_seq_length: int = 512
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4  # a LoRA rate; use ~1e-5 with --no_peft
    warmup_steps: float = 0.0  # linear warmup: a whole number of steps, or a share of all steps in (0, 1)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate once per epoch when there is validation data
    save_steps: int = 500
    seed: int = 42
    torch_dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False  # never run a model folder's own code unless asked
    use_peft: bool = True  # LoRA through peft; --no_peft trains every weight
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"  # peft resolves it per architecture (every linear layer but the head)
    use_4bit: bool = False  # QLoRA: base weights in 4-bit NF4 (bitsandbytes), LoRA on top
    use_8bit: bool = False
    merge_adapter: bool = False  # save the base with the LoRA update merged in, instead of the adapter
    mask_file: Path | None = None
    mask_mode: str | None = None  # key (default with a mask) or complement
    networks: str | None = None  # e.g. "0,3,5-7"; default every network of the file
    ablation: str = "zero"  # what the mask does to its neurons: zero, mean (their mean activation), scale
    scale_factor: float | None = None  # with --ablation scale (default 2.0: amplify)
    # With --ablation mean: an activations folder of the model to take the means from; default: a pass of the
    # base model over the first MEANS_MAX_TOKENS tokens of the training data, as training renders it.
    means_from: Path | None = None
    ica_on_the_fly: bool = False  # compute the mask from the training data first (fn-analyze collect + ica)
    ica_components: int = 20
    ica_max_tokens: int = 20000  # tokens of training data the on-the-fly ICA sees
    bake_mask: bool = False  # write masked neurons' down-projection columns as zeros: no hook needed to load
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "last" (the latest complete one)
    report_to: str = "none"  # the Trainer's trackers: none, tensorboard, wandb, ... (comma-separated)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self._check_mask_flags()
        self._check_model_flags()
        if not 0.0 <= self.validation_split < 1.0:
            raise UserError(f"--validation_split must lie in [0, 1), got {self.validation_split}")
        for name in (
            "max_seq_length",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
            "lora_r",
            "ica_components",
            "ica_max_tokens",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise UserError(f"--eval_steps must be at least 1, got {self.eval_steps}")
        self._check_schedule()

    def _check_schedule(self) -> None:
        """What the optimizer and scheduler would refuse only after the model loaded."""
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"--learning_rate must be a positive number such as 2e-4, got {self.learning_rate}")
        if self.max_steps != -1 and self.max_steps < 1:
            raise UserError(f"--max_steps must be at least 1, or -1 to train --num_train_epochs, got {self.max_steps}")
        if self.max_steps == -1 and not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise UserError(f"--num_train_epochs must be a positive number, got {self.num_train_epochs}")
        if self.warmup_steps < 0 or not (self.warmup_steps < 1 or float(self.warmup_steps).is_integer()):
            raise UserError(
                f"--warmup_steps must be a whole number of steps or a share of the steps in [0, 1), "
                f"got {self.warmup_steps}"
            )
        for name in ("weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must lie in [0, 1), got {self.lora_dropout}")

    def _check_mask_flags(self) -> None:
        if self.mask_file is not None:
            self.mask_file = Path(self.mask_file)
            if self.ica_on_the_fly:
                raise UserError("--mask-file and --ica-on-the-fly both give a mask; keep one of them")
        if self.has_mask:
            self.mask_mode = self.mask_mode or "key"
        else:
            for flag, given in (
                ("--mask-mode", self.mask_mode is not None),
                ("--networks", self.networks is not None),
                ("--bake-mask", self.bake_mask),
                ("--ablation", self.ablation != "zero"),
                ("--scale-factor", self.scale_factor is not None),
                ("--means-from", self.means_from is not None),
            ):
                if given:
                    raise UserError(f"{flag} given without --mask-file; add --mask-file or drop {flag}")
        if self.mask_mode is not None and self.mask_mode not in MASK_MODES:
            raise UserError(f"--mask-mode {self.mask_mode!r} is unknown; use key or complement")
        self.scale_factor = check_ablation(self.ablation, self.scale_factor)
        if self.means_from is not None:
            self.means_from = Path(self.means_from)
            if self.ablation != "mean":
                raise UserError(
                    f"--means-from is given but --ablation is {self.ablation}; add --ablation mean or drop --means-from"
                )
        if self.bake_mask and self.use_peft and not self.merge_adapter:
            raise UserError(
                "--bake-mask writes full weights, but LoRA saves an adapter; add --merge_adapter or use --no_peft"
            )

    def _check_model_flags(self) -> None:
        if self.use_4bit and self.use_8bit:
            raise UserError("--use_4bit and --use_8bit exclude each other; keep one of them")
        if self.quantized and not self.use_peft:
            raise UserError(f"{self.quantization_flag} freezes the base weights in quantized form; drop --no_peft")
        if self.merge_adapter and not self.use_peft:
            raise UserError("--merge_adapter merges a LoRA adapter, but --no_peft trains no adapter; drop one of them")

    @property
    def has_mask(self) -> bool:
        return self.mask_file is not None or self.ica_on_the_fly

    @property
    def quantized(self) -> bool:
        return self.use_4bit or self.use_8bit

    @property
    def quantization_flag(self) -> str:
        return "--use_4bit" if self.use_4bit else "--use_8bit"

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
