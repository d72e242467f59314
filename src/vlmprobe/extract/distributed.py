"""Data-parallel extraction through torch.distributed, as `torchrun` launches it.

Each rank extracts whole shards, shard k on rank k mod world size, into the one scratch store;
rank 0 prepares that store, and writes the manifest and the metrics once every rank is done.
A shard's bytes do not depend on which rank computed it, so the store is the same for any
number of processes, and a rerun (any number) completes whatever a dead rank left. CPU ranks
talk over gloo, GPU ranks over NCCL, each on its own card (`LOCAL_RANK`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, shard: int) -> bool:
        return shard % self.world == self.rank


ONE_PROCESS = Ranks()


def launched() -> bool:
    """Whether this process is a rank that torchrun started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or {"RANK", "WORLD_SIZE"} <= set(os.environ)


def relaunch(processes: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` as `processes` ranks on this host under torchrun (its
    standalone rendezvous); the exit status is torchrun's, non-zero if any rank failed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", "--module", module, *argv]
    print(f"extract: {processes} processes: {' '.join(command[1:])}", flush=True)
    return subprocess.run(command, check=False).returncode


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun set up; this rank's device (its own card on CUDA)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank), device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def reduce(value: float, op: str) -> float:
    """`value` reduced over every rank (`sum`, `max` or `min`); itself in one process."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                "min": dist.ReduceOp.MIN}[op])
    return float(tensor.item())
