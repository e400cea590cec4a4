"""Recording beside the model: the copy of a batch's rows to the host, their HDF5 writes and their
hashes (the shards' checksum) run while the model computes the next batch, so the model waits for the disk
only when the disk is the slower of the two.

Double buffering: one batch is written while the next is computed; handing over a batch waits
until the one before it is written, so memory holds two batches (and the writer's block), never
a queue that grows when the disk is slow. The writer thread runs the same `ShardWriter` on the
same batches in the same order as a loop that writes each batch itself, so the shards are the
same, byte for byte.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np
import torch

from fn_analyze.record.activations import ShardWriter


class HostCopy:
    """One batch's recorded rows on their way to host memory. On CUDA the copy goes to pinned
    memory without waiting (torch's pinned-memory cache reuses the buffers of earlier batches)
    and `array()` waits for it; elsewhere the rows are on the host once `array()` is called."""

    def __init__(self, rows: torch.Tensor) -> None:
        self._done: torch.cuda.Event | None = None
        if rows.device.type == "cuda":
            self._host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            self._host.copy_(rows, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = rows.cpu()  # the same tensor on CPU; a copy (and a wait) on MPS
        self.n_rows = len(rows)

    def array(self) -> np.ndarray:
        if self._done is not None:
            self._done.synchronize()
        return self._host.numpy()


class BackgroundWriter:
    """A `ShardWriter` fed from a thread; the same verbs (`write`, `close`, `abort`, `completed`).

    A failure of the writer (a full disk) is raised by the next `write` or by `close`; `abort`
    then stops the thread and aborts the shard writer, as it would a synchronous one."""

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer
        self._batches: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._failure: BaseException | None = None
        self._stopped = False
        # A daemon thread never keeps the process alive; every path of collect stops it first.
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    @property
    def completed(self) -> list[dict[str, Any]]:
        return self.writer.completed

    def write(
        self, rows: HostCopy, token_ids: np.ndarray, sequence: np.ndarray, position: np.ndarray, next_record: int
    ) -> None:
        """Hand one batch to the writer once the one before it is written; returns at once then."""
        self._batches.join()
        self._raise_failure()
        self._batches.put((rows, token_ids, sequence, position, next_record))

    def close(self) -> list[dict[str, Any]]:
        """Write what is left and close the last shard (here, after the thread has ended)."""
        self._stop()
        self._raise_failure()
        return self.writer.close()

    def abort(self, discard: bool = False) -> None:
        self._stop()
        self.writer.abort(discard)

    def _run(self) -> None:
        while (batch := self._batches.get()) is not None:
            try:
                if self._failure is None:
                    rows, token_ids, sequence, position, next_record = batch
                    self.writer.write(rows.array(), token_ids, sequence, position, next_record=next_record)
            except BaseException as exc:  # handed to the main thread, which raises it
                self._failure = exc
            finally:
                self._batches.task_done()
        self._batches.task_done()

    def _stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._batches.put(None)
            self._thread.join()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


class InLoopWriter:
    """The synchronous reference: each batch written by the loop that computed it, before the next."""

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer

    @property
    def completed(self) -> list[dict[str, Any]]:
        return self.writer.completed

    def write(
        self, rows: HostCopy, token_ids: np.ndarray, sequence: np.ndarray, position: np.ndarray, next_record: int
    ) -> None:
        self.writer.write(rows.array(), token_ids, sequence, position, next_record=next_record)

    def close(self) -> list[dict[str, Any]]:
        return self.writer.close()

    def abort(self, discard: bool = False) -> None:
        self.writer.abort(discard)
