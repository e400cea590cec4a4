"""What each stage costs at the model sizes people use: models built from real configs, random weights.

A model's costs (forward, bytes recorded, reduction, a training step) depend on its shape, not its
weights, so each shape is built from its published config with random weights: nothing is
downloaded. Per shape, over the same demo records cut to `--tokens` tokens:

- collect: recording tok/s against the bare forward pass over the same batches (best of
  `--repeats`), and the bytes written;
- ica: the whole `fn-analyze ica` command on the recorded folder (one ICA over all layers, and with
  `--per-layer`), wall time and the process's peak resident memory; and the ICA with no cache (its
  passes run the model: `fn-analyze ica --model --dataset`), in this process (peak: the GPU's memory
  on CUDA, the growth of this process's resident memory on the CPU);
- one masked training step: LoRA (r=16) on every linear layer, 10% of each layer's MLP neurons
  switched off by the mask hooks, a batch of `--train-batch` x `--train-length` tokens; the second
  step's time (the first warms up) and, on CUDA, the peak GPU memory.

    python bench/scale.py --cpu                  # SmolLM2-135M and Qwen2.5-0.5B shapes, 2,000 tokens (minutes)
    python bench/scale.py --device cuda --shapes llama-3.2-1b,llama-3.1-8b --tokens 20000

Prints one row per shape, then `scale: ratio=X`: recording over bare forward of the largest shape run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from fn_analyze.demo_data import write_demo_data
from fn_analyze.record.collect import CollectConfig, load_recording, plan_collection, record_shards, write_manifest
from shared.masked_model import MaskedModel
from shared.masks import MaskFile, Network
from shared.models import load_tokenizer, model_info

sys.path.insert(0, str(Path(__file__).parent))
from collect_vs_forward import bare_forward, synchronize  # noqa: E402

# The published configs' shapes (hidden, MLP, layers, heads, key-value heads, vocabulary).
SHAPES: dict[str, PretrainedConfig] = {
    "smollm2-135m": LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}
CPU_SHAPES = "smollm2-135m,qwen2.5-0.5b"
MASKED_SHARE = 0.10  # of each layer's MLP neurons, switched off during the training step


@dataclass
class Row:
    shape: str
    parameters: float  # billions
    tokens: int
    bare_tok_s: float
    record_tok_s: float
    gb_written: float
    ica_minutes: dict[str, float]
    ica_peak_gb: dict[str, float]
    step_seconds: float
    step_peak_gb: float | None

    def line(self) -> str:
        ica = ", ".join(
            f"ica {mode} {self.ica_minutes[mode]:.2f} min / {self.ica_peak_gb[mode]:.2f} GB"
            for mode in self.ica_minutes
        )
        step = f"masked LoRA step {self.step_seconds:.2f} s"
        if self.step_peak_gb is not None:
            step += f" / {self.step_peak_gb:.1f} GB on the GPU"
        return (
            f"{self.shape}: {self.parameters:.2f}B parameters, {self.tokens:,} tokens; bare forward "
            f"{self.bare_tok_s:,.0f} tok/s, recording {self.record_tok_s:,.0f} tok/s "
            f"({self.record_tok_s / self.bare_tok_s:.3f}), {self.gb_written:.2f} GB written; {ica}; {step}"
        )


def build_model(shape: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The shape's model with seeded random weights, made directly on `device` (an 8B model is
    initialized on the GPU in seconds, on the CPU in minutes)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(SHAPES[shape], dtype=dtype)
    model.config.name_or_path = f"random-{shape}"
    return model.eval()


def folder_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9


def timed_peak(command: list[str]) -> tuple[float, float]:
    """(minutes, peak resident GB) of a command run in its own process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    minutes = (time.perf_counter() - start) / 60
    if os.waitstatus_to_exitcode(status) != 0:
        error = process.stderr.read().decode()[-2000:] if process.stderr else ""
        raise SystemExit(f"{' '.join(command)} failed: {error}")
    return minutes, usage.ru_maxrss / 2**20  # KiB on Linux


def cache_free_ica(
    config: CollectConfig, model: torch.nn.Module, tokenizer, components: int, device: torch.device
) -> tuple[float, float]:
    """(minutes, peak GB) of the global ICA whose passes run the model (`fn-analyze ica --model`), in this
    process: the peak is the GPU's on CUDA, else the growth of this process's resident memory."""
    from fn_analyze.networks.ica import NetworkICA
    from fn_analyze.record.model_rows import model_rows

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    NetworkICA(n_components=components, keep_unstable=True, device=str(device)).fit(
        model_rows(config, model, tokenizer)
    )
    minutes = (time.perf_counter() - start) / 60
    if device.type == "cuda":
        return minutes, torch.cuda.max_memory_allocated(device) / 1e9
    return minutes, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20


def random_mask(model: torch.nn.Module, name: str, seed: int) -> MaskFile:
    """One network: MASKED_SHARE of every layer's neurons, drawn at random."""
    info = model_info(model, name)
    rng = np.random.default_rng(seed)
    count = max(1, int(MASKED_SHARE * info.intermediate_size))
    layers = {
        layer: tuple(sorted(int(i) for i in rng.choice(info.intermediate_size, count, replace=False)))
        for layer in range(info.n_layers)
    }
    network = Network(id=0, layers=layers)
    return MaskFile(model=info, source={"bench": "scale.py random mask"}, networks=(network,))


def masked_training_step(
    model: torch.nn.Module, name: str, batch: int, length: int, device: torch.device
) -> tuple[float, float | None]:
    """Seconds of the second LoRA step with the mask on, and the peak GPU memory (CUDA only)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = 0.0
    with MaskedModel(peft_model, random_mask(model, name, seed=0), "key"):
        for _ in range(2):
            synchronize(device)
            start = time.perf_counter()
            loss = peft_model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    peft_model.unload()
    return seconds, peak


def measure(shape: str, args: argparse.Namespace, data: Path, work: Path, device: torch.device) -> Row:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build_model(shape, dtype, device)
    parameters = sum(p.numel() for p in model.parameters()) / 1e9
    tokenizer = load_tokenizer("smollm2-135m")  # its ids lie inside every shape's vocabulary
    acts = work / f"acts-{shape}"
    config = CollectConfig(
        dataset=str(data),
        out=acts,
        model=f"random-{shape}",
        batch_size=args.batch_size,
        max_tokens=args.tokens,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        overwrite=True,
    )
    plan = plan_collection(config, tokenizer)
    recording = load_recording(plan, model)
    bare_tokens, bare_seconds = min((bare_forward(plan, model) for _ in range(args.repeats)), key=lambda r: r[1])
    record_seconds = float("inf")
    for _ in range(args.repeats):
        shutil.rmtree(acts, ignore_errors=True)
        synchronize(device)
        start = time.perf_counter()
        shards = record_shards(plan, recording)
        synchronize(device)
        record_seconds = min(record_seconds, time.perf_counter() - start)
    manifest = write_manifest(plan, recording, shards)
    record_tokens, gb_written = int(manifest["n_tokens"]), folder_gb(acts)
    ica_minutes, ica_peak = {}, {}
    cli = [sys.executable, "-m", "fn_analyze.cli", "ica", "--activations", str(acts), "--no-register", "--overwrite"]
    cli += ["--n-components", str(args.components), "--device", str(device), "--keep-unstable"]
    for mode, flags in (("global", []), ("per-layer", ["--per-layer"])):
        out = work / f"{shape}-{mode}.json"
        ica_minutes[mode], ica_peak[mode] = timed_peak([*cli, *flags, "--out", str(out)])
    ica_minutes["no-cache"], ica_peak["no-cache"] = cache_free_ica(config, model, tokenizer, args.components, device)
    step_seconds, step_peak = masked_training_step(
        model, f"random-{shape}", args.train_batch, args.train_length, device
    )
    shutil.rmtree(acts, ignore_errors=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Row(
        shape=shape,
        parameters=parameters,
        tokens=record_tokens,
        bare_tok_s=bare_tokens / bare_seconds,
        record_tok_s=record_tokens / record_seconds,
        gb_written=gb_written,
        ica_minutes=ica_minutes,
        ica_peak_gb=ica_peak,
        step_seconds=step_seconds,
        step_peak_gb=step_peak,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help=f"the CPU mode: {CPU_SHAPES} on the CPU")
    parser.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cpu", help="cpu, cuda")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens recorded per shape")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--components", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="best of; the first run also warms up")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-length", type=int, default=128)
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu else args.device)
    shapes = (args.shapes or (CPU_SHAPES if device.type == "cpu" else ",".join(SHAPES))).split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {', '.join(unknown)}; use any of {', '.join(SHAPES)}")
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
        records = max(40, args.tokens // 60)  # demo records hold about 60-100 tokens each
        data = write_demo_data(work / "demo", seed=0, n_collect=records, n_train=1, n_eval=1)["collect"]
        rows = []
        for shape in shapes:
            rows.append(measure(shape, args, data, work, device))
            print(rows[-1].line(), flush=True)
        print(f"scale: ratio={rows[-1].record_tok_s / rows[-1].bare_tok_s:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
