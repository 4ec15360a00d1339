"""``--dtype``: the precision a run computes in, one rule for ``train_sentiment.py``, ``train_dpo.py`` and the
benchmarks.

- ``auto``: bf16 autocast where the device multiplies bf16 natively (:func:`lora_fast.precision.bf16_support`: a
  CPU with AMX tiles or avx512_bf16, a CUDA device of compute capability 8.0 or later); else, on CUDA, fp16 autocast
  with a GradScaler where the caller offers fp16 (``train_sentiment.py``), and fp32 everywhere else. So a CPU without
  native bf16 stays fp32, as it always was.
- ``fp32``, ``bf16``: forced (bf16 on a CPU without native bf16 runs, slower, and its reason says so).
- ``fp16``: CUDA only, with a GradScaler.

Under autocast the weights, the optimizer state and the loss stay fp32 (the master weights): autocast runs the
matmuls (``linear``, ``mm``, SDPA) in bf16 with fp32 accumulation and keeps losses and softmaxes in fp32, and every
training step upcasts the logits before its loss. A run records what it chose and why (:meth:`Precision.record`) in
config.json and summary.json, and its checkpoint holds the dtype, so a run resumed where ``auto`` would choose
otherwise is refused (:func:`check_resumed_dtype`) instead of finishing in another precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lora_fast.precision import bf16_support
from lora_fast.study.errors import CheckpointError, UsageError

__all__ = ["DTYPES", "AMP_DTYPES", "Precision", "choose_precision", "check_resumed_dtype"]

DTYPES = ("auto", "fp32", "bf16", "fp16")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """What a run computes in: ``dtype`` (``fp32``, ``bf16`` or ``fp16``), ``reason`` (one line, for the record) and
    the device's ``bf16`` capability as :func:`lora_fast.precision.bf16_support` read it."""

    dtype: str
    reason: str
    bf16: dict

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for fp32 (no autocast)."""
        return AMP_DTYPES[self.dtype]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """``torch.autocast`` at this precision on ``device`` (a no-op for fp32)."""
        amp = self.amp_dtype
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def record(self) -> dict:
        """``{"dtype", "reason", "bf16"}`` for config.json and summary.json (``"precision"``)."""
        return {"dtype": self.dtype, "reason": self.reason, "bf16": self.bf16}


def choose_precision(flag: str, device: torch.device, fp16: bool = True, name: str = "--dtype") -> Precision:
    """The precision ``flag`` (one of ``DTYPES``) means on ``device``; ``fp16`` says whether the caller can run fp16
    (it needs a GradScaler). A flag the device cannot run is a UsageError naming it."""
    if flag not in DTYPES or (flag == "fp16" and not fp16):
        offered = [d for d in DTYPES if fp16 or d != "fp16"]
        raise UsageError(f"{name} {flag}: expected one of {', '.join(offered)}")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{name} {flag}: autocast is used on cpu and cuda devices only, not {device}")
    support = bf16_support(device)
    if flag == "fp16" and device.type != "cuda":
        raise UsageError(f"{name} fp16: fp16 autocast with its GradScaler runs on CUDA only; on {device} use bf16")
    if flag != "auto":
        reason = f"{name} {flag}"
        if flag == "bf16" and not support.native:
            reason += f" (slower than fp32 here: {support.reason})"
        return Precision(flag, reason, support.as_dict())
    if support.native:
        return Precision("bf16", f"{name} auto: bf16 autocast, as {support.reason}", support.as_dict())
    if device.type == "cuda" and fp16:
        return Precision(
            "fp16", f"{name} auto: fp16 autocast with a GradScaler, as {support.reason}", support.as_dict()
        )
    return Precision("fp32", f"{name} auto: fp32, as {support.reason}", support.as_dict())


def check_resumed_dtype(extra: dict, precision: Precision, device: torch.device, path) -> None:
    """Refuse to resume a checkpoint (its ``extra``) written at another precision than ``precision``: the run would
    finish in another one than it started, and its records would name only the last. A checkpoint without the
    entry comes from before it was written, when a CPU run could only be fp32 (on CUDA nothing is known); an empty
    ``extra`` is no checkpoint at all, a fresh start."""
    if not extra:
        return
    saved = extra.get("dtype", "fp32" if device.type == "cpu" else None)
    if saved is not None and saved != precision.dtype:
        raise CheckpointError(
            f"--resume: {path} was trained in {saved}, and here --dtype gives {precision.dtype} ({precision.reason});"
            f" pass --dtype {saved} to finish it as it started"
        )
