"""The ``torch`` backend of :func:`lora_fast.lora_linear`: the explicit backward in torch ops, and the seeded dropout
masks it shares with the ``reference`` backend.

:class:`_TorchLoRAFunction` saves only ``x`` and the small ``h = drop(x) Aᵀ (M, R)``; the dropout mask is a boolean
keep-mask regenerated from ``seed`` in backward (:func:`seeded_keep_mask`), never stored.
"""

from __future__ import annotations

import torch

from lora_fast import reference
from lora_fast.checks import compute_dtypes

__all__ = ["draw_seed", "seeded_dropout_mask", "seeded_keep_mask", "torch_lora_linear"]


# ---------------------------------------------------------------- dropout from a seed


def draw_seed() -> int:
    """A fresh dropout seed from torch's default (CPU) generator, so ``torch.manual_seed`` makes runs repeatable."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def seeded_keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The boolean keep-mask of the ``torch`` and ``reference`` backends for ``seed``: the same call, the same mask."""
    return reference.keep_mask(shape, p, _generator(seed, device), device)


def seeded_dropout_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The dropout multiplier (0 or 1/keep, fp32) of :func:`seeded_keep_mask`'s mask."""
    return reference.dropout_mask(shape, p, _generator(seed, device), device)


# ---------------------------------------------------------------- autograd


class _TorchLoRAFunction(torch.autograd.Function):
    """Explicit forward/backward in torch ops. Saved: ``x`` and ``h (M, R)``; the dropout mask is regenerated.
    The base weight and bias get gradients when the caller made them trainable (``dW = gᵀ x``, ``dbias = Σ g``).

    Dropout is a boolean keep-mask times ``1/keep`` (:func:`lora_fast.reference.keep_probability`); the factor is
    folded into the small operands (``h``, and the scalars of ``dA`` and ``dx``'s LoRA term), so each pass touches an
    ``(M, K)`` tensor once for the mask.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        base_dt, lora_dt = compute_dtypes(x, lora_A)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            y = torch.nn.functional.linear(
                x2.to(base_dt), weight.to(base_dt), None if bias is None else bias.to(base_dt)
            )
            xl = x2.to(lora_dt)
            if dropout_p > 0.0:
                xl = xl * seeded_keep_mask(x2.shape, dropout_p, seed, x.device)
            h = xl @ lora_A.to(lora_dt).t()
            if dropout_p > 0.0:
                h.mul_(1.0 / reference.keep_probability(dropout_p))
            b = lora_B.to(lora_dt).t()
            if y.dtype == lora_dt:
                y.addmm_(h, b, alpha=scaling)  # y += s · h Bᵀ in place: no (M, N) temporary
            else:
                y.add_((h @ b).to(y.dtype), alpha=scaling)  # the LoRA term cast once to y's dtype
        ctx.save_for_backward(x, weight, lora_A, lora_B, h)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.dtypes = (base_dt, lora_dt)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, h = ctx.saved_tensors
        base_dt, lora_dt = ctx.dtypes
        s, p = ctx.scaling, ctx.dropout_p
        s_drop = s / reference.keep_probability(p)  # s times the dropout multiplier's kept value
        need_x, need_W, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        dx = dW = d_bias = dA = dB = None
        with torch.autocast(x.device.type, enabled=False):
            g2 = grad_y.reshape(-1, grad_y.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            gl = g2.to(lora_dt)
            keep = None
            if p > 0.0 and (need_x or need_A):
                keep = seeded_keep_mask(x2.shape, p, ctx.seed, x.device)
            if need_B:
                dB = (gl.t() @ h).mul_(s).to(lora_B.dtype)
            if need_x or need_A:
                u = gl @ lora_B.to(lora_dt)
            if need_A:
                xl = x2.to(lora_dt) if keep is None else x2.to(lora_dt) * keep
                dA = (u.t() @ xl).mul_(s_drop).to(lora_A.dtype)
            if need_x:
                dx = g2.to(base_dt) @ weight.to(base_dt)
                a = lora_A.to(lora_dt)
                if keep is None and dx.dtype == lora_dt:
                    dx.addmm_(u, a, alpha=s)  # dx += s · u A in place
                else:
                    lora_term = u @ a
                    if keep is not None:
                        lora_term.mul_(keep)
                    dx.add_(lora_term.to(dx.dtype), alpha=s_drop)
                dx = dx.reshape(x.shape).to(x.dtype)
            if need_W:
                # A base weight the caller made trainable: dW = gᵀ x in W's (N, K) layout; autograd routes it
                # through a Conv1D's .t() view to the stored (K, N) parameter.
                dW = (g2.to(base_dt).t() @ x2.to(base_dt)).to(weight.dtype)
            if need_bias and ctx.bias_dtype is not None:
                d_bias = g2.sum(0, dtype=torch.promote_types(g2.dtype, torch.float32)).to(ctx.bias_dtype)
        return dx, dW, d_bias, dA, dB, None, None, None


def torch_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int | None,
) -> torch.Tensor:
    """``y = x Wᵀ + bias + scaling · (drop(x) Aᵀ) Bᵀ`` with the explicit backward (inputs checked by the caller)."""
    return _TorchLoRAFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)
