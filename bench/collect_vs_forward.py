"""Recording throughput against what bounds it: the bare forward pass of the same model, or the disk.

Both model sides run the same loaded model over the same padded batches (same batch size,
sequence length, dtype, device). The bare side pads each batch and runs the backbone
forward; the recording side is collect's own record stage (`record_shards`: readying the
folder, padding, forward, copying hooks, every float16 HDF5 write up to closing the last
shard), not its data and model stages, whose results both sides share; it writes beside the
next batch (collect's writer thread), and the in-loop side writes each batch before the next
(the synchronous reference). The disk side is one plain sequential write of the recording's
bytes into the same folder, fsynced at the end as collect fsyncs each shard: the rate the
disk allows, in tokens/s of this model's rows. Runs alternate, best of --repeats each. Beside the
wall-clock rates, each model side's CPU seconds (the process's, every thread): on a machine
shared with other jobs the wall clock measures the other jobs too, the CPU time much less so.
Both sides run with collect's thread settings (its wait policy; set OMP_WAIT_POLICY to time another).

    python bench/collect_vs_forward.py [--records 60] [--tiny-records 2000] [--tiny-batch-sizes 8,64]
        [--model smollm2-135m] [--device cpu] [--dtype float32]

Prints tokens/s for the model (`--model`, default the embedded one) and a tiny model
(`--tiny-batch-sizes ""` leaves it out); ends with one line `collect_vs_forward: ratio=X`:
recording over min(bare forward, disk), the `--model`. On CUDA the model sides synchronize
before reading the clock.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

# The project before torch, as in `fn-analyze collect`: its OpenMP threads then sleep when they run
# out of work (OMP_WAIT_POLICY=PASSIVE, shared/threads.py), on both sides. Imported after torch, the
# bench would time libgomp's spinning default instead, which the command never runs with.
import shared  # noqa: F401

# isort: split
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fn_analyze.demo_data import write_demo_data
from fn_analyze.record.collect import (
    CollectConfig,
    CollectPlan,
    Recording,
    load_recording,
    plan_collection,
    record_shards,
)
from shared.device import choose_device, choose_dtype
from shared.models import load_causal_lm, load_tokenizer


def bare_forward(plan: CollectPlan, model: torch.nn.Module) -> tuple[int, float]:
    """(tokens, seconds) of padding and running the backbone over collect's batches."""
    sequences, batch_size = plan.sequences, plan.config.batch_size
    device = next(model.parameters()).device
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(sequences), batch_size):
            batch = plan.tokenizer.pad({"input_ids": sequences[first : first + batch_size]}, return_tensors="pt")
            model.base_model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,  # as collect runs it
            )
            tokens += int(batch["attention_mask"].sum())
    synchronize(device)
    return tokens, time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so the clock reads finished work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recorded(plan: CollectPlan, recording: Recording, overlap: bool) -> tuple[int, float]:
    """(tokens, seconds) of collect's record stage, into a folder removed afterwards."""
    synchronize(recording.recorder.device)
    start = time.perf_counter()
    try:
        tokens = record_shards(plan, recording, overlap=overlap).n_tokens
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(plan.config.out, ignore_errors=True)
    return tokens, seconds


def disk_write(folder: Path, n_bytes: int) -> float:
    """Seconds of one plain sequential write of `n_bytes` incompressible bytes into `folder`, in
    8 MiB blocks, fsynced at the end; the file is removed afterwards."""
    block = np.random.default_rng(0).bytes(8 << 20)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "disk-rate.bin"
    start = time.perf_counter()
    try:
        with path.open("wb", buffering=0) as handle:
            for first in range(0, n_bytes, len(block)):
                handle.write(block[: n_bytes - first])
            os.fsync(handle.fileno())
        return time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)


def measure(name: str, config: CollectConfig, model: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Every side's rate in tokens/s (bare, record, in_loop, disk), and the disk's in MiB/s; printed."""
    plan = plan_collection(config)  # the data, rendered and tokenized once, as collect does
    recording = load_recording(plan, model)
    n_tokens = sum(len(ids) for ids in plan.sequences)  # every real token: no sample, no budget
    row_bytes = recording.n_columns * 2  # float16
    sides = {
        "bare": lambda: bare_forward(plan, model),
        "record": lambda: recorded(plan, recording, overlap=True),
        "in_loop": lambda: recorded(plan, recording, overlap=False),
        "disk": lambda: (n_tokens, disk_write(config.out.parent / "disk", n_tokens * row_bytes)),
    }
    best = dict.fromkeys(sides, float("inf"))
    cpu = dict.fromkeys(sides, float("inf"))
    tokens = {}
    for _ in range(repeats):
        for side, run in sides.items():
            started = time.process_time()
            tokens[side], seconds = run()
            cpu[side] = min(cpu[side], time.process_time() - started)
            best[side] = min(best[side], seconds)
    assert len(set(tokens.values())) == 1, tokens
    rate = {side: n_tokens / seconds for side, seconds in best.items()}
    bound = min(rate["bare"], rate["disk"])
    print(
        f"{name}: {n_tokens} tokens x {row_bytes / 1024:,.0f} KiB, batch {config.batch_size}; "
        f"bare forward {rate['bare']:,.0f} tok/s, disk {rate['disk']:,.0f} tok/s "
        f"({rate['disk'] * row_bytes / 2**20:,.0f} MiB/s), recording {rate['record']:,.0f} tok/s "
        f"(in the loop: {rate['in_loop']:,.0f}) -> {rate['record'] / bound:.3f} of "
        f"{'bare' if rate['bare'] <= rate['disk'] else 'disk'} (in the loop {rate['in_loop'] / bound:.3f})"
    )
    print(
        f"{name}: CPU seconds bare {cpu['bare']:.1f}, recording {cpu['record']:.1f}, in the loop "
        f"{cpu['in_loop']:.1f} -> bare over recording {cpu['bare'] / cpu['record']:.3f} "
        f"(in the loop {cpu['bare'] / cpu['in_loop']:.3f})"
    )
    return {
        **rate,
        "bound": bound,
        "disk_mib_s": rate["disk"] * row_bytes / 2**20,
        "cpu_ratio": cpu["bare"] / cpu["record"],
    }


def tiny_model_dir(folder: Path) -> Path:
    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=60, help="demo records for the embedded model")
    parser.add_argument("--tiny-records", type=int, default=2000, help="demo records for the tiny model")
    parser.add_argument("--batch-size", type=int, default=8, help="embedded model")
    parser.add_argument("--tiny-batch-sizes", default="8,64", help="tiny model; its per-batch cost is tiny too")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m", help="the model of the closing ratio")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--dtype", default="float32", help="float32, float16, bfloat16, auto")
    args = parser.parse_args()
    device = choose_device(args.device)
    dtype = choose_dtype(args.dtype, device.type)
    work = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    try:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {dtype}")
        rates = {}
        sizes = [int(b) for b in args.tiny_batch_sizes.split(",") if b.strip()]
        tiny = str(tiny_model_dir(work / "tiny")) if sizes else ""
        runs = [(f"tiny, batch {b}", tiny, args.tiny_records, b) for b in sizes]
        runs.append((args.model, args.model, args.records, args.batch_size))
        for name, model_name, records, batch_size in runs:
            data = write_demo_data(work / "data", seed=0, n_collect=records, n_train=1, n_eval=1)["collect"]
            model = load_causal_lm(model_name, dtype, device)
            config = CollectConfig(
                dataset=str(data),
                out=work / "acts",
                model=model_name,
                batch_size=batch_size,
                device=str(device),
                dtype=str(dtype).removeprefix("torch."),
            )
            rates[name] = measure(name, config, model, args.repeats)
        for name, rate in rates.items():
            print(f"{name}: {rate['record'] / rate['bound']:.3f} of min(bare forward, disk)")
        main_rates = rates[args.model]
        print(f"disk_write_mib_s: {main_rates['disk_mib_s']:.0f}")
        print(f"in_loop_ratio: {main_rates['in_loop'] / main_rates['bound']:.3f}")
        print(f"cpu_ratio: {main_rates['cpu_ratio']:.3f}")
        print(f"collect_vs_forward: ratio={main_rates['record'] / main_rates['bound']:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
