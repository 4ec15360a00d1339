"""Resume state for training runs, written atomically.

A checkpoint holds what an interrupted run needs to finish exactly as an uninterrupted one would: the trainable
weights (whatever the method: LoRA's A and B, biases, adapters, or the whole model), the optimizer, scheduler and
GradScaler states, the step, the data order (the seed and batch size that ``training.step_indices`` derives it
from) and every RNG state (Python, torch CPU, CUDA). Writes go through ``lora_fast.io.atomic_torch_save``, so a kill
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_fast.io import atomic_torch_save
from lora_fast.study.errors import UsageError

__all__ = [
    "rng_state",
    "set_rng_state",
    "trainable_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "resume",
]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name, detached and on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    scaler=None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the resume state after ``step`` completed optimizer steps to ``path`` (atomic)."""
    state = {
        "step": step,
        "trainable": trainable_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
    }
    atomic_torch_save(state, path)


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, scaler=None
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns ``{"step", "extra"}``. The trainable parameter names
    must match the model's exactly (a run resumed with another method or rank is refused)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"checkpoint {path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise ValueError(f"checkpoint {path}: {n} has shape {tuple(saved[n].shape)}, model {tuple(p.shape)}")
            p.copy_(saved[n])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


def resume(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, data_order: dict
) -> tuple[int, dict[str, Any]]:
    """``(step, extra)`` restored from the checkpoint at ``path``, or ``(0, {})`` when there is none. A checkpoint
    written with another data order (seed, step size, train examples) is refused: resuming it would not finish the
    run it started."""
    if not path.is_file():
        return 0, {}
    state = load_checkpoint(path, model, optimizer, scheduler, scaler)
    if state["extra"].get("data_order") != data_order:
        raise UsageError(
            f"--resume: {path} was written with data order {state['extra'].get('data_order')}, this run has "
            f"{data_order}"
        )
    return state["step"], state["extra"]
