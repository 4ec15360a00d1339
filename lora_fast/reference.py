"""The specification of a LoRA linear layer, in plain PyTorch.

Letters (used everywhere in lora-fast):

    M tokens (leading dims of x flattened), K in_features, N out_features, R rank, s = alpha / r
    x (M, K)   W (N, K)   bias (N,)   A = lora_A (R, K)   B = lora_B (N, R)

Forward, with ``drop(x) = x * mask`` and ``mask`` holding 0 or 1 / keep (``keep`` the mask's real keep
probability, 1 - p to the mask's resolution of 1/65536, :func:`keep_probability`):

    h = drop(x) Aᵀ                      (M, R)
    y = x Wᵀ + bias + s · h Bᵀ          (M, N)

Backward, with ``g = dL/dy`` and W frozen (no dW):

    u  = g B                            (M, R)
    dB = s · gᵀ h                       (N, R)
    dA = s · uᵀ drop(x)                 (R, K)
    dx = g W + s · drop'(u A)           (M, K)   drop' multiplies by the same mask

Every backend of :func:`lora_fast.lora_linear` is checked against these functions. They favour clarity over speed.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DROPOUT_LANES",
    "dropout_mask",
    "dropout_threshold",
    "keep_mask",
    "keep_probability",
    "lora_forward",
    "lora_backward",
]

# p's resolution: a mask element compares 16 random bits with round(p · 2¹⁶), so p is a multiple of 1/65536.
DROPOUT_LANES = 65536


def dropout_threshold(p: float, name: str = "dropout_p") -> int:
    """``round(p · 2¹⁶)``: 16 random bits below it drop an element. Refuses (ValueError naming ``name`` and the
    value) a p outside [0, 1), and one that rounds to "keep all" (0, unless p is exactly 0) or "drop all" (2¹⁶): the
    mask cannot draw them, and scaling by 1/(1-p) would then be wrong."""
    if not 0.0 <= p < 1.0:  # NaN fails both comparisons
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    threshold = round(p * DROPOUT_LANES)
    if threshold >= DROPOUT_LANES:
        raise ValueError(
            f"{name} = {p} rounds to 1 at the dropout mask's resolution of 1/{DROPOUT_LANES}, which would drop "
            f"every element; use {name} <= {(DROPOUT_LANES - 1) / DROPOUT_LANES}"
        )
    if threshold == 0 and p != 0.0:
        raise ValueError(
            f"{name} = {p} rounds to 0 at the dropout mask's resolution of 1/{DROPOUT_LANES}, which would drop "
            f"nothing; use {name} = 0 or {name} >= {1 / DROPOUT_LANES}"
        )
    return threshold


def keep_probability(p: float) -> float:
    """The probability that the mask keeps an element: ``(2¹⁶ - round(p · 2¹⁶)) / 2¹⁶``, within 7.6e-6 of 1 - p.
    Kept elements are scaled by its inverse, so ``E[mask] = 1`` exactly (1/(1-p) would be 1.0071× too large at
    p = 0.999)."""
    return (DROPOUT_LANES - dropout_threshold(p)) / DROPOUT_LANES


def keep_mask(
    shape: tuple[int, ...], p: float, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A boolean mask of ``shape``: False (dropped) with probability ``p`` quantised to 2⁻¹⁶ (within 7.6e-6 of p;
    :func:`dropout_threshold` refuses a p that rounds to 0 or 1).

    Each element compares 16 random bits with ``round(p · 2¹⁶)``; the bits come four to a 64-bit draw, which on a
    CPU is about four times cheaper than ``torch.rand`` or ``bernoulli_``. The same generator state, the same mask.
    """
    threshold = dropout_threshold(p)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    lanes = words.view(torch.int16)[:n].reshape(shape)  # uniform on [-2¹⁵, 2¹⁵)
    return lanes >= threshold - DROPOUT_LANES // 2


def dropout_mask(
    shape: tuple[int, ...], p: float, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A dropout multiplier of ``shape``: 0 with probability ``p``, else ``1 / keep`` (fp32), keep the mask's real
    keep probability (:func:`keep_probability`)."""
    return keep_mask(shape, p, generator, device).to(torch.float32) / keep_probability(p)


def _drop(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask.to(x.dtype)


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    lora_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y, h)`` for ``x (..., K)``: ``y = x Wᵀ + bias + s · h Bᵀ`` with ``h = drop(x) Aᵀ``.

    ``mask`` (same shape as ``x``) is the dropout multiplier of :func:`dropout_mask`; ``None`` means no dropout.
    ``lora_dtype`` is the LoRA branch's compute dtype when it differs from x's (fp32 ``A``/``B`` beside bf16 ``x``):
    x enters the branch cast to it and the branch's result is cast to the base product's dtype before the sum. The
    base product is ``nn.functional.linear``, so under autocast it runs (bias included) as ``nn.Linear`` would.
    """
    xl = x if lora_dtype is None else x.to(lora_dtype)
    h = _drop(xl, mask) @ lora_A.t()
    base = torch.nn.functional.linear(x, weight, bias)
    y = base + (scaling * (h @ lora_B.t())).to(base.dtype)
    return y, h


def lora_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(dx, dA, dB)`` for upstream gradient ``g (..., N)``, by the explicit formulas above."""
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    m2 = None if mask is None else mask.reshape(x2.shape)
    h = _drop(x2, m2) @ lora_A.t()
    u = g2 @ lora_B
    d_B = scaling * (g2.t() @ h)
    d_A = scaling * (u.t() @ _drop(x2, m2))
    d_x = g2 @ weight + scaling * _drop(u @ lora_A, m2)
    return d_x.reshape(x.shape), d_A, d_B
