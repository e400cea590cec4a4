"""What recording costs per token beside the forward pass, one part at a time, on SmolLM2's row width.

collect's recording does, per token: the copy in the hook (gather the kept rows of each layer's
down-projection input into the float16 row), the HDF5 write of the row (`ShardWriter`, no HDF5
filter) and the XXH3-128 of the row, hashed by the writer in memory as it writes it
(`shared.digests.RowsDigest`). Each part is timed here on random rows with the calls collect
makes, and the read side beside them: the HDF5 read of the shard and the same hash, which every
read of a shard computes to check it.

    python bench/recording_costs.py [--tokens 2048] [--layers 30] [--width 1536] [--batch-tokens 320]

Prints microseconds per token of each part; ends with one line `recording_costs: ratio=X`: the
HDF5 write with its checksum (the write and the hash) over the same write without it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from fn_analyze.record.activations import CHUNK_ROWS
from shared.digests import RowsDigest


def hook_copy_us(layers: int, width: int, batch_tokens: int, repeats: int = 20) -> float:
    """The hook's copy (as `RowCopier`: index_select of the kept rows into a float16 column slot)."""
    inputs = torch.randn(batch_tokens + batch_tokens // 8, width)  # padding rows left out by the gather
    kept = torch.arange(batch_tokens)
    rows = torch.empty((batch_tokens, layers * width), dtype=torch.float16)
    start = time.perf_counter()
    for _ in range(repeats):
        for layer in range(layers):
            rows[:, layer * width : (layer + 1) * width] = inputs.index_select(0, kept)
    return (time.perf_counter() - start) / repeats / batch_tokens * 1e6


def hdf5_write_us(path: Path, rows: np.ndarray, block: int = 512) -> float:
    """Rows appended in blocks with a flush after each, as `ShardWriter` writes them; closed."""
    start = time.perf_counter()
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset(
            "activations",
            shape=(0, rows.shape[1]),
            maxshape=(None, rows.shape[1]),
            dtype="float16",
            chunks=(CHUNK_ROWS, rows.shape[1]),
        )
        for first in range(0, len(rows), block):
            dataset.resize(min(first + block, len(rows)), axis=0)
            dataset[first : first + block] = rows[first : first + block]
            handle.flush()
    return (time.perf_counter() - start) / len(rows) * 1e6


def hash_us(rows: np.ndarray, block: int = 512) -> float:
    """The XXH3-128 of the rows in blocks, as the writer (and every read) feeds them."""
    start = time.perf_counter()
    digest = RowsDigest()
    for first in range(0, len(rows), block):
        digest.update(rows[first : first + block])
    digest.hexdigest()
    return (time.perf_counter() - start) / len(rows) * 1e6


def hdf5_read_us(path: Path, block: int = 512) -> float:
    """The shard's rows read back in blocks (from the page cache: it was just written)."""
    start = time.perf_counter()
    with h5py.File(path, "r") as handle:
        dataset = handle["activations"]
        for first in range(0, dataset.shape[0], block):
            dataset[first : first + block]
        n_rows = dataset.shape[0]
    return (time.perf_counter() - start) / n_rows * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=30, help="SmolLM2-135M: 30")
    parser.add_argument("--width", type=int, default=1536, help="SmolLM2-135M: 1,536 neurons a layer")
    parser.add_argument("--batch-tokens", type=int, default=320, help="kept tokens of one batch")
    args = parser.parse_args()
    rows = np.random.default_rng(0).standard_normal((args.tokens, args.layers * args.width)).astype(np.float16)
    with tempfile.TemporaryDirectory(dir=".") as work:
        path = Path(work) / "rows.h5"
        costs = {
            "hook copy": hook_copy_us(args.layers, args.width, args.batch_tokens),
            "hdf5 write": hdf5_write_us(path, rows),
            "xxh3-128 of the rows": hash_us(rows),
            "hdf5 read (every reader)": hdf5_read_us(path),
        }
    row_kb = rows.shape[1] * 2 / 1000
    threads = torch.get_num_threads()
    print(f"{args.tokens} tokens x {rows.shape[1]} neurons ({row_kb:.0f} KB a row), torch threads {threads}")
    for part, micros in costs.items():
        print(f"{part}: {micros:.0f} us/token ({row_kb * 1e3 / micros:,.0f} MB/s)")
    collect = costs["hook copy"] + costs["hdf5 write"] + costs["xxh3-128 of the rows"]
    print(f"what collect does beside the forward pass: {collect:.0f} us/token")
    read = costs["hdf5 read (every reader)"]
    print(f"a checked read: {read + costs['xxh3-128 of the rows']:.0f} us/token, the read alone {read:.0f}")
    ratio = (costs["hdf5 write"] + costs["xxh3-128 of the rows"]) / costs["hdf5 write"]
    print(f"recording_costs: ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
