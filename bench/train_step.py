"""What sets the demo's fn-train step on the CPU: torch's thread count and LoRA's dropout, on the same batches.

The README tour's fn-train settings (the embedded model, `demo/train.csv`, batch 4, LoRA r 16 on every
linear layer, networks 0 and 3 of the mask file off) run through `fn_train.trainer.train`. Each batch's
forward and backward pass is run once per variant, one variant after the other in an order that turns
each batch, and timed: 1 and 2 threads (`torch.set_num_threads`), LoRA dropout on (p = 0.05, the
default) and off. So every variant sees the same batches and, on a shared machine, the same load.
The gradients of the variants before the last add up: what this trains is not a model to keep.
The optimizer step (the same for every variant) is timed apart, per step.

    python bench/train_step.py --data demo/train.csv --mask-file mask_artifacts/smollm2-demo.json

Prints each variant's median and ends with `train_step: ratio=X`: the median one-thread pass over the
median two-thread pass, both with dropout (what choosing one thread on an idle 2-core machine costs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

# The project before torch, as in fn-train: its threads sleep when idle (OMP_WAIT_POLICY=PASSIVE).
from fn_train.config import TrainConfig
from fn_train.trainer import train

# isort: split
import torch
import transformers
from torch import nn
from transformers import TrainerCallback

VARIANTS = [(threads, dropout) for dropout in (True, False) for threads in (1, 2)]


def set_dropout(model: nn.Module, on: bool, saved: dict[str, nn.Module]) -> None:
    """LoRA's dropout modules swapped for nn.Identity (what PEFT builds for lora_dropout 0) or back."""
    for name, module in model.named_modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for adapter in list(dropouts):
            key = f"{name}.{adapter}"
            saved.setdefault(key, dropouts[adapter])
            dropouts[adapter] = saved[key] if on else nn.Identity()


class OptimizerTimer(TrainerCallback):
    """Wall time from the end of the last variant's backward pass to the end of the step."""

    def __init__(self) -> None:
        self.backward_done = 0.0
        self.durations: list[float] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.durations.append(time.perf_counter() - self.backward_done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo/train.csv")
    parser.add_argument("--mask-file", default="mask_artifacts/smollm2-demo.json")
    parser.add_argument("--networks", default="0,3")
    parser.add_argument("--steps", type=int, default=24, help="Batches (each run once per variant).")
    parser.add_argument("--warmup", type=int, default=2, help="First batches left out.")
    args = parser.parse_args()

    times: dict[tuple[int, bool], list[float]] = {variant: [] for variant in VARIANTS}
    saved: dict[str, nn.Module] = {}
    optimizer = OptimizerTimer()
    original = transformers.Trainer.training_step
    batches = 0

    def every_variant(self, model, inputs, *rest, **kwargs):
        nonlocal batches
        turned = VARIANTS[batches % len(VARIANTS) :] + VARIANTS[: batches % len(VARIANTS)]
        for threads, dropout in turned:
            model.zero_grad(set_to_none=True)
            torch.set_num_threads(threads)
            set_dropout(model, dropout, saved)
            start = time.perf_counter()
            loss = original(self, model, inputs, *rest, **kwargs)
            if batches >= args.warmup:
                times[(threads, dropout)].append(time.perf_counter() - start)
        optimizer.backward_done = time.perf_counter()
        batches += 1
        return loss

    transformers.Trainer.training_step = every_variant
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            dataset_name_or_path=args.data,
            output_dir=Path(tmp) / "run",
            model_name_or_path="smollm2-135m",
            max_steps=args.steps,
            per_device_train_batch_size=4,
            save_steps=10 * args.steps,
            logging_steps=args.steps,
            mask_file=Path(args.mask_file),
            mask_mode="key",
            networks=args.networks,
        )
        load = os.getloadavg()[0]
        train(config, callbacks=[optimizer])
    print(f"load average (1 min) before {load:.1f}, after {os.getloadavg()[0]:.1f}")
    medians = {variant: statistics.median(seconds) for variant, seconds in times.items()}
    for (threads, dropout), median in medians.items():
        print(
            f"{threads} thread{'s' if threads > 1 else ''}, LoRA dropout {'on ' if dropout else 'off'}: "
            f"forward and backward {median:.3f} s (median of {len(times[(threads, dropout)])} batches)"
        )
    print(f"optimizer step and the rest of a step: {statistics.median(optimizer.durations[args.warmup :]):.3f} s")
    print(f"train_step: ratio={medians[(1, True)] / medians[(2, True)]:.2f}")


if __name__ == "__main__":
    main()
