"""Which process of a multi-process run this is, as `torchrun` and `accelerate launch` say.

Both launchers set RANK, WORLD_SIZE and LOCAL_RANK; a plain run has none of them and
is rank 0 of 1. Collection splits its records by rank and gathers shard lists with
torch.distributed (gloo on CPU, NCCL on CUDA); training leaves all of this to the Trainer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def ranks_from_env() -> Ranks:
    return Ranks(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per process: a bare `cuda` becomes `cuda:<local rank>` under a launcher."""
    if device.type == "cuda" and device.index is None and ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    return device


@contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join the launcher's process group for the block (nothing to do for a single process)."""
    ranks = ranks_from_env()
    created = ranks.distributed and not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield ranks
    finally:
        if created:
            dist.destroy_process_group()
