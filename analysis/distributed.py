"""Running one sweep on several processes through `torch.distributed` (launched by `torchrun`).

`torchrun --nproc_per_node N -m analysis sweep ...` starts N copies of the CLI with the usual
environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`); `World.from_env`
joins the process group (gloo on the CPU, NCCL on CUDA, one GPU per local rank). The sweep then
gives every process a disjoint, deterministic shard of the batches (`World.owns`) and gathers the
accumulator states on rank 0, which merges them exactly and writes the results (analysis/sweep.py).
Without `WORLD_SIZE` > 1 everything here is a no-op and the sweep runs in one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import SweepError


@dataclass(frozen=True)
class World:
    """This process's place among the sweep's processes.

    Attributes:
        rank: 0..size-1 (rank 0 writes the results); size: the number of processes;
        local_rank: the rank within this machine (its GPU index on CUDA);
        backend: "gloo" or "nccl", or None for a single process.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | None) -> "World":
        """Join the process group that torchrun set up, or a single-process `World`.

        Args:
            device: the sweep's device ("cpu", "cuda" or None for CUDA when available); with CUDA
                each process uses GPU `LOCAL_RANK` and the NCCL backend, else gloo.
        Raises:
            SweepError: torchrun asked for CUDA processes but this machine has fewer GPUs.
        """
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device == "cuda" or (device is None and torch.cuda.is_available())
        backend = "nccl" if cuda else "gloo"
        if cuda:
            if local_rank >= torch.cuda.device_count():
                raise SweepError(f"process {rank} wants GPU {local_rank} but this machine has {torch.cuda.device_count()}: "
                                 "use --nproc_per_node at most the number of GPUs, or --device cpu")
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("TOKENSCOPE_DIST_TIMEOUT_MIN", "60"))))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, backend)

    def owns(self, batch_index: int) -> bool:
        """Whether this process evaluates global batch `batch_index`: batches go round-robin over
        the ranks, so every batch holds the same images as in a single-process run."""
        return batch_index % self.size == self.rank

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` (picklable) on rank 0, in rank order; None on the other ranks."""
        if not self.distributed:
            return [value]
        out: list[Any] | None = [None] * self.size if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out

    def all_sum(self, numbers: list[int]) -> list[int]:
        """Integer counts summed over every rank (an all-reduce), the same list on every rank."""
        if not self.distributed:
            return list(numbers)
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        tensor = torch.tensor(numbers, dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [int(v) for v in tensor.tolist()]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (at the end of the CLI command)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
