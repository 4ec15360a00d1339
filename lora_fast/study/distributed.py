"""One process or several under ``torchrun``: this process's rank, the world size and its device, and sums across
processes. Without a process group everything here is the single-process identity."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["launched_world_size", "setup", "rank_and_world", "all_sum", "barrier", "wrap", "cleanup"]


def launched_world_size() -> int:
    """How many processes ``torchrun`` started (``WORLD_SIZE``); 1 when started with plain ``python``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto") -> tuple[int, int, torch.device]:
    """``(rank, world size, device)`` for the ``--device`` flag (``auto``, ``cpu``, ``cuda``, ``cuda:N``). Under
    torchrun each process takes ``cuda:LOCAL_RANK`` and one process group is started (nccl on CUDA, gloo on CPU)."""
    world = launched_world_size()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        chosen = torch.device(f"cuda:{local}" if world > 1 or device == "auto" else device)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu" if device == "auto" else device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return rank, world, chosen


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the running process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` summed element-wise over every process (in fp64)."""
    if rank_and_world()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when several processes run, else ``module`` itself."""
    if rank_and_world()[1] == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
