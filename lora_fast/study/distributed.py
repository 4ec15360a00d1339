"""One process or several under ``torchrun``: this process's rank, the world size and its device, and sums across
processes. Without a process group everything here is the single-process identity."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from lora_fast.gguf import packed_modules
from lora_fast.study.errors import UsageError

__all__ = [
    "any_rank",
    "launched_world_size",
    "resolve_device",
    "setup",
    "rank_and_world",
    "all_sum",
    "barrier",
    "wrap",
    "cleanup",
]


def launched_world_size() -> int:
    """How many processes ``torchrun`` started (``WORLD_SIZE``); 1 when started with plain ``python``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(spec: str, flag: str = "--device") -> torch.device:
    """The device ``spec`` names for this process, checked before anything loads: ``cpu``; ``cuda`` (``cuda:0``, or
    ``cuda:LOCAL_RANK`` under torchrun); ``cuda:N``; ``auto`` (``cuda`` when a CUDA device is present, else ``cpu``).
    A UsageError naming ``flag`` for anything else, for CUDA on a machine without one, for a device index past the
    last device, and for ``cuda:N`` under torchrun (each process takes its own ``cuda:LOCAL_RANK``)."""
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", spec)
    if match is None:
        raise UsageError(f"{flag} {spec!r}: expected auto, cpu, cuda or cuda:N")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "" if torch.version.cuda else f" (this torch {torch.__version__} is built without CUDA)"
        raise UsageError(f"{flag} {spec}: no CUDA device on this machine{build}; use {flag} cpu")
    world, local = launched_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    if match.group(1) is not None and world > 1:
        raise UsageError(f"{flag} {spec} under torchrun: each process takes cuda:LOCAL_RANK; pass {flag} cuda")
    index, count = (local if match.group(1) is None else int(match.group(1))), torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"{flag} {spec}: cuda:{index} does not exist, this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)`` for a device from ``resolve_device``: makes a CUDA device this process's
    current one and, under torchrun, starts the process group (nccl on CUDA, gloo on CPU)."""
    world, rank = launched_world_size(), int(os.environ.get("RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


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


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any process (a Ctrl-C seen by one rank stops them all at the same step)."""
    return all_sum([float(flag)], device)[0] > 0


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when several processes run, else ``module`` itself. A model with
    GGUF-packed layers keeps its buffers unbroadcast: the packed weights are constants every process loaded from the
    file, and broadcasting them would send the whole model at every forward."""
    if rank_and_world()[1] == 1:
        return module
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=not packed_modules(module),
    )


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
