"""Sharded resume checkpoints for ``--parallel fsdp``: a folder ``checkpoint.dcp/`` written by every process at once.

What a single-file checkpoint (``checkpoint.py``) holds, split by who holds it: the trainable weights and the
optimizer state as each process's shards, written by ``torch.distributed.checkpoint`` (DCP: one ``__<rank>_0.distcp``
file per process and the ``.metadata`` index); the step, scheduler, GradScaler, RNG states and ``extra`` as
``meta.pt`` (tensors and plain values, read with ``weights_only=True``), written by rank 0. The RNG states are rank
0's: every process seeds alike and draws alike (one dropout seed per LoRA layer call), so they are every process's.

Atomic as a whole: rank 0 makes a temporary folder beside the target and tells the others its name, every process
writes its files there (DCP fsyncs them), and only after all have (a barrier) does rank 0 swap the folder in
(``lora_fast.io.atomic_directory``): a process killed at any moment, any rank, leaves the previous checkpoint whole.
Nothing holding a NaN or an inf is written: every process checks its shards and the processes agree before any
file is touched.

Reading goes through DCP's resharding, so a checkpoint written by N processes resumes on M processes of FSDP, or on
one process or DDP, whose models hold whole tensors (DCP reads each tensor's pieces from every file that has one).
The trainable parameter names must match the model's exactly.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

from lora_fast.io import atomic_directory, recover_directory
from lora_fast.study.checkpoint import nonfinite_entries, read_plain, rng_state, set_rng_state
from lora_fast.study.distributed import all_sum, rank_and_world
from lora_fast.study.errors import CheckpointError, NonFiniteError, first_line
from lora_fast.study.fsdp import reshard

__all__ = ["META_NAME", "save_sharded_checkpoint", "load_sharded_checkpoint"]

META_NAME = "meta.pt"
_META_KEYS = ("step", "scheduler", "scaler", "rng", "extra", "world_size")


def _states(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model", "optimizer"}``: the trainable weights by parameter name (``named_parameters``, as a single-file
    checkpoint names them) and the optimizer state by the same names (DCP's ``get_optimizer_state_dict``), DTensor
    shards on a sharded model and whole tensors otherwise: the form DCP writes, and reads in place."""
    reshard(model)  # the shards, not weights an evaluation's forward left gathered
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, optimizer)}


def _local(obj: Any) -> Any:
    """``obj`` with each DTensor replaced by this process's shard (for checks that need no collective)."""
    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_local(v) for v in obj]
    return obj


def _agree_finite(obj: Any, what: str, device: torch.device) -> None:
    """Raise ``NonFiniteError`` on every process when any process's part of ``obj`` holds a NaN or an inf."""
    bad = list(nonfinite_entries(_local(obj)))
    if all_sum([len(bad)], device)[0]:
        shown = ", ".join(bad[:4]) if bad else "on another process"
        raise NonFiniteError(f"{what} would hold NaN or inf values ({shown}); not written")


def _distributed() -> bool:
    """Whether a process group runs (DCP's collectives); without one DCP reads and writes as a single process."""
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Without a process group DCP warns, at each call, that it assumes one process: it is so here, by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _shared_folder(path: Path) -> Iterator[Path]:
    """One temporary folder for every process (rank 0's ``atomic_directory``), swapped in over ``path`` by rank 0
    once every process has finished writing into it."""
    rank, world = rank_and_world()
    if world == 1:
        with atomic_directory(path) as tmp:
            yield tmp
        return
    if rank == 0:
        with atomic_directory(path) as tmp:
            dist.broadcast_object_list([str(tmp)], src=0)
            yield tmp
            dist.barrier()
    else:
        name = [None]
        dist.broadcast_object_list(name, src=0)
        yield Path(name[0])
        dist.barrier()


def save_sharded_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    scaler=None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the resume state after ``step`` optimizer steps to the folder ``path``, every process together
    (atomic; see the module docstring). A state holding a NaN or an inf anywhere is refused on every process
    (``NonFiniteError``) and the folder on disk stays the previous one."""
    path = Path(path)
    state = _states(model, optimizer)
    meta = {
        "step": step,
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
        "world_size": rank_and_world()[1],
    }
    _agree_finite({**state, "scaler": meta["scaler"]}, f"the checkpoint of step {step}", _device(model))
    with _shared_folder(path) as tmp:
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=tmp, no_dist=not _distributed())
        if rank_and_world()[0] == 0:
            torch.save(meta, tmp / META_NAME)


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_NAME
    meta = read_plain(meta_path, "a checkpoint", "the checkpoint is incomplete")
    if not isinstance(meta, dict) or any(k not in meta for k in _META_KEYS):
        raise CheckpointError(
            f"{path} is not a sharded checkpoint of this study (expected {meta_path} with {_META_KEYS})"
        )
    return meta


def load_sharded_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, scaler=None
) -> dict[str, Any]:
    """Restore everything ``save_sharded_checkpoint`` wrote into ``model`` (sharded or not, on any number of
    processes) and the rest; returns ``{"step", "extra"}``. Every process calls it. A checkpoint whose trainable
    names or shapes differ from the model's, or holding NaN or inf values, is refused (``CheckpointError``) before
    the model is touched."""
    path = Path(path)
    recover_directory(path)
    meta = _read_meta(path)
    state = _states(model, optimizer)
    # Read into copies: the weights change only once everything read is checked. (The optimizer's state is a fresh
    # optimizer's, which a failed resume does not go on with.)
    state["model"] = {k: v.detach().clone() for k, v in state["model"].items()}
    try:
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except (Exception, CheckpointException) as exc:  # DCP's own errors for a missing or corrupt index
        raise CheckpointError(f"{path} cannot be read ({first_line(exc, 160)}); the checkpoint is incomplete") from None
    ours, theirs = {f"model.{k}" for k in state["model"]}, {k for k in saved if k.startswith("model.")}
    if ours != theirs:
        missing, unexpected = sorted(ours - theirs), sorted(theirs - ours)
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, param in state["model"].items():
        if tuple(saved[f"model.{name}"].size) != tuple(param.shape):
            raise CheckpointError(
                f"checkpoint {path}: {name} has shape {tuple(saved[f'model.{name}'].size)}, model {tuple(param.shape)}"
            )
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    except (Exception, CheckpointException) as exc:  # a data file missing or cut short (DCP's own error types)
        failures = getattr(exc, "failures", None)  # CheckpointException: each failed rank's own exception
        reason = first_line(next(iter(failures.values())) if failures else exc, 300)
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {reason}") from None
    bad = list(nonfinite_entries(_local({**state, "scaler": meta["scaler"]})))
    if all_sum([len(bad)], _device(model))[0]:
        raise CheckpointError(f"checkpoint {path} holds NaN or inf values ({', '.join(bad[:4])}): it cannot be resumed")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(state["model"][name])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta["scaler"] is not None:
        scaler.load_state_dict(meta["scaler"])
    set_rng_state(meta["rng"])
    return {"step": meta["step"], "extra": meta["extra"]}
