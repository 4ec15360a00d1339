"""One process or several under ``torchrun``: this process's rank, the world size and its device, sums across
processes, and how the model is spread over them (``--parallel``): ``ddp`` (DistributedDataParallel: every process
holds the whole model) or ``fsdp`` (FSDP2: each holds 1/N of every weight, ``lora_fast.study.fsdp``; see
docs/DISTRIBUTED.md). Without a process group everything here is the single-process identity."""

from __future__ import annotations

import contextlib
import gc
import os
import re
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from lora_fast.gguf import packed_modules
from lora_fast.study import fsdp
from lora_fast.study.errors import UsageError

__all__ = [
    "PARALLEL",
    "SHARDED_METHODS",
    "any_rank",
    "launched_world_size",
    "resolve_device",
    "check_parallel",
    "setup",
    "rank_and_world",
    "all_sum",
    "from_rank0",
    "barrier",
    "load_device",
    "place",
    "memory_summary",
    "wrap",
    "no_sync",
    "cleanup",
]

PARALLEL = ("ddp", "fsdp")
# The methods whose files --parallel fsdp writes from gathered trainable weights alone. ``full`` saves the whole
# model, which would gather every weight on one process: it runs under ddp.
SHARDED_METHODS = ("lora", "bitfit", "bottleneck")


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


def check_parallel(parallel: str, world: int, method: str = "lora", dtype: str = "auto") -> None:
    """Refuse a ``--parallel`` that cannot run as asked (a UsageError naming the flag): ``fsdp`` needs several
    processes (torchrun), a method in ``SHARDED_METHODS``, and no fp16 GradScaler (its skipped-step decision is per
    process on sharded gradients; bf16 needs none)."""
    if parallel not in PARALLEL:
        raise UsageError(f"--parallel {parallel!r}: expected one of {', '.join(PARALLEL)}")
    if parallel != "fsdp":
        return
    if world < 2:
        raise UsageError(
            "--parallel fsdp shards the model over several processes: start it with torchrun --nproc_per_node N "
            "(N >= 2); one process runs the whole model anyway"
        )
    if method not in SHARDED_METHODS:
        raise UsageError(
            f"--parallel fsdp with --method {method}: its saves write the whole model, gathered on one process; use "
            f"--parallel ddp (or one of {', '.join(SHARDED_METHODS)})"
        )
    if dtype == "fp16":
        raise UsageError(
            "--parallel fsdp with --dtype fp16: the fp16 GradScaler is not supported there; use --dtype bf16"
        )


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


def from_rank0(obj):
    """Rank 0's ``obj`` on every process (pickled and broadcast; picklable plain values only), ``obj`` alone."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def load_device(parallel: str, device: torch.device) -> torch.device:
    """Where a run loads its model before ``place``: the CPU under ``fsdp`` with several processes (then each moves
    only its shards to ``device``, so no device ever holds the whole model), else ``device``."""
    return torch.device("cpu") if parallel == "fsdp" and rank_and_world()[1] > 1 else device


def place(model: nn.Module, parallel: str, device: torch.device, amp_dtype: torch.dtype | None = None) -> nn.Module:
    """``model`` on ``device``: with ``parallel == "fsdp"`` and several processes sharded there by
    ``fsdp.shard_model`` (in place; load it on ``load_device``'s CPU), otherwise moved there. An fp16 ``amp_dtype``
    (``--dtype auto`` on a GPU without bf16) is a UsageError under fsdp, as ``check_parallel``'s ``--dtype fp16``."""
    if parallel != "fsdp" or rank_and_world()[1] == 1:
        return model.to(device)
    if amp_dtype == torch.float16:
        raise UsageError("--parallel fsdp: this GPU has no bf16 and the fp16 GradScaler is not supported there")
    return fsdp.shard_model(model, device, amp_dtype)


def memory_summary(model: nn.Module) -> dict[str, float]:
    """The weights' size in MB, whole and held by this process (rank 0's in a summary), all and frozen only: under
    fsdp a process holds about 1/N of them, under ddp or alone all."""
    mb = 2**20
    (held, whole), (frozen_held, frozen) = fsdp.parameter_bytes(model), fsdp.parameter_bytes(model, frozen_only=True)
    return {"weights_mb": whole / mb, "weights_mb_this_process": held / mb, "frozen_weights_mb": frozen / mb,
            "frozen_weights_mb_this_process": frozen_held / mb}  # fmt: skip


def _sharded_root(module: nn.Module) -> nn.Module | None:
    return next((m for m in module.modules() if fsdp.is_sharded(m)), None)


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when several processes run, else ``module`` itself; a module holding a
    sharded model (``place``) is returned as it is: FSDP already reduces its gradients. A model with GGUF-packed
    layers keeps its buffers unbroadcast: the packed weights are constants every process loaded from the file, and
    broadcasting them would send the whole model at every forward."""
    if rank_and_world()[1] == 1 or _sharded_root(module) is not None:
        return module
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=not packed_modules(module),
    )


def no_sync(module: nn.Module) -> contextlib.AbstractContextManager:
    """Backward passes inside keep their gradients local, to be reduced with the next one outside (gradient
    accumulation): DDP's ``no_sync``, FSDP's ``gradient_sync(False)``, nothing for one process."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    root = _sharded_root(module)
    return fsdp.gradient_sync(root, False) if root is not None else contextlib.nullcontext()


def cleanup() -> None:
    """Ends the process group, and frees what still holds it (a sharded model's device mesh, in a reference cycle) while
    Python can still run: the group's worker threads then stop here. Left to the interpreter's exit, a worker that drops
    its last collective's tensors after Python began to finalize aborts the process ("terminate called without an
    active exception", exit code -6) after a run that succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
