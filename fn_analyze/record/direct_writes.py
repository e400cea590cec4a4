"""Whole chunks of a shard's activations written past the page cache (O_DIRECT).

A recording streams gigabytes that nothing reads back soon. Written through the page cache, every
byte is first copied by the kernel into a cached page, on the CPU the forward pass keeps busy: on a
2-core virtual machine about 0.1 s of CPU for SmolLM2's 2,785 demo tokens, and the recording went
from 0.97 to 0.99 of the bare forward pass with the copy gone (10 alternating passes in one process).
With O_DIRECT the disk reads the rows' own memory and the writer thread only waits.

HDF5 still owns the file: it gives each chunk its place when the dataset grows (early allocation,
no fill value written), and the whole chunks are written at those places, byte for byte what HDF5
would write there (the chunks are unfiltered). Everything else (a shard's last, partial chunk, the
other datasets, HDF5's metadata) goes through HDF5.

O_DIRECT asks the memory address, the file offset and the length to be multiples of the disk's
logical block size (512 bytes on most disks, 4,096 on some): the row buffers and the chunks joined
from two batches start on page boundaries, and HDF5 places chunks of ALIGNED_CHUNK_BYTES or more on
page boundaries. Where any of that fails (rows whose bytes are no multiple of 512, a filesystem
without O_DIRECT, a disk that needs 4,096: EINVAL from the first write), the chunks go through HDF5
instead: the same bytes. A full disk is raised as ENOSPC, as HDF5's own writes raise it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import h5py
import numpy as np

PAGE = 4096  # alignment of the row buffers and of large chunks' places in the file
SECTOR = 512  # the smallest logical block size: a write not aligned to it is not tried
ALIGNED_CHUNK_BYTES = 512 * 2**10  # chunks from this size get page-aligned places (at most 0.8% of room lost)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised array whose data starts on a page boundary."""
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n_bytes + PAGE, np.uint8)
    skip = -raw.ctypes.data % PAGE
    return raw[skip : skip + n_bytes].view(dtype).reshape(shape)


class DirectChunks:
    """An O_DIRECT descriptor of one shard being written, for its activations' whole chunks; none
    without a shard (`path` None), or where the system or the filesystem has no O_DIRECT: `write`
    then always declines."""

    def __init__(self, path: Path | None = None) -> None:
        self._fd: int | None = None
        if path is not None and hasattr(os, "O_DIRECT"):
            with contextlib.suppress(OSError):  # EINVAL: a filesystem without O_DIRECT
                self._fd = os.open(path, os.O_WRONLY | os.O_DIRECT)

    def write(self, dataset: h5py.Dataset, start: int, values: np.ndarray) -> bool:
        """Write `values`, rows start.. of `dataset` and whole chunks of it, at their chunks' places
        in the file. False if they cannot go this way; the caller then writes them through HDF5
        (chunks already written here are written again, the same bytes)."""
        chunk_rows = dataset.chunks[0]
        whole_chunks = start % chunk_rows == 0 and len(values) % chunk_rows == 0
        if self._fd is None or dataset.chunks[1:] != values.shape[1:] or not whole_chunks:
            return False
        for first in range(0, len(values), chunk_rows):
            chunk = values[first : first + chunk_rows]
            offset = dataset.id.get_chunk_info_by_coord((start + first, *[0] * (values.ndim - 1))).byte_offset
            if offset is None or (chunk.ctypes.data | offset | chunk.nbytes) % SECTOR:
                return False
            try:
                written = os.pwrite(self._fd, chunk.data, offset)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self.close()  # a larger alignment asked, or no direct writes after all: HDF5 writes the rest
                return False
            if written != chunk.nbytes:  # a regular file writes less only when the disk is full
                raise OSError(
                    errno.ENOSPC, f"No space left on device: {written} of a chunk's {chunk.nbytes} bytes written"
                )
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
