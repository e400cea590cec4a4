"""What recording costs per token beside the forward pass, one part at a time, on SmolLM2's row width:
the checksum collect computes now beside the two it computed before, in the same run.

collect's recording does, per token: the copy in the hook (gather the kept rows of each layer's
down-projection input into the float16 row) and collect's write of the row (`ShardWriter` itself,
on page-aligned rows as collect's row buffers are: the XXH3-128 of the row, hashed in memory as it
is written, `shared.digests.RowsDigest`, and whole chunks written past the page cache where the
system allows it). The plain HDF5 write through the page cache and the hash alone are timed beside
it. Before, collect wrote every chunk through the page cache with a Fletcher-32 checksum and read
each closed shard back for its SHA-256; both are timed here too, as the baseline. The read side
beside them: the HDF5 read of the shard, plain (a checked read adds the XXH3-128) and with
Fletcher-32.
Each part is timed on random rows with the calls collect makes, by the wall clock and by the
process's CPU time (which a machine shared with other jobs moves much less).

    python bench/recording_costs.py [--tokens 2048] [--layers 30] [--width 1536] [--batch-tokens 320]

Prints microseconds per token of each part; ends with one line `recording_costs: ratio=X`: the CPU
time recording took beside the forward pass before (hook copy, Fletcher-32 write, SHA-256 of the
shard) over what it takes now (hook copy, collect's write).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch

from fn_analyze.record.activations import CHUNK_ROWS, ShardWriter
from fn_analyze.record.direct_writes import aligned_empty
from shared.digests import RowsDigest, file_digest


def timed(run: Callable[[], object], tokens: int) -> tuple[float, float]:
    """(wall, CPU) microseconds per token of `run()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return (time.perf_counter() - wall) / tokens * 1e6, (time.process_time() - cpu) / tokens * 1e6


def hook_copy(layers: int, width: int, batch_tokens: int, repeats: int = 20) -> None:
    """The hook's copy (as `RowCopier`: index_select of the kept rows into a float16 column slot)."""
    inputs = torch.randn(batch_tokens + batch_tokens // 8, width)  # padding rows left out by the gather
    kept = torch.arange(batch_tokens)
    rows = torch.empty((batch_tokens, layers * width), dtype=torch.float16)
    for _ in range(repeats):
        for layer in range(layers):
            rows[:, layer * width : (layer + 1) * width] = inputs.index_select(0, kept)


def hdf5_write(path: Path, rows: np.ndarray, fletcher32: bool, block: int = 512) -> None:
    """Rows appended in blocks with a flush after each, as `ShardWriter` writes them; closed."""
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset(
            "activations",
            shape=(0, rows.shape[1]),
            maxshape=(None, rows.shape[1]),
            dtype="float16",
            chunks=(CHUNK_ROWS, rows.shape[1]),
            fletcher32=fletcher32,
        )
        for first in range(0, len(rows), block):
            dataset.resize(min(first + block, len(rows)), axis=0)
            dataset[first : first + block] = rows[first : first + block]
            handle.flush()


def shard_writer(folder: Path, rows: np.ndarray, batch_tokens: int) -> None:
    """collect's write: `ShardWriter` fed batches of `batch_tokens` rows, up to its closed shard."""
    zeros = np.zeros(batch_tokens, np.int32)
    writer = ShardWriter(folder, rows.shape[1], rows_per_shard=len(rows))
    for first in range(0, len(rows), batch_tokens):
        batch = rows[first : first + batch_tokens]
        n = len(batch)
        writer.write(batch, zeros[:n], zeros[:n].astype(np.int64), zeros[:n], next_record=first + n)
    writer.close()


def rows_hash(rows: np.ndarray, block: int = 512) -> None:
    """The XXH3-128 of the rows in blocks, as the writer (and every read) feeds them."""
    digest = RowsDigest()
    for first in range(0, len(rows), block):
        digest.update(rows[first : first + block])
    digest.hexdigest()


def hdf5_read(path: Path, block: int = 512) -> None:
    """The shard's rows read back in blocks (from the page cache: it was just written)."""
    with h5py.File(path, "r") as handle:
        dataset = handle["activations"]
        for first in range(0, dataset.shape[0], block):
            dataset[first : first + block]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=30, help="SmolLM2-135M: 30")
    parser.add_argument("--width", type=int, default=1536, help="SmolLM2-135M: 1,536 neurons a layer")
    parser.add_argument("--batch-tokens", type=int, default=320, help="kept tokens of one batch")
    args = parser.parse_args()
    rows = aligned_empty((args.tokens, args.layers * args.width), np.float16)
    rows[:] = np.random.default_rng(0).standard_normal(rows.shape).astype(np.float16)
    n = len(rows)
    with tempfile.TemporaryDirectory(dir=".") as work:
        plain, fletcher = Path(work) / "plain.h5", Path(work) / "fletcher.h5"
        costs = {
            "hook copy": timed(lambda: hook_copy(args.layers, args.width, args.batch_tokens), args.batch_tokens * 20),
            "collect's write (ShardWriter)": timed(lambda: shard_writer(Path(work), rows, args.batch_tokens), n),
            "hdf5 write through the page cache": timed(lambda: hdf5_write(plain, rows, fletcher32=False), n),
            "xxh3-128 of the rows": timed(lambda: rows_hash(rows), n),
            "hdf5 write, Fletcher-32 (before)": timed(lambda: hdf5_write(fletcher, rows, fletcher32=True), n),
            "sha-256 of the closed shard (before)": timed(lambda: file_digest(fletcher), n),
            "hdf5 read": timed(lambda: hdf5_read(plain), n),
            "hdf5 read, Fletcher-32 (before)": timed(lambda: hdf5_read(fletcher), n),
        }
    row_kb = rows.shape[1] * 2 / 1000
    print(f"{n} tokens x {rows.shape[1]} neurons ({row_kb:.0f} KB a row), torch threads {torch.get_num_threads()}")
    for part, (wall, cpu) in costs.items():
        print(f"{part}: {wall:.0f} us/token wall ({row_kb * 1e3 / wall:,.0f} MB/s), {cpu:.0f} us/token CPU")

    def total(*parts: str) -> tuple[float, float]:
        return sum(costs[p][0] for p in parts), sum(costs[p][1] for p in parts)

    now = total("hook copy", "collect's write (ShardWriter)")
    before = total("hook copy", "hdf5 write, Fletcher-32 (before)", "sha-256 of the closed shard (before)")
    print(f"beside the forward pass, now: {now[0]:.0f} us/token wall, {now[1]:.0f} CPU")
    print(f"beside the forward pass, before: {before[0]:.0f} us/token wall, {before[1]:.0f} CPU")
    read, checked = total("hdf5 read"), total("hdf5 read", "xxh3-128 of the rows")
    old_read = total("hdf5 read, Fletcher-32 (before)")
    print(
        f"a checked read, now: {checked[1]:.0f} us/token CPU (the read alone {read[1]:.0f}); before {old_read[1]:.0f}"
    )
    print(f"recording_costs: ratio={before[1] / now[1]:.2f}")


if __name__ == "__main__":
    main()
