"""Does tuning only the networks' neurons teach the task and keep what the model knew? Four ways to
fine-tune the embedded model, with the same data, steps, batch and seed:

- `tune-networks`: `--mask-mode tune` on the union of the mask file's networks;
- `tune-random`: the same counts of random neurons per layer and magnitude bin (`--random-neurons magnitude`);
- `lora`: LoRA r=16 on every linear layer (fn-train's default);
- `full`: full fine-tuning.

The data come from the demo's generator (fn_analyze.demo_data): the task is three of its families
(arithmetic, sentiment, continuation: training rows and held-out rows with other questions); the
fourth, `facts`, is never trained on and measures retention (as plain text: question and answer on
one line, loss on every token). Per arm: trainable parameters, peak
RSS at the end of training (each arm runs in its own process), seconds per step, the last logged
training loss, the answer loss on the held-out task rows and on the facts rows before (the base)
and after, and the size of the saved output (deltas, adapter or model). Each arm's figures are
written to `<out>/<arm>.json` as it ends, and the table to `<out>/results.json`.

    OMP_NUM_THREADS=2 python bench/tune.py --mask-file mask_artifacts/smollm2-demo.json --out runs/bench-tune

Ends with one line `tune: ratio=X`: the retention loss increase of tune-networks over LoRA's.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

ARMS: dict[str, dict] = {
    "tune-networks": {"mask_mode": "tune"},
    "tune-random": {"mask_mode": "tune", "random_neurons": "magnitude"},
    "lora": {},
    "full": {"use_peft": False},
}
TASK_FAMILIES = ("arithmetic", "sentiment", "continuation")
RETENTION_FAMILY = "facts"


def write_data(folder: Path, n_train: int, n_eval: int, seed: int) -> dict[str, Path]:
    """Task rows to train on, held-out task rows (other questions) and retention rows, as csv."""
    import csv

    from fn_analyze.demo_data import generate

    train = generate(n_train, seed, TASK_FAMILIES)
    seen = {qa.question for qa in train}
    held_out = [qa for qa in generate(4 * n_eval, seed + 1, TASK_FAMILIES) if qa.question not in seen][:n_eval]
    retention = generate(n_eval, seed + 2, (RETENTION_FAMILY,))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"train": folder / "train.csv", "eval": folder / "eval.csv", "retention": folder / "facts.csv"}
    for name, rows in (("train", train), ("eval", held_out)):
        with paths[name].open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["question", "answer"])
            writer.writerows([qa.question, qa.answer] for qa in rows)
    # Plain text (loss on every token), not chat-formatted answers: learning the task's short answer
    # format lowers the loss of any chat-formatted answer, which would hide what was forgotten.
    with paths["retention"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([f"{qa.question} {qa.answer}"] for qa in retention)
    return paths


class Recorder(TrainerCallback):
    """The logged training losses, the step times and the peak RSS when training ends."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.steps: list[float] = []
        self.peak_rss_mib = 0.0
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.steps.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_arm(args: argparse.Namespace, arm: str) -> dict:
    """Train one arm and score it next to the base; returns its figures."""
    import torch

    from fn_analyze.config import TunedEvalConfig
    from fn_analyze.measure.tuned import evaluate_tuned
    from fn_train.config import TrainConfig
    from fn_train.trainer import train

    paths = {key: Path(args.out) / "data" / name for key, name in (("train", "train.csv"), ("eval", "eval.csv"))}
    retention = Path(args.out) / "data" / "facts.csv"
    folder = Path(args.out) / arm
    settings = dict(ARMS[arm])
    if settings.get("mask_mode") == "tune":
        settings["mask_file"] = Path(args.mask_file)
    recorder = Recorder()
    config = TrainConfig(
        dataset_name_or_path=str(paths["train"]),
        output_dir=folder,
        model_name_or_path=args.model,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
        learning_rate=args.learning_rate[arm],
        weight_decay=0.01,
        logging_steps=1,
        save_steps=10 * args.steps,  # no checkpoint: the bench measures training
        seed=args.seed,
        torch_dtype="float32",
        device=args.device,
        **settings,
    )
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    train(config, callbacks=[recorder])
    seconds = time.perf_counter() - started
    scored = evaluate_tuned(
        TunedEvalConfig(
            dataset=str(paths["eval"]),
            tuned=[folder],
            retention=str(retention),
            model=args.model,
            out=folder / "eval.json",
            limit=args.eval_rows,
            dtype="float32",
            device=args.device,
        )
    )
    task, kept = scored["datasets"]
    return {
        "arm": arm,
        "learning_rate": args.learning_rate[arm],
        "trainable_parameters": _trainable(folder),
        "peak_rss_mib": round(recorder.peak_rss_mib),
        "seconds_per_step": round(sorted(recorder.steps)[len(recorder.steps) // 2], 3),  # the median step
        "train_seconds": round(seconds, 1),
        "final_train_loss": recorder.losses[-1],
        "task_loss_base": task["base"]["loss"],
        "task_loss": task["tuned"][0]["loss"],
        "retention_loss_base": kept["base"]["loss"],
        "retention_loss": kept["tuned"][0]["loss"],
        "saved_mib": round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20, 2),
    }


def _trainable(folder: Path) -> int:
    """Trainable parameters: those of the deltas or adapter saved, or every parameter of the full model."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    return total


def table(rows: list[dict]) -> str:
    header = (
        f"{'arm':<14} {'trainable':>11} {'peak RSS':>9} {'s/step':>7} {'train loss':>10} "
        f"{'task loss':>17} {'retention loss':>17} {'saved':>9}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['arm']:<14} {r['trainable_parameters']:>11,} {r['peak_rss_mib']:>5} MiB {r['seconds_per_step']:>7.2f} "
            f"{r['final_train_loss']:>10.3f} {r['task_loss_base']:>7.3f} -> {r['task_loss']:<6.3f} "
            f"{r['retention_loss_base']:>7.3f} -> {r['retention_loss']:<6.3f} {r['saved_mib']:>5.2f} MiB"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mask-file", default="mask_artifacts/smollm2-demo.json")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="runs/bench-tune")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of " + ", ".join(ARMS))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--train-rows", type=int, default=200)
    parser.add_argument("--eval-rows", type=int, default=40)
    # Each method's usual rate: LoRA's default 2e-4, full fine-tuning 1e-5; the deltas are weights
    # of a few neurons, tuned at a rate between the two.
    parser.add_argument("--lr-tune", type=float, default=1e-4)
    parser.add_argument("--lr-lora", type=float, default=2e-4)
    parser.add_argument("--lr-full", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # one arm, in this process (the parent's child)
    args = parser.parse_args()
    args.learning_rate = {
        "tune-networks": args.lr_tune,
        "tune-random": args.lr_tune,
        "lora": args.lr_lora,
        "full": args.lr_full,
    }
    out = Path(args.out)
    if args.arm:
        result = run_arm(args, args.arm)
        (out / f"{args.arm}.json").write_text(json.dumps(result, indent=2))
        return
    write_data(out / "data", args.train_rows, args.eval_rows, args.seed)
    rows = []
    for arm in args.arms.split(","):
        child = [sys.executable, *sys.argv, "--arm", arm]
        subprocess.run(child, check=True, stdout=(out / f"{arm}.log").open("w"), stderr=subprocess.STDOUT)
        rows.append(json.loads((out / f"{arm}.json").read_text()))
        (out / "results.json").write_text(json.dumps({"args": sys.argv[1:], "arms": rows}, indent=2))
        print(table(rows).splitlines()[-1] if len(rows) > 1 else table(rows), flush=True)
    print(table(rows))
    by_arm = {r["arm"]: r for r in rows}
    if {"tune-networks", "lora"} <= by_arm.keys():
        increase = {arm: by_arm[arm]["retention_loss"] - by_arm[arm]["retention_loss_base"] for arm in by_arm}
        ratio = increase["tune-networks"] / increase["lora"] if abs(increase["lora"]) > 1e-9 else float("nan")
        print(f"tune: ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
