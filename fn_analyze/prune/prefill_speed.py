"""Prefill throughput of models measured side by side: tokens/s of a forward pass over a batch of prompts.

The models run in the same process on the same batch, in rounds: each round times one forward pass of
each, the order reversed every other round, so a load that comes and goes (other processes on the cores)
falls on every model alike. Each model's figure is the median over the rounds, and the speedup is the
median of the rounds' own ratios (each ratio is of two passes taken moments apart). As a prompt's
prefill runs, only the last position's logits are computed: with a vocabulary of tens of thousands,
the output projection of every position would otherwise weigh as much as the MLPs being pruned.
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any

import torch
from torch import nn


def _last_logits_only(model: nn.Module) -> dict[str, int]:
    """The keyword that makes `model` compute the last position's logits only (transformers renamed it)."""
    parameters = inspect.signature(model.forward).parameters
    name = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), None)
    return {} if name is None else {name: 1}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_speed(
    models: dict[str, nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor, rounds: int, reference: str
) -> dict[str, Any]:
    """Each model's prefill tokens/s on the batch `input_ids` (sequences x positions; median over `rounds`
    interleaved rounds, after one warm-up pass each) and each one's speedup over `reference` (median of
    the rounds' ratios), with the batch's shape and what the figures count: every position of the padded
    batch is a token processed."""
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    names = list(models)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for model in models.values():
            model(input_ids=ids, attention_mask=mask, **_last_logits_only(model))
        for index in range(rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                model = models[name]
                _synchronize(device)
                started = time.perf_counter()
                model(input_ids=ids, attention_mask=mask, **_last_logits_only(model))
                _synchronize(device)
                seconds[name].append(time.perf_counter() - started)
    positions = ids.numel()
    rates = {name: [positions / s for s in times] for name, times in seconds.items()}
    return {
        "tokens_per_second": {name: statistics.median(values) for name, values in rates.items()},
        "speedup": {
            name: statistics.median(r / b for r, b in zip(rates[name], rates[reference], strict=True))
            for name in names
            if name != reference
        },
        "reference": reference,
        "rounds": rounds,
        "batch": {"sequences": int(ids.shape[0]), "positions": int(ids.shape[1]), "real_tokens": int(mask.sum())},
        "device": str(device),
        "dtype": str(next(first.parameters()).dtype).removeprefix("torch."),
        "method": (
            f"median of {rounds} rounds, each one forward pass per model in alternating order after one warm-up "
            "pass each; last position's logits only; tokens: every position of the padded batch"
        ),
        "seconds": seconds,
    }


def speed_text(speed: dict[str, Any]) -> str:
    """One line, e.g. `prefill tokens/s (16 x 58 batch, 915 real tokens; cpu float32; median of 7
    interleaved rounds, speedup the median of the rounds' ratios): original 137, pruned 178 (1.22x)`."""
    batch = speed["batch"]
    rates = speed["tokens_per_second"]
    figures = ", ".join(
        f"{name} {rate:,.0f}" + (f" ({speed['speedup'][name]:.2f}x)" if name in speed["speedup"] else "")
        for name, rate in rates.items()
    )
    return (
        f"prefill tokens/s ({batch['sequences']} x {batch['positions']} batch, {batch['real_tokens']} real tokens; "
        f"{speed['device']} {speed['dtype']}; median of {speed['rounds']} interleaved rounds, speedup the median "
        f"of the rounds' ratios): {figures}"
    )
