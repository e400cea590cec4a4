"""Device, dtype and quantization availability: one function each, logged once."""

from __future__ import annotations

import functools
import logging

import torch

from shared.errors import UserError

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@functools.cache
def choose_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; anything else is checked, not trusted."""
    if requested == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        try:
            device = torch.device(requested)
        except RuntimeError as exc:
            raise UserError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {requested!r} asked for but CUDA is not available; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"device {requested!r} asked for but MPS is not available; use --device cpu")
    log.info("device: %s", device)
    return device


@functools.cache
def choose_dtype(requested: str, device_type: str) -> torch.dtype:
    """`auto`: bfloat16 on CUDA where supported, float32 elsewhere (CPU half precision is slow)."""
    if requested == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        else:
            dtype = torch.float32
    else:
        if requested not in _DTYPES:
            raise UserError(f"unknown dtype {requested!r}; use auto, float32, float16 or bfloat16")
        dtype = _DTYPES[requested]
    log.info("dtype: %s", dtype)
    return dtype


@functools.cache
def bitsandbytes_available() -> bool:
    """Whether bitsandbytes imports and can quantize on this platform."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # a broken native library raises more than ImportError
        log.info("bitsandbytes unavailable: %s", exc)
        return False
    return True
