"""`fn-analyze collect`: record the input of every captured down-projection, token by token."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fn_analyze.config import CollectConfig
from fn_analyze.record.activations import (
    Activations,
    ShardWriter,
    completed_shards,
    damaged_shards,
    manifest_entry,
    open_manifest,
    shard_rank_and_index,
)
from fn_analyze.record.background_writer import BackgroundWriter, HostCopy, InLoopWriter
from fn_analyze.record.row_buffers import HostRowBuffers
from fn_analyze.record.writer_lock import sole_writer
from shared import __version__
from shared.arch import DownProjection, find_down_projections
from shared.constants import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, PARTIAL_SUFFIX, SHARD_GLOB, WRITER_LOCK_NAME
from shared.data import check_answers_fit, render_text
from shared.device import choose_device, choose_dtype
from shared.digests import bytes_digest, file_digest
from shared.distributed import Ranks, process_group, rank_device, ranks_from_env
from shared.errors import Interrupted, ParameterError, UserError, is_disk_full
from shared.examples import Examples, load_examples
from shared.hooks import pre_hooks
from shared.jsonio import write_json_atomic
from shared.masks import ModelInfo
from shared.models import check_model_reachable, load_causal_lm, load_tokenizer, model_info
from shared.numbers import parse_numbers
from shared.progress import progress_bar, progress_log
from shared.signals import stop_on_signals

log = logging.getLogger(__name__)
say = progress_log("collect")


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """`"0,2-5,8"` -> [0, 2, 3, 4, 5, 8] (`shared.numbers`: ranges include their end); None or "all" -> every layer."""
    if text is None or text.strip().lower() in ("", "all"):
        return list(range(n_layers))
    layers = parse_numbers(text, "layers")
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise ParameterError(
            "{layers} {value!r}: layer {bad} is out of range; the model has layers 0-{last}",
            value=text, bad=bad[0], last=n_layers - 1,
        )  # fmt: skip
    return layers


def _check_out(out: Path, overwrite: bool) -> Activations | None:
    """Before any work: `out` must be a new folder, or one holding only what collect writes
    and no finished run unless --overwrite, or a finished run with damaged shards (returned:
    this run re-records them)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the activations")
    if out.exists():
        ours = (
            {MANIFEST_NAME, WRITER_LOCK_NAME}
            | {p.name for p in out.glob(SHARD_GLOB)}
            | {p.name for p in out.glob(SHARD_GLOB + PARTIAL_SUFFIX)}
        )
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if foreign:
            raise UserError(f"--out {out} exists and holds {foreign[0]}, which is not ours; give a new or empty folder")
        if (out / MANIFEST_NAME).exists() and not overwrite:
            finished = open_manifest(out)
            if damaged_shards(finished):
                return finished
            raise UserError(
                f"--out {out} already holds activations (every shard whole); pass --overwrite or give another folder"
            )
    return None


def _prepare_out(out: Path, overwrite: bool, run_key: str) -> None:
    """Make `out` (checked by `_check_out`) ready: resume an interrupted run of the same
    arguments (keep its finished shards, drop unfinished ones), or start afresh."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    finished = list(out.glob(SHARD_GLOB))
    unfinished = list(out.glob(SHARD_GLOB + PARTIAL_SUFFIX))
    if not overwrite:
        ranks = sorted({int(p.name.split("-")[1][1:]) for p in finished})
        if any(shard["run_key"] != run_key for rank in ranks for shard in completed_shards(out, rank)):
            raise UserError(
                f"--out {out} holds shards of an unfinished collect with other arguments; "
                "re-run that command to resume it, or pass --overwrite to start again"
            )
        if finished:
            say.info(f"collect: resuming from {len(finished)} finished shard(s) in {out}")
        finished = []
    for path in finished + unfinished + [out / MANIFEST_NAME]:
        path.unlink(missing_ok=True)


def _disk_full(out: Path, exc: BaseException, kept: int) -> UserError:
    return UserError(
        f"the disk holding {out} is full ({' '.join(str(exc).split())}); the {kept} finished shard(s) are kept: "
        "free some space and re-run the same command to resume"
    )


def _free_bytes(out: Path) -> int:
    """The free space of `out`'s disk, counting what collect's own files in `out` take: a resumed
    run keeps its finished shards (recorded already) and drops the rest, --overwrite drops all."""
    ours = [*out.glob(SHARD_GLOB), *out.glob(SHARD_GLOB + PARTIAL_SUFFIX)] if out.is_dir() else []
    disk = shutil.disk_usage(out if out.exists() else next(p for p in out.parents if p.exists()))
    return disk.free + sum(path.stat().st_size for path in ours)


def _check_disk(out: Path, needed_bytes: float) -> None:
    """Refuse, before anything in `out` changes, a run whose rows the disk cannot hold."""
    free = _free_bytes(out)
    if needed_bytes > free:
        raise UserError(
            f"collect needs about {needed_bytes / 2**30:.2f} GiB but {out} has {free / 2**30:.2f} GiB free; "
            "lower --max-tokens or record fewer tokens per sequence (--tokens-per-sequence, --token-rate)"
        )


@dataclass(frozen=True)
class TokenSample:
    """Which real tokens of a padded batch to record: all of them, at most N per sequence,
    or each with probability r, with or without position 0; drawn from (seed, record index),
    so a resumed or multi-process run picks the same tokens as a plain one."""

    per_sequence: int | None = None
    rate: float | None = None
    seed: int = 0
    skip_first_token: bool = False

    @property
    def subsamples(self) -> bool:
        return self.per_sequence is not None or self.rate is not None or self.skip_first_token

    def to_dict(self) -> dict[str, Any]:
        """What the manifest says of the sample."""
        return {
            "tokens_per_sequence": self.per_sequence,
            "token_rate": self.rate,
            "seed": self.seed,
            "skip_first_token": self.skip_first_token,
        }

    def expected(self, length: int) -> float:
        length = max(0, length - self.skip_first_token)
        if self.per_sequence is not None:
            return min(length, self.per_sequence)
        return length * (self.rate if self.rate is not None else 1.0)

    def keep(self, real: np.ndarray, records: list[int]) -> np.ndarray:
        """(sequences x positions) bool: the tokens to record among the `real` (non-padding) ones."""
        if not self.subsamples:
            return real
        first = int(self.skip_first_token)  # the draws are among positions first..length-1
        lengths = real.sum(axis=1).tolist()
        keep = np.zeros(real.shape, dtype=bool)
        for row, (length, record) in enumerate(zip(lengths, records, strict=True)):
            rng = np.random.default_rng([self.seed, record])
            choices = max(0, length - first)
            if self.per_sequence is not None:
                keep[row, first + rng.choice(choices, min(choices, self.per_sequence), replace=False)] = True
            elif self.rate is not None:
                keep[row, first:length] = rng.random(choices) < self.rate
            else:
                keep[row, first:length] = True
        return keep


class _EveryLayerCopied(Exception):
    """Raised by the last recorded layer's hook to end the forward pass there."""


class RowCopier:
    """Forward pre-hooks that copy, in the hook itself, the kept token rows of each recorded
    layer's down-projection input into one float16 (tokens x layers*intermediate) buffer:
    the input is still in cache there, and no full-precision activation outlives its layer.

    The pass ends at the last recorded layer's down-projection: what the model computes after it
    is never read (with every layer recorded that is one down-projection and the final norm, about
    1% of the pass; with the first 4 of 30 layers, most of it). The hooks run in layer order, as a
    decoder's layers do."""

    def __init__(self, projections: list[DownProjection], layers: list[int], width: int) -> None:
        by_layer = {p.layer: p.module for p in projections}
        self.modules = [by_layer[layer] for layer in layers]
        self.width = width
        self.n_columns = len(self.modules) * width
        self.host_buffers = HostRowBuffers(self.n_columns)
        self._rows: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None

    def _hook(self, slot: int):
        columns = slice(slot * self.width, (slot + 1) * self.width)
        last = slot == len(self.modules) - 1

        def hook(module: torch.nn.Module, args: tuple) -> None:
            assert self._rows is not None and self._flat is not None
            # Precomputed indices, not a boolean mask: no device sync per layer.
            self._rows[:, columns] = args[0].reshape(-1, self.width).index_select(0, self._flat)
            if last:
                raise _EveryLayerCopied

        return hook

    @contextmanager
    def installed(self) -> Iterator[RowCopier]:
        with pre_hooks([(module, self._hook(slot)) for slot, module in enumerate(self.modules)]):
            yield self

    def run(
        self, backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, flat: torch.Tensor
    ) -> torch.Tensor:
        """One forward pass; returns the float16 rows of the tokens at `flat` (indices into
        the batch's positions, row-major), in that order. On the CPU they lie in a buffer reused once
        nothing refers to the rows it held before (`HostRowBuffers`)."""
        self._flat = flat
        if flat.device.type == "cpu":
            self._rows = self.host_buffers.rows(len(flat))
        else:  # the device's caching allocator reuses memory already
            self._rows = torch.empty((len(flat), self.n_columns), dtype=torch.float16, device=flat.device)
        try:
            # No key/value cache: nothing is generated after this pass, and building it costs a few percent.
            backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _EveryLayerCopied:
            return self._rows
        finally:
            self._rows = self._flat = None
        raise RuntimeError("the forward pass ended without running the last recorded layer's down-projection")


@dataclass(frozen=True)
class Selection:
    """One padded batch and which of its tokens are recorded."""

    input_ids: torch.Tensor  # (sequences, positions), right-padded
    attention_mask: torch.Tensor
    flat: np.ndarray  # the recorded tokens' indices into the batch's positions, row-major
    ids: np.ndarray  # their token ids
    record: np.ndarray  # their record indices
    position: np.ndarray  # their positions in their sequences
    cursor: int  # where a resumed run continues after the batch


@dataclass
class Recorder:
    """The forward passes of collect: records' token ids in, their kept rows out."""

    tokenizer: Any
    sequences: list[list[int]]  # token ids of every record of the dataset
    sample: TokenSample
    copier: RowCopier
    backbone: torch.nn.Module  # the transformer without the LM head: its logits are not needed
    device: torch.device
    batch_size: int

    def selections(self, mine: list[int], start: int, stop: int, budget: int | None) -> Iterator[Selection]:
        """The batches of the records mine[start:stop] and the tokens of each to record, at most
        `budget` rows in all, without running the model."""
        taken = 0
        for first in range(start, stop, self.batch_size):
            if budget is not None and taken >= budget:
                return
            chosen = mine[first : min(first + self.batch_size, stop)]
            batch = self.tokenizer.pad({"input_ids": [self.sequences[i] for i in chosen]}, return_tensors="pt")
            keep = self.sample.keep(batch["attention_mask"].numpy().astype(bool), chosen)
            # Right padding: a kept token's column is its position in the sequence.
            row_of, position = np.nonzero(keep)
            whole = len(row_of)
            if budget is not None:  # the first tokens up to the budget
                row_of, position = row_of[: budget - taken], position[: budget - taken]
            take = len(row_of)
            record = np.asarray(chosen)[row_of]
            taken += take
            yield Selection(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                flat=row_of * keep.shape[1] + position,
                ids=batch["input_ids"].numpy()[row_of, position].astype(np.int32),
                record=record,
                position=position.astype(np.int32),
                cursor=first + len(chosen) if take == whole else mine.index(int(record[-1])) + 1,
            )

    def device_rows(
        self, mine: list[int], start: int, stop: int, budget: int | None
    ) -> Iterator[tuple[torch.Tensor, Selection]]:
        """Each batch's recorded rows (float16, on the model's device) and its selection. Call inside
        `copier.installed()` and `torch.inference_mode()`."""
        for chosen in self.selections(mine, start, stop, budget):
            rows = self.copier.run(
                self.backbone,
                chosen.input_ids.to(self.device),
                chosen.attention_mask.to(self.device),
                torch.from_numpy(chosen.flat).to(self.device),
            )
            yield rows, chosen

    def batches(
        self, mine: list[int], start: int, stop: int, budget: int | None
    ) -> Iterator[tuple[HostCopy, np.ndarray, np.ndarray, np.ndarray, int]]:
        """(activations, token ids, record, position, cursor) of the records mine[start:stop], batch
        by batch, at most `budget` rows in all; `cursor` is where a resumed run continues after
        the batch. The activations' copy to the host is started, not waited for. Call inside
        `copier.installed()` and `torch.inference_mode()`."""
        for rows, chosen in self.device_rows(mine, start, stop, budget):
            yield HostCopy(rows), chosen.ids, chosen.record, chosen.position, chosen.cursor


@dataclass(frozen=True)
class CollectPlan:
    """What a collect run records, settled before any model loads: the checked output folder,
    the data rendered and tokenized as training sees it, and the device and dtype to load on."""

    config: CollectConfig
    tokenizer: Any  # padding on the right
    data: Examples
    sequences: list[list[int]]  # token ids of every record, truncated to max_length
    sample: TokenSample
    dataset_digest: str | None  # of a local dataset file: part of the run key and the manifest
    device: torch.device
    dtype: torch.dtype
    finished: Activations | None  # a finished folder with damaged shards, which this run re-records

    @property
    def dataset_record(self) -> dict[str, Any]:
        """What the manifest (and a mask file made without one) says of the data."""
        return {
            "source": self.config.dataset,
            "digest": self.dataset_digest,
            "split": self.data.split,
            "format": self.data.data_format.value,
            "template": self.data.template,
            "n_records": len(self.sequences),
        }

    @property
    def expected_tokens(self) -> float:
        """The tokens the run records: every kept token, or max_tokens of them."""
        expected = sum(self.sample.expected(len(ids)) for ids in self.sequences)
        return min(expected, self.config.max_tokens or expected)


def plan_collection(config: CollectConfig, tokenizer: Any = None) -> CollectPlan:
    """Check the output folder, then read, render and tokenize the data with `tokenizer` (default:
    the model's own, loaded here), whose padding side is set to the right."""
    finished = _check_out(config.out, config.overwrite)
    return replace(plan_records(config, tokenizer), finished=finished)


def plan_records(config: CollectConfig, tokenizer: Any = None) -> CollectPlan:
    """The records to run and the tokens to record, as `plan_collection` settles them, for a run that
    writes no folder (`config.out` is not looked at)."""
    if tokenizer is None:
        # The tokenizer before the data: a model refused (its own code without --trust-remote-code)
        # is then the only line printed, before any warning about the data's columns.
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    # Right padding keeps every real token at its true position (models derive positions
    # from the cache position, not the attention mask, so left padding would shift them).
    tokenizer.padding_side = "right"
    data = load_examples(
        config.dataset, tokenizer, config.split, data_format=config.data_format, template_format=config.template_format
    )
    examples, template = list(data), data.template
    check_answers_fit(examples, template, tokenizer, config.max_length, "--max-length", f"dataset {config.dataset}")
    texts = [render_text(example, template, tokenizer) for example in examples]
    # Tokenized once: the lengths give the estimate, the batches are padded from these ids.
    sequences = tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]
    dataset_digest = file_digest(Path(config.dataset)) if Path(config.dataset).is_file() else None
    sample = TokenSample(config.tokens_per_sequence, config.token_rate, config.seed, config.skip_first_token)
    device = choose_device(config.device)
    dtype = choose_dtype(config.dtype, device.type)
    return CollectPlan(config, tokenizer, data, sequences, sample, dataset_digest, device, dtype, None)


@dataclass(frozen=True)
class Recording:
    """The model side of a collect run, in one process of it: what the manifest says of the
    model, the layers recorded, the forward passes that record them, and the run key."""

    info: ModelInfo
    layers: list[int]
    dtype: torch.dtype  # the model's: it decides the recorded values
    recorder: Recorder
    ranks: Ranks  # which process of the run this is
    run_key: str

    @property
    def n_columns(self) -> int:
        return len(self.layers) * self.info.intermediate_size


def load_recording(plan: CollectPlan, model: nn.Module | None = None, ranks: Ranks | None = None) -> Recording:
    """Ready the forward passes that record `model` (default: the model the config names, loaded
    on this process's device in the plan's dtype) as the process `ranks` (default: the only one)."""
    config, ranks = plan.config, ranks if ranks is not None else Ranks()
    if model is None:
        device, dtype = rank_device(plan.device, ranks), plan.dtype
        model = load_causal_lm(config.model, dtype, device, trust_remote_code=config.trust_remote_code)
    else:
        weight = next(model.parameters())
        device, dtype = weight.device, weight.dtype
    projections = find_down_projections(model)
    info = model_info(model, config.model, projections)
    layers = parse_layers(config.layers, len(projections))
    copier = RowCopier(projections, layers, info.intermediate_size)
    recorder = Recorder(
        plan.tokenizer, plan.sequences, plan.sample, copier, model.base_model, device, config.batch_size
    )
    key = _run_key(plan, info.fingerprint, dtype, layers, ranks.world_size)
    return Recording(info, layers, dtype, recorder, ranks, key)


def _run_key(plan: CollectPlan, fingerprint: str, dtype: torch.dtype, layers: list[int], world_size: int) -> str:
    """Digest of everything that decides the recorded rows (not batch size, device or budget),
    so a resumed run only continues shards made by the same arguments."""
    config = plan.config
    decisive = {
        "model": config.model,
        "fingerprint": fingerprint,
        "dataset": config.dataset,
        "dataset_digest": plan.dataset_digest,
        "split": config.split,
        "data_format": config.data_format,
        "template_format": config.template_format,
        "layers": layers,
        "max_length": config.max_length,
        "dtype": str(dtype),
        "tokens_per_sequence": config.tokens_per_sequence,
        "token_rate": config.token_rate,
        "seed": config.seed,
        "world_size": world_size,
    }
    if config.skip_first_token:  # only when set: the run keys of folders written before it stay valid
        decisive["skip_first_token"] = True
    return bytes_digest(json.dumps(decisive, sort_keys=True).encode())


@dataclass(frozen=True)
class RankShards:
    """What one process recorded: its shards, its tokens and the records it went through."""

    shards: list[dict[str, Any]]
    n_tokens: int
    n_sequences: int


def record_shards(plan: CollectPlan, recording: Recording, overlap: bool = True) -> RankShards:
    """Ready the output folder (resuming an interrupted run of the same arguments), say what will
    be recorded, and record this process's share of the records into its shards. On SIGTERM or
    Ctrl-C the batch in flight is written and the shard closed, then `Interrupted` is raised.

    `overlap`: write each batch beside the next one's forward pass (a writer thread); False writes
    it in the loop, the reference the overlapped shards equal byte for byte."""
    config, ranks = plan.config, recording.ranks
    if ranks.is_main:
        _check_disk(config.out, plan.expected_tokens * recording.n_columns * 2)
        _prepare_out(config.out, config.overwrite, recording.run_key)
        _announce(plan, recording)
    ranks.barrier()
    return _record_share(plan, recording, overlap)


def _announce(plan: CollectPlan, recording: Recording) -> None:
    """Print what the run records and the disk it needs."""
    config, ranks = plan.config, recording.ranks
    total, row_bytes = plan.expected_tokens, recording.n_columns * 2
    say.info(
        f"collect: {len(plan.sequences)} sequences, {'about ' if plan.sample.subsamples else 'up to '}{total:.0f} "
        f"tokens x {recording.n_columns} neurons ({len(recording.layers)} layers) -> about "
        f"{total * row_bytes / 2**30:.2f} GiB of float16 in {config.out} "
        f"({shutil.disk_usage(config.out).free / 2**30:.2f} GiB free)"
        + (f" from {ranks.world_size} processes" if ranks.distributed else "")
    )


def _record_share(plan: CollectPlan, recording: Recording, overlap: bool) -> RankShards:
    """This process's records (every world_size-th), from where its finished shards end, up to its
    share of max_tokens."""
    config, ranks, recorder = plan.config, recording.ranks, recording.recorder
    mine = list(range(ranks.rank, len(plan.sequences), ranks.world_size))
    budget = None
    if config.max_tokens is not None:
        budget = config.max_tokens // ranks.world_size + (ranks.rank < config.max_tokens % ranks.world_size)
    done = completed_shards(config.out, ranks.rank)
    rows_per_shard = max(1, config.shard_size_mb * 2**20 // (recording.n_columns * 2))
    shard_writer = ShardWriter(config.out, recording.n_columns, rows_per_shard, ranks.rank, recording.run_key, done)
    writer = BackgroundWriter(shard_writer) if overlap else InLoopWriter(shard_writer)
    cursor = done[-1]["next_record"] if done else 0
    n_tokens = sum(shard["n_tokens"] for shard in done)
    progress = progress_bar(
        total=budget or round(sum(plan.sample.expected(len(plan.sequences[i])) for i in mine)),
        initial=n_tokens,
        unit="tok",
        desc="collect",
        disable=not ranks.is_main,
    )
    with progress, _aborted_on_failure(writer, config.out, lambda: len(writer.completed)):
        with recorder.copier.installed(), torch.inference_mode(), stop_on_signals() as stop:
            left = None if budget is None else budget - n_tokens
            for rows, ids, record, position, after in recorder.batches(mine, cursor, len(mine), left):
                writer.write(rows, ids, record, position, next_record=after)
                cursor = after
                n_tokens += rows.n_rows
                progress.update(rows.n_rows)
                if stop:
                    break
        shards = writer.close()
    if stop.signal_number is not None:
        raise Interrupted(
            f"collect wrote the batch in flight and kept {len(shards)} finished shard(s) ({n_tokens} tokens) "
            f"in {config.out}; re-run the same command to resume",
            stop.signal_number,
        )
    return RankShards(shards, n_tokens, cursor)


@contextmanager
def _aborted_on_failure(
    writer: ShardWriter | BackgroundWriter | InLoopWriter, out: Path, kept: Callable[[], int]
) -> Iterator[None]:
    """On any failure, abort `writer` (dropping its unfinished shard when the disk is full, to give
    the space back); a full disk becomes one line saying that the `kept()` finished shards stay."""
    try:
        yield
    except BaseException as exc:
        writer.abort(discard=is_disk_full(exc))
        if is_disk_full(exc):
            raise _disk_full(out, exc, kept()) from exc
        raise


def write_manifest(plan: CollectPlan, recording: Recording, part: RankShards) -> dict[str, Any]:
    """Gather every process's shards and, in the main one, write the manifest that names them (the
    folder is complete from then on); returns the manifest."""
    config, ranks = plan.config, recording.ranks
    manifest = _manifest(plan, recording, ranks.gather(part))
    if ranks.is_main:
        if manifest["n_tokens"] == 0:
            shutil.rmtree(config.out, ignore_errors=True)
            raise UserError(f"dataset {config.dataset} gave no token to record; check that its records hold text")
        try:
            write_json_atomic(config.out / MANIFEST_NAME, manifest)
        except OSError as exc:
            if is_disk_full(exc):
                raise _disk_full(config.out, exc, len(manifest["shards"])) from exc
            raise
        say.info(
            f"collect: wrote {manifest['n_tokens']} tokens from {manifest['n_sequences']} sequences "
            f"in {len(manifest['shards'])} shard(s) to {config.out}"
        )
    ranks.barrier()
    return manifest


def collect(config: CollectConfig, model: nn.Module | None = None, tokenizer: Any = None) -> Activations:
    """Run the model over the dataset and write the activations folder; returns it as `Activations`
    (its folder and manifest), which `NetworkICA.fit` takes.

    The stages, public for notebooks and benchmarks: `plan_collection` (the data and the folder),
    `load_recording` (the model), `record_shards`, `write_manifest`. A `model` and `tokenizer`
    given are used instead of loading the ones `config.model` names (the manifest still names the
    model so). Under `torchrun`/`accelerate launch` each rank records every world_size-th record
    into its own shards and rank 0 writes one manifest naming all of them. Re-running the same
    command after an interruption continues from the finished shards; re-running it on a
    finished folder with a damaged shard re-records that shard. On SIGTERM or Ctrl-C the batch
    in flight is written and the shard closed, then `Interrupted` is raised. A folder that another
    collect is writing is refused (the main process holds the folder's writer lock throughout).
    """
    if model is None or tokenizer is None:
        check_model_reachable(config.model)
    with sole_writer(config.out) if ranks_from_env().is_main else nullcontext():
        plan = plan_collection(config, tokenizer)
        with process_group(plan.device if model is None else next(model.parameters()).device) as ranks:
            recording = load_recording(plan, model, ranks)
            if plan.finished is not None:
                return Activations(config.out, _repair(plan, plan.finished, recording))
            return Activations(config.out, write_manifest(plan, recording, record_shards(plan, recording)))


def _repair(plan: CollectPlan, finished: Activations, recording: Recording) -> dict[str, Any]:
    """Re-record the damaged shards of a finished folder and write the manifest with their new digests."""
    out, manifest = plan.config.out, finished.manifest
    if recording.ranks.distributed:
        raise UserError("re-record damaged shards in one process: run the same collect without torchrun")
    world_size = int(manifest["world_size"])  # the folder's, as in its run key
    if manifest["run_key"] != _run_key(plan, recording.info.fingerprint, recording.dtype, recording.layers, world_size):
        raise UserError(
            f"--out {out} was written by collect with other arguments; re-run the command that wrote it "
            "to re-record its damaged shards, or pass --overwrite to start again"
        )
    damaged = damaged_shards(finished)
    say.info(
        f"collect: re-recording {len(damaged)} damaged shard(s) of {out}: {', '.join(e['file'] for e, _ in damaged)}"
    )
    kept = len(manifest["shards"]) - len(damaged)
    for entry, _problem in damaged:
        entry.update(manifest_entry(_rerecord(finished, entry, recording.recorder, kept)))
    write_json_atomic(out / MANIFEST_NAME, manifest)
    say.info(f"collect: {out} is whole again ({len(damaged)} shard(s) re-recorded)")
    return manifest


def _rerecord(finished: Activations, entry: dict[str, Any], recorder: Recorder, kept: int) -> dict[str, Any]:
    """One damaged shard recorded again from the records it held: from the cursor of its rank's
    shard before it to its own."""
    out, manifest = finished.folder, finished.manifest
    if "next_record" not in entry:
        raise UserError(
            f"shard {entry['file']} in {out} is damaged and its folder was written by an older collect, which "
            "did not record where each shard starts; pass --overwrite to record the folder again"
        )
    rank, index = shard_rank_and_index(entry["file"])
    before = [s for s in manifest["shards"] if shard_rank_and_index(s["file"]) in {(rank, i) for i in range(index)}]
    mine = list(range(rank, len(recorder.sequences), int(manifest["world_size"])))
    writer = ShardWriter(out, finished.n_neurons, entry["n_tokens"], rank, manifest["run_key"], before)
    start = before[-1]["next_record"] if before else 0
    with _aborted_on_failure(writer, out, lambda: kept):
        with recorder.copier.installed(), torch.inference_mode():
            for rows, ids, record, position, cursor in recorder.batches(
                mine, start, entry["next_record"], entry["n_tokens"]
            ):
                writer.write(rows.array(), ids, record, position, next_record=cursor)
        again = writer.close()[-1]
    if (again["file"], again["n_tokens"]) != (entry["file"], entry["n_tokens"]):
        raise UserError(
            f"re-recording {entry['file']} gave {again['n_tokens']} rows, not {entry['n_tokens']}; "
            "the data or model changed since: pass --overwrite to record the folder again"
        )
    return again


def _manifest(plan: CollectPlan, recording: Recording, per_rank: list[RankShards]) -> dict[str, Any]:
    config = plan.config
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "created_by": f"functional-networks {__version__}",
        "model": recording.info.to_dict(),
        "layers": recording.layers,
        "columns": "layer-major: column = position_in_layers * intermediate_size + neuron",
        "dtype": "float16",
        "n_tokens": sum(part.n_tokens for part in per_rank),
        "sample": plan.sample.to_dict(),  # which tokens of each sequence were recorded
        "n_sequences": sum(part.n_sequences for part in per_rank),
        "world_size": len(per_rank),
        "run_key": recording.run_key,
        "dataset": plan.dataset_record,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "shards": [manifest_entry(shard) for part in per_rank for shard in part.shards],
    }
