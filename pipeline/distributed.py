"""Rank and world size under torchrun / deepspeed / SLURM-style launchers, and a barrier.

Extraction only needs to agree on who owns which shard and to wait for every rank before the
manifest is written, so a gloo process group (CPU or GPU alike) is enough.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Ranks:
    """Read RANK/WORLD_SIZE/LOCAL_RANK and join the process group when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ranks = Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    return ranks


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
