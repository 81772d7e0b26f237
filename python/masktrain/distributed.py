"""One process per GPU under ``torchrun``: which share of the items this process owns, and the
few collective steps (barrier, gather) the commands need. Without ``torchrun`` (no
``WORLD_SIZE``) this is a world of one and no process group is created."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """This process's items: every `world`-th from `rank`, disjoint across processes."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, value: T) -> list[T]:
        """`value` from every process, in rank order (on every process)."""
        if self.world == 1:
            return [value]
        values: list[T] = [value] * self.world
        dist.all_gather_object(values, value)
        return values


def start() -> Shard:
    """Join the process group `torchrun` describes in the environment (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Shard()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Shard(rank=dist.get_rank(), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def stop(shard: Shard) -> None:
    if shard.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
