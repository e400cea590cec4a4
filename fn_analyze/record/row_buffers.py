"""Host memory for recorded rows, reused once nothing refers to the rows handed out of it.

Fresh memory costs more than it seems: a batch of SmolLM2's rows is 32 MB, and each of its new
pages faults on its first touch (on a virtual machine, to the host as well). Reusing the buffer of
a batch the writer is done with removed those faults from the forward pass (SmolLM2's recording
went from about 0.93 to 0.95 of the bare forward on a 2-core virtual machine).

A buffer is free when the array view it handed out is gone. The rows tensor is made from that
view (`torch.from_numpy`), and every tensor and array made from the rows keeps it alive, so rows
that a caller still holds are never overwritten, however long it holds them.

Buffers start on a page boundary, so that the shard writer can hand their rows to the disk
directly (`direct_writes`).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from fn_analyze.record.direct_writes import aligned_empty


class HostRowBuffers:
    """float16 (rows x columns) tensors on the host, each in a buffer no earlier result still uses."""

    def __init__(self, n_columns: int) -> None:
        self.n_columns = n_columns
        self._held: list[tuple[np.ndarray, weakref.ref[np.ndarray] | None]] = []  # (buffer, view handed out)

    def rows(self, n_rows: int) -> torch.Tensor:
        """An uninitialised (n_rows x n_columns) float16 tensor in a free buffer; a new buffer when
        none free is large enough (the free ones too small are let go)."""
        free = [i for i, (_, handed) in enumerate(self._held) if handed is None or handed() is None]
        fit = next((i for i in free if len(self._held[i][0]) >= n_rows), None)
        if fit is None:
            self._held = [held for i, held in enumerate(self._held) if i not in free]
            self._held.append((aligned_empty((n_rows, self.n_columns), np.float16), None))
            fit = len(self._held) - 1
        buffer = self._held[fit][0]
        view = buffer[:n_rows]
        self._held[fit] = (buffer, weakref.ref(view))
        return torch.from_numpy(view)

    @property
    def n_buffers(self) -> int:
        return len(self._held)
