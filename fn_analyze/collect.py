"""`fn-analyze collect`: record the input of every captured down-projection, token by token."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fn_analyze.activations import ShardWriter
from shared import __version__
from shared.arch import find_down_projections
from shared.constants import EMBEDDED_MODEL_NAME, MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, PARTIAL_SUFFIX, SHARD_GLOB
from shared.data import check_answers_fit, detect_format, load_dataset_any, render_text, resolve_template, to_example
from shared.device import choose_device, choose_dtype
from shared.digests import file_digest
from shared.errors import UserError
from shared.hooks import captured_down_proj_inputs
from shared.jsonio import write_json_atomic
from shared.models import check_model_reachable, load_causal_lm, load_tokenizer, model_info

log = logging.getLogger(__name__)


@dataclass
class CollectConfig:
    dataset: str
    out: Path
    model: str = EMBEDDED_MODEL_NAME
    split: str | None = None  # default: "train" when the dataset has it, else its first split
    data_format: str = "auto"
    template_format: str = "auto"  # rendered as training renders it (see shared.data)
    layers: str | None = None  # e.g. "0,2:5,8"; default every layer
    max_tokens: int | None = None
    max_length: int = 256
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"
    shard_size_mb: int = 512
    overwrite: bool = False
    trust_remote_code: bool = False  # run Python code shipped with the model (off: such models are refused)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("max_length", "batch_size", "shard_size_mb"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"--max-tokens must be at least 1, got {self.max_tokens}")


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """`"0,2:5,8"` -> [0, 2, 3, 4, 8] (slices as in Python); None -> every layer."""
    if text is None or text.strip().lower() in ("", "all"):
        return list(range(n_layers))
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if ":" in part:
                start, _, stop = part.partition(":")
                layers.update(range(n_layers)[slice(int(start) if start else None, int(stop) if stop else None)])
            else:
                layers.add(int(part))
        except ValueError:
            raise UserError(f"--layers {text!r}: {part!r} is not a layer index or start:stop range") from None
    bad = sorted(layer for layer in layers if not 0 <= layer < n_layers)
    if bad or not layers:
        raise UserError(f"--layers {text!r}: layer {bad[0] if bad else '?'} out of range (model has {n_layers} layers)")
    return sorted(layers)


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a folder that holds something not ours; clear leftovers of an unfinished run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the activations")
    if out.exists():
        ours = (
            {MANIFEST_NAME}
            | {p.name for p in out.glob(SHARD_GLOB)}
            | {p.name for p in out.glob(SHARD_GLOB + PARTIAL_SUFFIX)}
        )
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if foreign:
            raise UserError(f"--out {out} exists and holds {foreign[0]}, which is not ours; give a new or empty folder")
        if (out / MANIFEST_NAME).exists() and not overwrite:
            raise UserError(f"--out {out} already holds activations; pass --overwrite or give another folder")
        for name in ours:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def collect(config: CollectConfig) -> dict[str, Any]:
    """Run the model over the dataset and write the activations folder; returns the manifest."""
    check_model_reachable(config.model)
    dataset = load_dataset_any(config.dataset, config.split)
    split = config.split or ("train" if "train" in dataset else next(iter(dataset)))
    records = dataset[split]
    fmt = detect_format(records.column_names, config.data_format, source=f"dataset {config.dataset}")
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    # Right padding keeps every real token at its true position (models derive positions
    # from the cache position, not the attention mask, so left padding would shift them).
    tokenizer.padding_side = "right"
    template = resolve_template(config.template_format, tokenizer)
    examples = [to_example(record, fmt) for record in records]
    check_answers_fit(examples, template, tokenizer, config.max_length, "--max-length", f"dataset {config.dataset}")
    texts = [render_text(example, template, tokenizer) for example in examples]

    device = choose_device(config.device)
    dtype = choose_dtype(config.dtype, device.type)
    model = load_causal_lm(config.model, dtype, device, trust_remote_code=config.trust_remote_code)
    projections = find_down_projections(model)
    info = model_info(model, config.model, projections)
    layers = parse_layers(config.layers, len(projections))
    n_columns = len(layers) * info.intermediate_size
    row_bytes = n_columns * 2
    rows_per_shard = max(1, config.shard_size_mb * 2**20 // row_bytes)
    # Tokenized once: the lengths give the estimate, the batches are padded from these ids.
    sequences = tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]
    budget = config.max_tokens or sum(len(ids) for ids in sequences)
    print(
        f"collect: {len(texts)} sequences, up to {budget} tokens x {n_columns} neurons "
        f"({len(layers)} layers) -> about {budget * row_bytes / 2**30:.2f} GiB of float16 in {config.out}"
    )

    _prepare_out(config.out, config.overwrite)
    writer = ShardWriter(config.out, n_columns, rows_per_shard)
    backbone = model.base_model  # the transformer without the LM head: its logits are not needed
    n_tokens = 0
    n_sequences = 0
    progress = tqdm(total=budget, unit="tok", desc="collect")
    try:
        with captured_down_proj_inputs(projections, layers) as store, torch.inference_mode():
            for start in range(0, len(sequences), config.batch_size):
                if config.max_tokens is not None and n_tokens >= config.max_tokens:
                    break
                batch = tokenizer.pad(
                    {"input_ids": sequences[start : start + config.batch_size]}, return_tensors="pt"
                ).to(device)
                backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                real = batch["attention_mask"].bool()
                rows = torch.cat([store[layer][real] for layer in layers], dim=1)
                sequence = torch.arange(start, start + real.shape[0], device=device)[:, None].expand_as(real)[real]
                position = (real.cumsum(dim=1) - 1)[real]
                take = rows.shape[0]
                if config.max_tokens is not None:
                    take = min(take, config.max_tokens - n_tokens)
                writer.write(
                    rows[:take].to(torch.float16).cpu().numpy(),
                    batch["input_ids"][real][:take].to(torch.int32).cpu().numpy(),
                    sequence[:take].cpu().numpy(),
                    position[:take].to(torch.int32).cpu().numpy(),
                )
                store.clear()
                n_tokens += take
                n_sequences = int(sequence[take - 1]) + 1 if take else n_sequences
                progress.update(take)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    if n_tokens == 0:
        shutil.rmtree(config.out, ignore_errors=True)
        raise UserError(f"dataset {config.dataset} gave no token to record; check that its records hold text")
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "created_by": f"functional-networks {__version__}",
        "model": info.to_dict(),
        "layers": layers,
        "columns": "layer-major: column = position_in_layers * intermediate_size + neuron",
        "dtype": "float16",
        "n_tokens": n_tokens,
        "n_sequences": n_sequences,
        "dataset": {
            "source": config.dataset,
            "digest": file_digest(Path(config.dataset)) if Path(config.dataset).is_file() else None,
            "split": split,
            "format": fmt.value,
            "template": template,
            "n_records": len(texts),
        },
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "shards": shards,
    }
    write_json_atomic(config.out / MANIFEST_NAME, manifest)
    print(f"collect: wrote {n_tokens} tokens from {n_sequences} sequences in {len(shards)} shard(s) to {config.out}")
    return manifest
