"""Rank and world size under torchrun / deepspeed / SLURM-style launchers, and a barrier.

Extraction only needs to agree on who owns which shard and to wait for every rank before the
manifest is written, so a gloo process group (CPU or GPU alike) is enough.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies, so that ranks (and the
    launcher between us and them) never outlive the job that started them: a killed launcher
    otherwise leaves orphans training into the same run folder as its re-run."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "prctl") or libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return  # not Linux: nothing to ask for
    if os.getppid() != parent:  # the parent died before we asked
        os.kill(os.getpid(), sig)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(name: str, ranks: Ranks) -> torch.device:
    """This rank's device. A GPU is also made current, before any memory is pinned (the DataLoader's,
    the host copies): else every rank opens a context on GPU 0 to pin it."""
    if name != "cuda":
        return torch.device(name)
    torch.cuda.set_device(ranks.local_rank)
    return torch.device("cuda", ranks.local_rank)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block on n torch threads, restoring the count after: one thread gives a fixed reduction
    order (the judge's repeatable training), and a tiny model's matrices are too small to split
    (the demo, docs/benchmarks/demo-knobs.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
