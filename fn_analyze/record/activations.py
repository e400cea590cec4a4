"""The activations folder: float16 HDF5 shards plus a manifest, written and read in blocks.

Layout of one shard (`shard-r<rank>-<index>.h5`, written as `*.partial` and renamed when
complete)::

    activations     (tokens, len(layers) * intermediate_size) float16, layer-major columns:
                    column = position_in_layers * intermediate_size + neuron
    token_ids       (tokens,) int32
    sequence_index  (tokens,) int64   index of the record in the dataset
    position        (tokens,) int32   position of the token in its sequence
    attrs           run_key (digest of what decides the rows), next_record (resume cursor)

Uncompressed on purpose: float16 activations barely compress and gzip is ~40x slower.

One checksum, XXH3-128 (`shared.digests`): the writer hashes each dataset's rows as it writes them
(in memory, no read back) and stores the hash as the dataset's `xxh3_128` attribute; the manifest
holds the shard's digest, made from those four. Every read of a dataset hashes the rows it reads
and compares at the end of the dataset (at memory speed, a small part of the read), after checking
the attributes against the manifest's digest: a changed byte fails the read that meets it, before
anything computed from the rows is written. `open_activations` checks each shard opens and has
its rows (cheap: a cut file fails there); `verify_activations` reads every shard whole.
Folders written before stay readable and are checked by what they carry: a Fletcher-32 checksum
on every chunk (checked by HDF5 on each read) and the SHA-256 of each whole shard (by `verify`);
folders older still read unchecked.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fn_analyze.record.direct_writes import ALIGNED_CHUNK_BYTES, PAGE, DirectChunks, aligned_empty
from shared.constants import (
    ACTIVATIONS_DATASET,
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    PARTIAL_SUFFIX,
    POSITION_DATASET,
    ROWS_DIGEST_ATTR,
    SEQUENCE_DATASET,
    SHARD_GLOB,
    SHARD_NAME,
    TOKEN_IDS_DATASET,
)
from shared.digests import RowsDigest, file_digest, is_shard_digest, shard_digest
from shared.errors import UserError, skip_library_shutdown
from shared.folders import describe, kind
from shared.jsonio import replace_durably, write_json_atomic
from shared.masks import ModelInfo
from shared.paths import file_in_folder

# Shards given up after a failed write, with their datasets' handles: never closed, not even by the
# garbage collector (see ShardWriter.abort).
_ABANDONED: list[tuple[h5py.File, dict[str, h5py.Dataset]]] = []
_ROW_DATASETS = (ACTIVATIONS_DATASET, TOKEN_IDS_DATASET, SEQUENCE_DATASET, POSITION_DATASET)
CHUNK_ROWS = 64  # rows per HDF5 chunk: whole-row reads of a block touch few chunks
FLUSH_BYTES = 32 * 2**20  # activations buffered before one write to the open shard
CHECK_BYTES = 32 * 2**20  # rows read at a time by `verify`
HDF5_MARGIN_BYTES = 2**20  # room kept for a shard's metadata and its close


class ShardWriter:
    """Appends blocks of token rows to one rank's shards of about `rows_per_shard` rows.

    A shard is written under a `.partial` name, a block at a time (batches buffered up to
    FLUSH_BYTES), and renamed when full or closed, so a reader never mistakes half a shard for
    data. HDF5 is flushed after each block, although nothing reads a `.partial` file: the chunks
    HDF5 caches (a small model's) are then written while the block's room check still holds, not
    later from a destructor, where a full disk cannot be handled. Whole chunks of activations go
    to the disk past the page cache where the system allows it (`direct_writes`). Shards end on
    batch boundaries and record in their attributes the run they belong to (`run_key`) and the
    cursor after their last batch (`next_record`): an interrupted run resumes from its completed
    shards (see `completed_shards`). `completed` are the rank's shards before the first one this
    writer writes.
    """

    def __init__(
        self,
        folder: Path,
        n_columns: int,
        rows_per_shard: int,
        rank: int = 0,
        run_key: str = "",
        completed: list[dict[str, Any]] | None = None,
    ) -> None:
        self.folder = folder
        self.n_columns = n_columns
        self.rows_per_shard = max(1, rows_per_shard)
        self.rank = rank
        self.run_key = run_key
        self.completed: list[dict[str, Any]] = list(completed or [])
        self._file: h5py.File | None = None
        # The open shard's datasets, held for its life: a temporary handle freed after a failed write
        # would close its dataset in the garbage collector, which HDF5 then fails loudly.
        self._datasets: dict[str, h5py.Dataset] = {}
        self._path: Path | None = None
        self._rows = 0
        self._chunk_rows = min(CHUNK_ROWS, self.rows_per_shard)
        self._digests: dict[str, RowsDigest] = {}  # the open shard's datasets' running hashes
        self._direct = DirectChunks()  # the open shard's whole activation chunks go through it
        self._pending: list[tuple[np.ndarray, ...]] = []  # (activations, token ids, records, positions) not written yet
        self._next_record = 0

    def _open(self) -> None:
        self._path = self.folder / shard_name(self.rank, len(self.completed))
        partial = str(self._path) + PARTIAL_SUFFIX
        self._file = h5py.File(partial, "w", alignment_threshold=ALIGNED_CHUNK_BYTES, alignment_interval=PAGE)
        chunk = (self._chunk_rows, self.n_columns)
        places = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        places.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # each chunk's place is known once the dataset grows
        self._file.create_dataset(
            ACTIVATIONS_DATASET,
            shape=(0, self.n_columns),
            maxshape=(None, self.n_columns),
            dtype="float16",
            chunks=chunk,
            dcpl=places,
            fill_time="never",
        )
        for key, dtype in ((TOKEN_IDS_DATASET, "int32"), (SEQUENCE_DATASET, "int64"), (POSITION_DATASET, "int32")):
            self._file.create_dataset(key, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(max(chunk[0], 1024),))
        self._file.attrs["run_key"] = self.run_key
        self._datasets = {key: self._file[key] for key in _ROW_DATASETS}
        self._digests = {key: RowsDigest() for key in _ROW_DATASETS}
        self._direct = DirectChunks(Path(partial))
        self._rows = 0

    def write(
        self,
        activations: np.ndarray,
        token_ids: np.ndarray,
        sequence: np.ndarray,
        position: np.ndarray,
        next_record: int = 0,
    ) -> None:
        """Queue one batch's rows; `next_record` is where a resumed run would continue after it.

        Batches are written to disk in blocks of about FLUSH_BYTES: one write per block, not per
        batch, since per-call costs would otherwise dominate small models. A block ends on an HDF5
        chunk boundary (the rows after it wait for the next block): HDF5 then writes whole chunks
        straight to the file (blocks that shared a chunk took 1.5 times the writer's CPU). A
        shard's last block is written whole, so a shard ends on a batch boundary."""
        self._pending.append((activations, token_ids, sequence, position))
        self._next_record = next_record
        if self._rows + self._pending_rows >= self.rows_per_shard:
            self._flush(whole=True)
        elif self._pending_bytes >= FLUSH_BYTES:
            self._flush(whole=False)

    @property
    def _pending_rows(self) -> int:
        return sum(len(part[0]) for part in self._pending)

    @property
    def _pending_bytes(self) -> int:
        return sum(part[0].nbytes for part in self._pending)

    def _check_room(self) -> None:
        """Refuse a block the disk has no room for before HDF5 starts it: HDF5 failing mid-write
        raises from its object destructors and can crash the process on exit."""
        needed = self._pending_bytes * 3 // 2 + HDF5_MARGIN_BYTES  # the other datasets, metadata
        free = shutil.disk_usage(self.folder).free
        if free < needed:
            raise OSError(
                errno.ENOSPC, f"No space left on device: the next block needs {needed} bytes, {free} are free"
            )

    def _flush(self, whole: bool) -> None:
        """Write the pending rows up to their last whole chunk, or every one of them (`whole`)."""
        if not self._pending:
            return
        self._check_room()
        if self._file is None:
            self._open()
        assert self._file is not None
        runs, rest = chunk_runs([part[0] for part in self._pending], self._chunk_rows)
        if whole and rest is not None:
            runs, rest = [*runs, rest], None
        take = sum(len(run) for run in runs)
        if take == 0:  # less than one chunk pending (a chunk of a wide model can exceed FLUSH_BYTES)
            return
        columns = list(zip(*self._pending, strict=True))[1:]  # token ids, records, positions: small
        labels = [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in columns]
        for dataset in self._datasets.values():
            dataset.resize(self._rows + take, axis=0)
        start = self._rows
        for run in runs:  # each a view of one batch's rows, or whole chunks joined across batches
            self._store(ACTIVATIONS_DATASET, start, run)
            start += len(run)
        for key, values in zip(_ROW_DATASETS[1:], labels, strict=True):
            self._store(key, self._rows, values[:take])
        self._rows += take
        self._file.flush()
        _write_back(self._file)
        self._pending = [] if rest is None else [(rest, *(values[take:] for values in labels))]
        if self._rows >= self.rows_per_shard and not self._pending:
            self._finish()

    def _store(self, key: str, start: int, values: np.ndarray) -> None:
        """Write `values` as rows start.. of dataset `key` and feed them to its running hash."""
        dataset = self._datasets[key]
        values = np.ascontiguousarray(values, dtype=dataset.dtype)  # the bytes as stored, hashed as written
        self._digests[key].update(values)
        if key != ACTIVATIONS_DATASET or not self._direct.write(dataset, start, values):
            dataset[start : start + len(values)] = values

    def _finish(self) -> None:
        assert self._file is not None and self._path is not None
        self._file.attrs["next_record"] = self._next_record
        hexdigests = {key: digest.hexdigest() for key, digest in self._digests.items()}
        for key, hexdigest in hexdigests.items():
            self._datasets[key].attrs[ROWS_DIGEST_ATTR] = hexdigest
        self._datasets, self._digests = {}, {}
        self._direct.close()
        self._file.close()
        self._file = None
        replace_durably(Path(str(self._path) + PARTIAL_SUFFIX), self._path)
        self.completed.append(
            {
                "file": self._path.name,
                "n_tokens": self._rows,
                "next_record": self._next_record,
                "digest": shard_digest(hexdigests),
            }
        )
        self._rows = 0  # the next shard starts empty, so its first block is a whole one, not one batch

    def abort(self, discard: bool = False) -> None:
        """Close without finishing: the open shard keeps its `.partial` name and is never read;
        `discard` deletes it (a full disk gets its space back). The finished shards stay.

        A discarded shard is abandoned, not closed: after a write failed for want of room, HDF5's
        state for the file can be broken, and closing it then, or HDF5 closing it at exit, crashes
        the process. Its handle is kept (so nothing closes it), the file cut and unlinked (its
        space comes back when the process ends) and `skip_library_shutdown` asks the command
        line to end without HDF5's shutdown."""
        self._pending.clear()
        if self._file is None:
            return
        self._direct.close()
        partial = Path(str(self._path) + PARTIAL_SUFFIX)
        if discard:
            _ABANDONED.append((self._file, self._datasets))
            skip_library_shutdown()
            with contextlib.suppress(FileNotFoundError):
                os.truncate(partial, 0)
            partial.unlink(missing_ok=True)
        else:
            self._file.close()
        self._file, self._datasets = None, {}

    def close(self) -> list[dict[str, Any]]:
        self._flush(whole=True)
        if self._file is not None:
            if self._rows:
                self._finish()
            else:
                self._direct.close()
                self._file.close()
                Path(str(self._path) + PARTIAL_SUFFIX).unlink(missing_ok=True)
                self._file, self._datasets = None, {}
        return self.completed


def _write_back(shard: h5py.File) -> None:
    """Start writing the file's new pages to disk, and let the kernel drop those already written:
    the bytes that did not go past the page cache (`direct_writes`), every byte where they cannot.

    A recording streams gigabytes that nothing reads back soon. Kept in the page cache, they push
    out other files' pages, and each block takes fresh pages, which costs the forward pass more
    than reusing the pages of blocks already on disk (on a 2-core virtual machine, SmolLM2's
    recording went from 0.86 to 0.93 of the bare forward). Closing a shard then waits for its
    last block, not for all of it."""
    if hasattr(os, "posix_fadvise"):  # not on macOS or Windows: the page cache decides there
        os.posix_fadvise(shard.id.get_vfd_handle(), 0, 0, os.POSIX_FADV_DONTNEED)  # HDF5's own descriptor


def chunk_runs(parts: list[np.ndarray], chunk_rows: int) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The rows of `parts`, in order, cut into runs of whole chunks of `chunk_rows` rows, and the
    rows after the last whole chunk (None if none). A part's rows that span whole chunks are a view
    of it, not a copy; only a chunk shared by two parts is joined."""
    runs: list[np.ndarray] = []
    head: list[np.ndarray] = []  # pieces since the last chunk boundary
    for part in parts:
        if head and len(part) >= chunk_rows:  # close the head's chunk with the part's first rows
            need = -sum(len(piece) for piece in head) % chunk_rows
            pieces = [*head, part[:need]]
            joined = aligned_empty((sum(len(piece) for piece in pieces), *part.shape[1:]), part.dtype)
            runs.append(np.concatenate(pieces, out=joined))
            head, part = [], part[need:]
        whole = len(part) - len(part) % chunk_rows
        if whole and not head:
            runs.append(part[:whole])
            part = part[whole:]
        if len(part):
            head.append(part)
    if not head:
        return runs, None
    rest = np.concatenate(head) if len(head) > 1 else head[0]
    whole = len(rest) - len(rest) % chunk_rows
    if whole:
        runs.append(rest[:whole])
        rest = rest[whole:]
    return runs, rest if len(rest) else None


def shard_name(rank: int, index: int) -> str:
    return SHARD_NAME.format(rank=rank, index=index)


def shard_rank_and_index(name: str) -> tuple[int, int]:
    """`shard-r01-00002.h5` -> (1, 2)."""
    _, rank, index = Path(name).stem.split("-")
    return int(rank[1:]), int(index)


def manifest_entry(shard: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of a finished shard: its file, rows, resume cursor and digest."""
    return {key: shard[key] for key in ("file", "n_tokens", "next_record", "digest")}


def completed_shards(folder: Path, rank: int) -> list[dict[str, Any]]:
    """One rank's finished shards, in order, with the run they belong to and their cursor."""
    shards = []
    for index in itertools.count():
        path = folder / shard_name(rank, index)
        if not path.is_file():
            break
        try:
            with h5py.File(path, "r") as handle:
                shards.append(
                    {
                        "file": path.name,
                        "n_tokens": int(handle[ACTIVATIONS_DATASET].shape[0]),
                        "next_record": int(handle.attrs["next_record"]),
                        "run_key": str(handle.attrs["run_key"]),
                        "digest": _recorded_digest(handle) or file_digest(path),  # a shard of an older collect
                    }
                )
        except (OSError, KeyError) as exc:
            raise UserError(f"shard {path} cannot be read ({exc}); delete it or pass --overwrite") from exc
    return shards


def _recorded_digest(handle: h5py.File) -> str | None:
    """The shard's digest from its datasets' recorded hashes; None if it carries none (older shards)."""
    if not all(key in handle and ROWS_DIGEST_ATTR in handle[key].attrs for key in _ROW_DATASETS):
        return None
    return shard_digest({key: str(handle[key].attrs[ROWS_DIGEST_ATTR]) for key in _ROW_DATASETS})


def write_matrix(
    folder: Path,
    matrix: np.ndarray,
    model: ModelInfo,
    layers: list[int],
    rows_per_shard: int = 65536,
    positions: np.ndarray | None = None,
    token_ids: np.ndarray | None = None,
) -> Path:
    """An activations folder holding `matrix` (tokens x len(layers) * intermediate_size, layer-major),
    as collect writes it: for activations recorded by other tools, and for synthetic data. Each row is
    its own record; its position and token id are 0 unless given (one integer a row)."""
    folder = Path(folder)
    if matrix.shape[1] != len(layers) * model.intermediate_size:
        raise UserError(
            f"matrix has {matrix.shape[1]} columns; {len(layers)} layers x {model.intermediate_size} neurons "
            f"need {len(layers) * model.intermediate_size}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    run_key = f"matrix:{model.fingerprint}"
    writer = ShardWriter(folder, matrix.shape[1], rows_per_shard, run_key=run_key)
    for start in range(0, len(matrix), rows_per_shard):
        rows = np.arange(start, min(len(matrix), start + rows_per_shard))
        zeros = np.zeros(len(rows), np.int32)
        ids = zeros if token_ids is None else np.asarray(token_ids, np.int32)[rows]
        where = zeros if positions is None else np.asarray(positions, np.int32)[rows]
        writer.write(matrix[rows].astype(np.float16), ids, rows, where, next_record=int(rows[-1]) + 1)
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "model": model.to_dict(),
        "layers": list(layers),
        "n_tokens": len(matrix),
        "run_key": run_key,
        "shards": [manifest_entry(shard) for shard in writer.close()],
    }
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return folder


@dataclass(frozen=True)
class Activations:
    """A validated activations folder, ready to be read in blocks of token rows."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(**self.manifest["model"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def intermediate_size(self) -> int:
        return int(self.manifest["model"]["intermediate_size"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_neurons(self) -> int:
        return len(self.layers) * self.intermediate_size

    def column_to_neuron(self, column: int) -> tuple[int, int]:
        """(layer, neuron) of an activations column."""
        return self.layers[column // self.intermediate_size], column % self.intermediate_size

    @property
    def checksummed(self) -> bool:
        """Whether the manifest holds a digest of every shard (folders of older versions do not)."""
        return all("digest" in shard for shard in self.manifest["shards"])

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        """Token-row blocks as float32 arrays, shard after shard, in manifest order."""
        for shard in self.manifest["shards"]:
            path = self.folder / shard["file"]
            for block in read_shard(path, shard["n_tokens"], self.n_neurons, block_rows, shard.get("digest")):
                yield block.astype(np.float32)


def damaged_shard_message(path: Path, problem: str) -> str:
    return (
        f"activations shard {Path(path).name} in {Path(path).parent} {problem}; re-run the `fn-analyze collect` "
        "command that wrote the folder (same arguments): it re-records only the damaged shards' records"
    )


class _RowsChanged(Exception):
    """Rows read back that differ from the hash the writer recorded for them (or recorded hashes that
    differ from the manifest's digest)."""


@contextmanager
def open_shard(path: str | Path, digest: str | None = None) -> Iterator[h5py.File]:
    """A shard opened for reading, its datasets' recorded hashes checked against the manifest's
    `digest` (when it is XXH3-128's). A file HDF5 cannot open or read (cut short; in an older shard,
    a chunk whose Fletcher-32 fails) or rows that differ from their hash (`checked_rows`, read
    inside the block) become one line naming the shard and the repair."""
    try:
        with h5py.File(path, "r") as handle:
            if is_shard_digest(digest) and _recorded_digest(handle) != digest:
                raise _RowsChanged
            yield handle
    except OSError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(damaged_shard_message(Path(path), f"cannot be read ({reason})")) from exc
    except _RowsChanged as exc:
        raise UserError(damaged_shard_message(Path(path), _changed(digest))) from exc


def _changed(digest: str | None) -> str:
    return f"does not match its digest{f' {digest}' if digest else ''} (the file changed after collect wrote it)"


def checked_rows(dataset: h5py.Dataset, block_rows: int) -> Iterator[np.ndarray]:
    """A dataset's rows in blocks of `block_rows`. When it carries its hash (shards of this version),
    each block is hashed as it is read and, after the last, a difference raises (in `open_shard`: a
    damaged shard's line). A reader that stops early has checked nothing."""
    recorded = dataset.attrs.get(ROWS_DIGEST_ATTR)
    digest = None if recorded is None else RowsDigest()
    for start in range(0, dataset.shape[0], max(1, block_rows)):
        block = dataset[start : start + block_rows]
        if digest is not None:
            digest.update(block)
        yield block
    if digest is not None and digest.hexdigest() != str(recorded):
        raise _RowsChanged


def _check_rows(dataset: h5py.Dataset) -> None:
    """Read a dataset whole, in whole chunks of about CHECK_BYTES, checking its hash if it has one."""
    row_bytes = dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))
    chunk_rows = dataset.chunks[0] if dataset.chunks else 1
    block_rows = max(chunk_rows, CHECK_BYTES // max(1, row_bytes) // chunk_rows * chunk_rows)
    for _ in checked_rows(dataset, block_rows):
        pass


def shard_problem(path: Path, entry: dict[str, Any], n_columns: int, full: bool) -> str | None:
    """What is wrong with a shard the manifest lists, or None. Cheap: it opens and has the rows
    the manifest says. `full`: also every row against its digest (an older folder's SHA-256 of the
    file, or, in a folder without digests, every chunk reads)."""
    if not path.is_file():
        return "is missing"
    digest = entry.get("digest")
    try:
        with h5py.File(path, "r") as handle:
            shape = handle[ACTIVATIONS_DATASET].shape
            if shape != (entry["n_tokens"], n_columns):
                return f"has shape {shape}, the manifest says ({entry['n_tokens']}, {n_columns})"
            if full and (digest is None or is_shard_digest(digest)):
                if digest is not None and _recorded_digest(handle) != digest:
                    return _changed(digest)
                for key in _ROW_DATASETS:
                    _check_rows(handle[key])
    except OSError as exc:
        return f"cannot be read ({' '.join(str(exc).split()) or type(exc).__name__})"
    except KeyError as exc:
        return f"lacks a dataset ({exc})"
    except _RowsChanged:
        return _changed(digest)
    if full and digest is not None and not is_shard_digest(digest) and file_digest(path) != digest:
        return _changed(digest)
    return None


def read_shard(
    path: str | Path, n_tokens: int, n_columns: int, block_rows: int, digest: str | None = None
) -> Iterator[np.ndarray]:
    """A shard's activations in float16 blocks of `block_rows` token rows, after checking its
    shape against what the manifest says, checked against their hash (`checked_rows`)."""
    with open_shard(path, digest) as handle:
        data = handle[ACTIVATIONS_DATASET]
        if data.shape != (n_tokens, n_columns):
            raise UserError(
                f"shard {path} has shape {data.shape}, the manifest says ({n_tokens}, {n_columns}); "
                "re-run `fn-analyze collect`"
            )
        yield from checked_rows(data, block_rows)


def read_column(path: str | Path, key: str, digest: str | None = None) -> np.ndarray:
    """One of a shard's small datasets whole (one integer a row: record index, position, token id),
    checked against its hash."""
    with open_shard(path, digest) as handle:
        dataset = handle[key]
        return np.concatenate(list(checked_rows(dataset, dataset.shape[0])) or [dataset[:0]])


MANIFEST_KEYS = {"model": dict, "layers": list, "n_tokens": int, "shards": list, "run_key": str}


def _check_structure(manifest: Any, path: Path) -> None:
    """The keys readers rely on, with their types: a damaged manifest gets one line, not a KeyError."""
    problem = None
    if not isinstance(manifest, dict):
        problem = "is not a JSON object"
    else:
        for key, kind in MANIFEST_KEYS.items():
            if not isinstance(manifest.get(key), kind):
                problem = f"lacks {key!r} (or it is not a {kind.__name__})"
                break
        else:
            bad = [s for s in manifest["shards"] if not (isinstance(s, dict) and isinstance(s.get("file"), str))]
            if bad or any(not isinstance(s.get("n_tokens"), int) for s in manifest["shards"]):
                problem = "has a shard entry without a file name or token count"
    if problem:
        raise UserError(f"{path} {problem}; the file was damaged: re-run `fn-analyze collect`")


def open_manifest(folder: Path) -> Activations:
    """The folder's manifest, read and checked; its shards are not looked at yet."""
    manifest_path = folder / MANIFEST_NAME
    found = kind(folder)
    if found == "missing":
        raise UserError(f"activations folder {folder} does not exist; run `fn-analyze collect --out {folder}` first")
    if found in ("file", "model", "pruned model", "checkpoint", "fn-train run", "lora adapter"):
        raise UserError(
            f"activations folder {folder} {describe(found)}, not activations; give a folder written by "
            "`fn-analyze collect`"
        )
    if not manifest_path.is_file():
        partial = sorted(p.name for p in folder.glob(SHARD_GLOB + PARTIAL_SUFFIX))
        hint = f" (it holds an unfinished shard {partial[0]})" if partial else ""
        raise UserError(
            f"activations folder {folder} has no {MANIFEST_NAME}{hint}; "
            f"run `fn-analyze collect --out {folder}` (again) to write it"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{manifest_path} is not valid JSON ({exc}); re-run `fn-analyze collect`") from exc
    if manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise UserError(
            f"{manifest_path} has schema_version {manifest.get('schema_version')!r}, this tool reads "
            f"{MANIFEST_SCHEMA_VERSION}; re-run `fn-analyze collect`"
        )
    _check_structure(manifest, manifest_path)
    for shard in manifest["shards"]:
        file_in_folder(folder, shard["file"], str(manifest_path))
    return Activations(folder, manifest)


def open_activations(folder: Path) -> Activations:
    """Read and check the manifest of an activations folder, and that each shard it names is
    there, opens, has its rows and belongs to the same collect run (no hashing: see `verify_activations`)."""
    folder = Path(folder)
    acts = open_manifest(folder)
    manifest = acts.manifest
    named = [folder / s["file"] for s in manifest["shards"]]
    missing = [path.name for path in named if not path.is_file()]
    if missing:
        raise UserError(f"activations folder {folder} lacks shard {missing[0]} named in its manifest; re-run collect")
    strays = sorted({p.name for p in folder.glob(SHARD_GLOB)} - {path.name for path in named})
    if strays:
        raise UserError(
            f"activations folder {folder} holds shard {strays[0]}, which its manifest does not name (left by "
            "another run?); move it out or re-run collect into an empty folder"
        )
    for path, entry in zip(named, manifest["shards"], strict=True):
        problem = shard_problem(path, entry, acts.n_neurons, full=False)
        if problem:
            raise UserError(damaged_shard_message(path, problem))
        with open_shard(path, entry.get("digest")) as handle:  # the recorded hashes are the manifest's
            run_key = str(handle.attrs.get("run_key", ""))
        if run_key != manifest["run_key"]:
            raise UserError(
                f"shard {path.name} in {folder} was recorded by another collect run (other model or data) than "
                "its manifest; re-run collect into an empty folder"
            )
    if manifest["n_tokens"] < 1:
        raise UserError(f"activations folder {folder} holds no token; collect on a non-empty dataset")
    return acts


def damaged_shards(acts: Activations) -> list[tuple[dict[str, Any], str]]:
    """Every shard of the folder whose rows (or older file) differ from its digest, or (a folder without
    digests) cannot be read, with why."""
    found = []
    for entry in acts.manifest["shards"]:
        problem = shard_problem(acts.folder / entry["file"], entry, acts.n_neurons, full=True)
        if problem:
            found.append((entry, problem))
    return found


def verify_activations(folder: Path) -> str:
    """`fn-analyze verify`: every shard of the folder read and checked against its digest.
    Returns the line to print; a damaged shard is a UserError naming it and the repair."""
    acts = open_manifest(Path(folder))
    damaged = damaged_shards(acts)
    if damaged:
        entry, problem = damaged[0]
        more = f" ({len(damaged) - 1} more shard(s) damaged too)" if len(damaged) > 1 else ""
        raise UserError(damaged_shard_message(acts.folder / entry["file"], problem + more))
    shards = len(acts.manifest["shards"])
    if not acts.checksummed:
        return (
            f"verify: {acts.folder} holds no checksums (written by an older collect): its {shards} shard(s) "
            "open and read whole, but damage that still reads cannot be seen; re-run collect with --overwrite "
            "to add them"
        )
    return f"verify: the {shards} shard(s) of {acts.folder} ({acts.n_tokens} tokens) match their digests"
