"""QLoRA: the base model's weights in 4-bit NF4 or 8-bit (bitsandbytes), LoRA trained on top."""

from __future__ import annotations

import torch

from fn_train.config import TrainConfig
from shared.device import bitsandbytes_available
from shared.errors import ParameterError


def quantization_config(config: TrainConfig, dtype: torch.dtype):
    """The BitsAndBytesConfig for use_4bit/use_8bit, None without them; refused with one
    line where bitsandbytes does not load."""
    if not config.quantized:
        return None
    if not bitsandbytes_available():
        flag = "{" + config.quantization + "}"
        raise ParameterError(
            f"{flag} needs bitsandbytes, which does not load on this platform; "
            f"drop {flag} (LoRA on the unquantized model) or install a bitsandbytes build for it"
        )
    from transformers import BitsAndBytesConfig

    if config.use_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # QLoRA's data type
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)
