"""The functional LoRA op, ``lora_linear``: it checks the inputs and dispatches to a backend.

``y = x Wᵀ + bias + s · (drop(x) Aᵀ) Bᵀ`` (letters as in :mod:`lora_fast.reference`). Callers pick a backend:

- ``reference``: plain autograd over :func:`lora_fast.reference.lora_forward`; the dropout mask is an ordinary tensor.
- ``torch``: :mod:`lora_fast.torch_backend`, the explicit backward in torch ops. It saves only ``x`` and the small
  ``h = drop(x) Aᵀ (M, R)``; the dropout mask is regenerated from ``seed`` in backward, never stored.
- ``triton``: :mod:`lora_fast.triton_backend`, the fused kernels of :mod:`lora_fast.kernels` (CUDA; the CPU runs them
  under ``TRITON_INTERPRET=1``).
- ``auto``: ``triton`` for CUDA tensors when Triton is importable, ``torch`` elsewhere.

Every backend gives the base weight and bias gradients when the caller made them trainable. The base weight may be a
GGUF-packed :class:`lora_fast.gguf.PackedWeight` (frozen): each backend dequantises it where it needs it.
"""

from __future__ import annotations

import torch

from lora_fast import reference, torch_backend
from lora_fast.checks import check_lora_inputs, compute_dtypes
from lora_fast.gguf.packed import PackedWeight
from lora_fast.torch_backend import draw_seed, seeded_dropout_mask, seeded_keep_mask

__all__ = [
    "BACKENDS",
    "lora_linear",
    "check_lora_inputs",
    "draw_seed",
    "seeded_dropout_mask",
    "seeded_keep_mask",
    "resolve_backend",
]

BACKENDS = ("auto", "reference", "torch", "triton")


def check_backend(backend: str) -> None:
    """Refuse a name outside ``BACKENDS``, listing them: what every public entry that takes a backend runs first."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` means for tensors on ``device``."""
    check_backend(backend)
    if backend != "auto":
        return backend
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | PackedWeight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x Wᵀ + bias + scaling · (drop(x) Aᵀ) Bᵀ`` for ``x (..., K)``, ``weight (N, K)``.

    For a transformers ``Conv1D`` (which stores ``(K, N)``) pass ``conv1d.weight.t()``: a view, never a copy.
    Dropout (probability ``dropout_p``, LoRA branch only, a multiple of 1/65536) applies when ``training``; its mask
    comes from ``seed``, so a given seed gives a deterministic result. When None, torch's generator draws it: the CPU
    generator for ``reference`` and ``torch``; for ``triton`` the generator of x's device, on the device, so a step
    captured in a CUDA graph draws a new mask at each replay. Either way ``torch.manual_seed`` makes runs repeatable
    and ``torch.utils.checkpoint`` recomputes the same mask. A GGUF-packed
    ``weight`` gives the values of its dequantised float weight (dequantised per call, never kept).

    The inputs are checked here, once (:func:`lora_fast.checks.check_lora_inputs`, and for ``triton`` what the kernels
    need on top, :func:`lora_fast.triton_backend.check_supported`); the backends behind it check nothing again.
    """
    check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    check_backend(backend)
    return _apply(
        x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p) if training else 0.0, seed, backend
    )  # fmt: skip


def _apply(
    x: torch.Tensor,
    weight: torch.Tensor | PackedWeight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    s: float,
    p: float,
    seed: int | None,
    backend: str,
) -> torch.Tensor:
    """:func:`lora_linear` on checked inputs: ``s`` and ``p`` floats, ``p`` 0 outside training, ``backend`` one of
    ``BACKENDS``. Resolves ``auto`` and runs the backend (``LoRALinear`` calls this after checking its input
    tensors; its numbers were checked when it was built)."""
    which = resolve_backend(backend, x.device)
    if p > 0.0 and seed is None and which != "triton":  # triton draws its key on the device itself
        seed = draw_seed()
    if which == "reference":
        mask = None if p == 0.0 else seeded_dropout_mask(tuple(x.shape), p, seed, x.device)
        _, lora_dt = compute_dtypes(x, lora_A)
        if isinstance(weight, PackedWeight):
            weight = weight.dequantize(x.dtype)
        y, _ = reference.lora_forward(x, weight, bias, lora_A, lora_B, s, mask, lora_dtype=lora_dt)
        return y
    if which == "torch":
        return torch_backend._lora_linear(x, weight, bias, lora_A, lora_B, s, p, seed)
    # Imported here: Triton is optional (no wheels outside Linux), and only this backend needs it.
    from lora_fast import triton_backend

    triton_backend.check_supported(x, weight, bias, lora_A, lora_B)
    return triton_backend._lora_linear(x, weight, bias, lora_A, lora_B, s, p, seed)
