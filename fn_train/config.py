"""The configuration of one training run; flags keep the seed tool's underscore spelling."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    validation_split: float = 0.0  # used only when the dataset has no validation/test split
    max_seq_length: int = 512
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4  # a LoRA rate; use ~1e-5 with --no_peft
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate once per epoch when there is validation data
    save_steps: int = 500
    seed: int = 42
    torch_dtype: str = "auto"
    device: str = "auto"
    use_peft: bool = True  # LoRA through peft; --no_peft trains every weight
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"
    mask_file: Path | None = None
    mask_mode: str | None = None  # key (default with --mask-file) or complement
    networks: str | None = None  # e.g. "0,3,5-7"; default every network of the file
    report_to: str = "none"

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.mask_file is not None:
            self.mask_file = Path(self.mask_file)
            self.mask_mode = self.mask_mode or "key"
        elif self.mask_mode is not None or self.networks is not None:
            flag = "--mask-mode" if self.mask_mode is not None else "--networks"
            raise UserError(f"{flag} given without --mask-file; add --mask-file or drop {flag}")
        if self.mask_mode is not None and self.mask_mode not in MASK_MODES:
            raise UserError(f"--mask-mode {self.mask_mode!r} is unknown; use key or complement")
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
        ):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise UserError(f"--eval_steps must be at least 1, got {self.eval_steps}")

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
