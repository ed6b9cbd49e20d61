"""torchrun integration: rank, world size and device from the environment; nccl on GPUs, gloo on CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from concepts.errors import InvalidArgument


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. A single process (no torchrun) has rank 0 of 1."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks (every rank gets it)."""
        if self.distributed:
            value = value.detach().clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return float(value)


def init_distributed(device: str = "auto") -> DistContext:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK and join the process group when there are several ranks.

    Args:
        device: "auto" (a GPU when one is visible), "cpu" or "cuda".

    Raises:
        InvalidArgument: "cuda" was asked for and no GPU is visible.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device", "is 'cuda' but no GPU is visible to this process")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        if use_cuda:
            dist.init_process_group("nccl", device_id=target)
        else:
            dist.init_process_group("gloo")
    return DistContext(rank, world_size, local_rank, target)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
