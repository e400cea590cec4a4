"""What does the mask cost a training step? The same fn-train run with and without a mask.

Both variants run through `fn_train.trainer.train` (the masked one with the down-projection
hooks, the frozen-slice restore after each optimizer step and the checkpoint record). Each
step is timed from the Trainer's step begin to step end (forward, backward, optimizer step
and restore); the first `--warmup` steps of each run are left out. A round is one run of
each variant, back to back, in alternating order; its ratio is the masked run's median step
time over the unmasked run's. On a shared machine the load drifts between rounds, so the
figure is the median of the rounds' ratios (a pair sees the same load), not the ratio of
pooled medians.

    python bench/mask_overhead.py --mask-file mask_artifacts/smollm2-demo.json --data demo/train.csv

Ends with one line `mask_overhead: ratio=X`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from fn_train.config import TrainConfig
from fn_train.trainer import train


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.durations.append(time.perf_counter() - self._start)


def timed_run(args: argparse.Namespace, masked: bool, folder: Path) -> list[float]:
    timer = StepTimer()
    config = TrainConfig(
        dataset_name_or_path=args.data,
        output_dir=folder,
        model_name_or_path=args.model,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
        use_peft=not args.no_peft,
        weight_decay=0.01,  # so that the restore has something to undo
        logging_steps=args.steps,
        save_steps=10 * args.steps,
        device=args.device,
        mask_file=Path(args.mask_file) if masked else None,
        networks=args.networks if masked else None,
    )
    train(config, callbacks=[timer])
    return timer.durations[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="demo/train.csv")
    parser.add_argument("--mask-file", default="mask_artifacts/smollm2-demo.json")
    parser.add_argument("--networks", default=None, help="default: every network of the file")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-peft", action="store_true", help="full fine-tuning instead of LoRA")
    args = parser.parse_args()

    times: dict[bool, list[float]] = {False: [], True: []}
    ratios = []
    with tempfile.TemporaryDirectory(prefix="mask-overhead-") as scratch:
        for round_index in range(args.rounds):
            order = (False, True) if round_index % 2 == 0 else (True, False)
            medians = {}
            for masked in order:
                durations = timed_run(args, masked, Path(scratch) / f"r{round_index}-{'mask' if masked else 'none'}")
                times[masked] += durations
                medians[masked] = statistics.median(durations)
            ratios.append(medians[True] / medians[False])
            print(
                f"round {round_index}: unmasked {medians[False]:.3f} s/step, masked {medians[True]:.3f} s/step, "
                f"ratio {ratios[-1]:.3f}"
            )
    print(f"unmasked: median {statistics.median(times[False]):.3f} s/step over {len(times[False])} steps")
    print(f"masked:   median {statistics.median(times[True]):.3f} s/step over {len(times[True])} steps")
    print(f"round ratios: {', '.join(f'{r:.3f}' for r in sorted(ratios))}")
    print(f"mask_overhead: ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
