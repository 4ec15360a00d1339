"""Resume state for training runs, written atomically and read back without unpickling code.

A checkpoint holds what an interrupted run needs to finish exactly as an uninterrupted one would: the trainable
weights (whatever the method: LoRA's A and B, biases, adapters, or the whole model), the optimizer, scheduler and
GradScaler states, the step, the data order (the seed and batch size that ``training.step_indices`` derives it
from) and every RNG state (Python's as a tensor of its words, torch CPU, CUDA). All of it is tensors and plain
Python values, so ``torch.load(..., weights_only=True)`` reads it: a ``checkpoint.pt`` from anywhere else that holds
other objects (a pickle that would run code) is refused, not loaded. Writes go through
``lora_fast.io.atomic_torch_save``, so a kill mid-write leaves the previous checkpoint intact, and nothing holding a
NaN or inf is ever written (``require_finite``): the checkpoint on disk is always one a run can go on from.

A run whose model FSDP shards writes the folder ``checkpoint.dcp/`` instead (``sharded_checkpoint``: each process its
shards); ``checkpoint_path`` names the one a model writes, ``save_checkpoint`` and ``resume`` take either. A sharded
checkpoint also resumes on one process or under DDP (on any number of processes); a single file resumes only there.
Once a run writes one kind, the other kind left by an earlier part of the run is removed, so an --out never holds two.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_fast.io import atomic_torch_save, recover_directory
from lora_fast.study.cli import flag_differences, flag_name
from lora_fast.study.errors import CheckpointError, NonFiniteError, first_line
from lora_fast.study.fsdp import is_sharded

__all__ = [
    "CHECKPOINT_FILE",
    "SHARDED_CHECKPOINT",
    "checkpoint_path",
    "rng_state",
    "set_rng_state",
    "trainable_state_dict",
    "nonfinite_entries",
    "require_finite",
    "save_checkpoint",
    "load_checkpoint",
    "resume_path",
    "resume",
]


CHECKPOINT_FILE = "checkpoint.pt"
SHARDED_CHECKPOINT = "checkpoint.dcp"


def checkpoint_path(out: str | os.PathLike, model: nn.Module) -> Path:
    """The checkpoint a run in ``out`` writes for ``model``: ``checkpoint.dcp/`` when FSDP shards it, else
    ``checkpoint.pt``."""
    return Path(out) / (SHARDED_CHECKPOINT if is_sharded(model) else CHECKPOINT_FILE)


def _other_kind(path: Path) -> Path:
    return path.with_name(CHECKPOINT_FILE if path.name == SHARDED_CHECKPOINT else SHARDED_CHECKPOINT)


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and ints: Python's ``(version, 625 words, gauss)`` becomes a dict with the words as
    an int64 tensor (a tuple of ints would load too, but one tensor is what ``weights_only`` reads fastest)."""
    version, words, gauss = random.getstate()
    state = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    if isinstance(py, dict):  # this version's form; earlier versions wrote random.getstate()'s tuple itself
        py = (py["version"], tuple(py["words"].tolist()), py["gauss"])
    random.setstate(py)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name, detached and on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def nonfinite_entries(obj: Any, name: str = "") -> Iterator[str]:
    """The names (``a.b.0``) of the floating-point tensors and floats in ``obj`` (nested dicts, lists, tuples) that
    hold a NaN or an inf."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            yield name
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            yield name
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from nonfinite_entries(value, f"{name}.{key}" if name else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from nonfinite_entries(value, f"{name}.{i}" if name else str(i))


def require_finite(obj: Any, what: str) -> None:
    """Raise ``NonFiniteError`` naming the first entries of ``obj`` that hold a NaN or an inf; ``what`` says what
    would have been written (``"the checkpoint of step 3"``)."""
    bad = list(nonfinite_entries(obj))
    if bad:
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise NonFiniteError(f"{what} would hold NaN or inf values ({', '.join(bad[:4])}{more}); not written")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    scaler=None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    write: bool = True,
) -> None:
    """Write the resume state after ``step`` completed optimizer steps to ``path`` (atomic). A state holding a NaN or
    an inf is refused (``NonFiniteError``) and the file on disk stays the previous one. ``write=False`` runs the
    check only: under DDP every process checks, so all of them stop together, and one writes. A sharded model writes
    the folder ``path`` (``checkpoint_path``) with every process, whatever ``write`` says. Once written, the other
    kind of checkpoint beside it is removed (by the writing process)."""
    path = Path(path)
    if is_sharded(model):
        from lora_fast.study.sharded_checkpoint import save_sharded_checkpoint

        save_sharded_checkpoint(path, model, optimizer, scheduler, scaler, step, extra)
        if write:
            _remove(_other_kind(path))
        return
    state = {
        "step": step,
        "trainable": trainable_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
    }
    require_finite({k: state[k] for k in ("trainable", "optimizer", "scaler")}, f"the checkpoint of step {step}")
    if write:
        try:
            atomic_torch_save(state, path)
        except (OSError, RuntimeError) as exc:  # torch's writer reports a full disk as RuntimeError("enforce fail...")
            raise CheckpointError(
                f"the checkpoint of step {step} could not be written to {path} ({first_line(exc, 160)}): is the disk "
                f"full or the folder read-only? The previous checkpoint there is unchanged"
            ) from None
        _remove(_other_kind(path))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def read_plain(path: Path, holder: str, broken: str) -> Any:
    """``path`` read with ``weights_only=True`` (tensors and plain Python values only); a file holding anything else is
    refused as one that ``holder`` never writes, an unreadable one as ``broken`` (both a CheckpointError)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused: it holds Python objects other than tensors and plain values, which {holder} never "
            f"holds and which could run code when loaded ({first_line(exc, 160)})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} cannot be read ({first_line(exc, 160)}); {broken}") from None


def _read(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, its fields checked."""
    state = read_plain(path, "a checkpoint of train_sentiment.py", "the file is corrupt or truncated")
    keys = ("step", "trainable", "optimizer", "scheduler", "scaler", "rng", "extra")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise CheckpointError(f"{path} is not a checkpoint of train_sentiment.py (expected the fields {keys})")
    return state


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, scaler=None
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns ``{"step", "extra"}``. The trainable parameter names
    must match the model's exactly (a run resumed with another method or rank is refused), and a checkpoint holding
    NaN or inf values (one an older version wrote) is refused; either way before the model is touched."""
    path = Path(path)
    return _restore(path, _read(path), model, optimizer, scheduler, scaler)


def _restore(path: Path, state: dict, model: nn.Module, optimizer, scheduler, scaler) -> dict[str, Any]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for n, p in params.items():
        if saved[n].shape != p.shape:
            raise CheckpointError(f"checkpoint {path}: {n} has shape {tuple(saved[n].shape)}, model {tuple(p.shape)}")
    bad = list(nonfinite_entries({k: state[k] for k in ("trainable", "optimizer", "scaler")}))
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or inf values ({', '.join(bad[:4])}): it cannot be resumed")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


def check_resume_config(path: Path, run: dict | None, now: dict, may_change: set[str]) -> None:
    """Refuse (CheckpointError naming each flag and both values) to resume the run whose config was ``run`` with a
    config ``now`` that differs in a field outside ``may_change``: the run would go on as a mix of two
    configurations. A missing ``run`` (a checkpoint of an older version) is not checked."""
    differ = [] if run is None else flag_differences(run, now, may_change)
    if differ:
        may = ", ".join(flag_name(k) for k in sorted(may_change))
        raise CheckpointError(
            f"--resume: the run in {path.parent} was started with other values of {len(differ)} flag(s): "
            f"{'; '.join(differ)}. A resume continues the run as it started (these may change: {may}); start a new "
            f"run with --overwrite or another --out"
        )


def resume_path(path: str | os.PathLike, model: nn.Module) -> Path | None:
    """The checkpoint a run resumes for ``model`` given ``checkpoint_path``'s ``path``: ``path``, or None when there is
    none. A model that is not sharded resumes a sharded checkpoint beside ``path`` when there is no single file; a
    sharded one refuses a single file (``CheckpointError``: the run that wrote it resumes it)."""
    path, other = Path(path), _other_kind(Path(path))
    recover_directory(path.with_name(SHARDED_CHECKPOINT))
    if is_sharded(model) and not path.is_dir() and other.is_file():
        raise CheckpointError(
            f"--resume: {other} was written by a run on one process or under --parallel ddp, which resumes it; "
            f"--parallel fsdp resumes its own {path.name}/"
        )
    if not is_sharded(model) and not path.is_file() and other.is_dir():
        path = other
    return path if path.exists() else None


def resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    data_order: dict,
    config: dict | None = None,
    may_change: set[str] = frozenset(),
) -> tuple[int, dict[str, Any]]:
    """``(step, extra)`` restored from the checkpoint ``resume_path`` finds, or ``(0, {})`` when there is none. A
    checkpoint written with another data order (seed, step size, train examples), or with a ``config`` that differs
    outside ``may_change`` (``check_resume_config``), is refused: resuming it would not finish the run it started
    (a single file before the model is touched; a sharded one, whose config is read with it, before any step)."""
    from lora_fast.study.sharded_checkpoint import load_sharded_checkpoint

    path = resume_path(path, model)
    if path is None:
        return 0, {}
    if path.is_dir():
        state = load_sharded_checkpoint(path, model, optimizer, scheduler, scaler)
        if config is not None:
            check_resume_config(path, state["extra"].get("config"), config, may_change)
    else:
        saved = _read(path)
        if config is not None:
            check_resume_config(path, saved["extra"].get("config"), config, may_change)
        state = _restore(path, saved, model, optimizer, scheduler, scaler)
    if state["extra"].get("data_order") != data_order:
        raise CheckpointError(
            f"--resume: {path} was written with data order {state['extra'].get('data_order')}, this run has "
            f"{data_order}"
        )
    return state["step"], state["extra"]
