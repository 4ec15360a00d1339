"""The ``torch`` backend of :func:`lora_fast.lora_linear`: the explicit backward in torch ops, and the seeded dropout
masks it shares with the ``reference`` backend.

:class:`_TorchLoRAFunction` saves only ``x`` and the small ``h = drop(x) Aᵀ (M, R)``; the dropout mask is a boolean
keep-mask regenerated from ``seed`` in backward (:func:`seeded_keep_mask`), never stored. When the base and the LoRA
branch compute in one dtype other than x's (fp32 activations under bf16 autocast), the forward casts ``x`` to it once
for both products. ``x`` itself is what is saved, not that copy: layers that share an input (Llama's q/k/v
projections) then share one saved tensor instead of holding a copy each.
"""

from __future__ import annotations

import torch

from lora_fast import reference
from lora_fast.checks import compute_dtypes
from lora_fast.gguf.packed import PackedWeight

__all__ = ["draw_seed", "seeded_dropout_mask", "seeded_keep_mask"]


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


def _dense(weight: torch.Tensor | PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The base weight in ``dtype``: a cast, or a GGUF-packed weight dequantised just in time (freed after use)."""
    return weight.dequantize(dtype) if isinstance(weight, PackedWeight) else weight.to(dtype)


class _TorchLoRAFunction(torch.autograd.Function):
    """Explicit forward/backward in torch ops. Saved: ``x`` and ``h (M, R)``; the dropout mask is regenerated.
    The base weight and bias get gradients when the caller made them trainable (``dW = gᵀ x``, ``dbias = Σ g``).

    Dropout is a boolean keep-mask times ``1/keep`` (:func:`lora_fast.reference.keep_probability`); the factor is
    folded into the small operands (``h``, and the scalars of ``dA`` and ``dx``'s LoRA term), so each pass touches an
    ``(M, K)`` tensor once for the mask.

    Every autodiff mode PEFT's plain autograd supports works here too: the backward is itself differentiable (under
    ``create_graph`` it recomputes ``h`` from ``x`` and ``A`` instead of reading the saved, graph-less copy, so a
    Hessian-vector product is exact), forward mode has its own ``jvp`` (:class:`_TorchLoRAFunctionJVP`), and
    ``setup_context`` makes the function usable under ``torch.func`` transforms (``grad``, ``jvp``, ``jacrev``; not
    ``vmap`` with dropout, whose random mask has no batching rule).

    A GGUF-packed weight is dequantised in forward for ``x Wᵀ`` and again in backward for ``g W``; only its packed
    bytes are saved, so no float copy of it lives between the passes.
    """

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        base_dt, lora_dt = compute_dtypes(x, lora_A)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            xb = x2.to(base_dt)
            y = torch.nn.functional.linear(xb, _dense(weight, base_dt), None if bias is None else bias.to(base_dt))
            h = _h(xb if lora_dt == base_dt else x2, lora_A, lora_dt, dropout_p, seed)
            b = lora_B.to(lora_dt).t()
            if y.dtype == lora_dt:
                y.addmm_(h, b, alpha=scaling)  # y += s · h Bᵀ in place: no (M, N) temporary
            else:
                y.add_((h @ b).to(y.dtype), alpha=scaling)  # the LoRA term cast once to y's dtype
        return y.reshape(*x.shape[:-1], weight.shape[0]), h

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
        h = output[1]
        ctx.mark_non_differentiable(h)
        packed = isinstance(weight, PackedWeight)  # only its bytes are saved: no float copy between the passes
        saved = (x, weight.data if packed else weight, lora_A, lora_B, h)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.packed = (weight.qtype, weight.shape, weight.dtype) if packed else None
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.dtypes = compute_dtypes(x, lora_A)  # setup_context runs under the forward's autocast state
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        x, weight, lora_A, lora_B, h = _saved(ctx)
        base_dt, lora_dt = ctx.dtypes
        s, p = ctx.scaling, ctx.dropout_p
        scale = s / reference.keep_probability(p)  # s/keep, as the kernels name it
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
                if torch.is_grad_enabled():  # create_graph: dB must be differentiable in x and A, as h is
                    h = _h(x2, lora_A, lora_dt, p, ctx.seed)
                dB = (gl.t() @ h).mul_(s).to(lora_B.dtype)
            if need_x or need_A:
                u = gl @ lora_B.to(lora_dt)
            if need_A:
                xl = x2.to(lora_dt) if keep is None else x2.to(lora_dt) * keep
                dA = (u.t() @ xl).mul_(scale).to(lora_A.dtype)
            if need_x:
                dx = g2.to(base_dt) @ _dense(weight, base_dt)
                a = lora_A.to(lora_dt)
                if keep is None and dx.dtype == lora_dt:
                    dx.addmm_(u, a, alpha=s)  # dx += s · u A in place
                else:
                    lora_term = u @ a
                    if keep is not None:
                        lora_term.mul_(keep)
                    dx.add_(lora_term.to(dx.dtype), alpha=scale)
                dx = dx.reshape(x.shape).to(x.dtype)
            if need_W:
                # A base weight the caller made trainable: dW = gᵀ x in W's (N, K) layout; autograd routes it
                # through a Conv1D's .t() view to the stored (K, N) parameter.
                dW = (g2.to(base_dt).t() @ x2.to(base_dt)).to(weight.dtype)
            if need_bias and ctx.bias_dtype is not None:
                d_bias = g2.sum(0, dtype=torch.promote_types(g2.dtype, torch.float32)).to(ctx.bias_dtype)
        return dx, dW, d_bias, dA, dB, None, None, None


class _TorchLoRAFunctionJVP(_TorchLoRAFunction):
    """The same function with forward mode (``jvp``), what eager code runs: ``torch.compile`` cannot trace a custom
    ``jvp``, so compiled code runs :class:`_TorchLoRAFunction`, without one."""

    @staticmethod
    def jvp(ctx, t_x, t_W, t_bias, t_A, t_B, *_):
        """Forward mode: the tangent of y for the inputs' tangents (None where an input has none)."""
        x, weight, lora_A, lora_B, h = _saved(ctx)
        base_dt, lora_dt = ctx.dtypes
        s, p, seed = ctx.scaling, ctx.dropout_p, ctx.seed
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            a, bt = lora_A.to(lora_dt), lora_B.to(lora_dt).t()
            terms = []  # each (M, N), in y's dtype
            if t_x is not None:
                tx = t_x.reshape(x2.shape)
                terms += [
                    tx.to(base_dt) @ _dense(weight, base_dt).t(),
                    (s * (_h(tx, a, lora_dt, p, seed) @ bt)).to(base_dt),
                ]
            if t_W is not None:
                terms.append(x2.to(base_dt) @ t_W.to(base_dt).t())
            if t_bias is not None:
                terms.append(t_bias.to(base_dt).expand(x2.shape[0], -1))
            if t_A is not None:
                terms.append((s * (_h(x2, t_A, lora_dt, p, seed) @ bt)).to(base_dt))
            if t_B is not None:
                terms.append((s * (h @ t_B.to(lora_dt).t())).to(base_dt))
            t_y = sum(terms[1:], terms[0]) if terms else x2.new_zeros(x2.shape[0], weight.shape[0], dtype=base_dt)
        return t_y.reshape(*x.shape[:-1], weight.shape[0]), None


def _saved(ctx) -> tuple:
    """``(x, weight, lora_A, lora_B, h)`` as saved, a packed weight rebuilt around its saved bytes."""
    x, weight, lora_A, lora_B, h = ctx.saved_tensors
    return x, weight if ctx.packed is None else PackedWeight(weight, *ctx.packed), lora_A, lora_B, h


def _h(x2: torch.Tensor, lora_A: torch.Tensor, lora_dt: torch.dtype, p: float, seed) -> torch.Tensor:
    """``h = drop(x) Aᵀ`` (``(M, R)``, in ``lora_dt``): the keep-mask of ``seed`` and ``1/keep`` when ``p > 0``."""
    xl = x2.to(lora_dt)
    if p > 0.0:
        xl = xl * seeded_keep_mask(x2.shape, p, seed, x2.device)
    h = xl @ lora_A.to(lora_dt).t()
    return h.mul_(1.0 / reference.keep_probability(p)) if p > 0.0 else h


def _lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int | None,
) -> torch.Tensor:
    """``y = x Wᵀ + bias + scaling · (drop(x) Aᵀ) Bᵀ`` with the explicit backward; :func:`lora_fast.lora_linear`'s
    ``torch`` backend, on inputs it has checked (``scaling`` and ``dropout_p`` floats, an integer ``seed`` when
    ``dropout_p > 0``)."""
    fn = _TorchLoRAFunction if torch.compiler.is_compiling() else _TorchLoRAFunctionJVP
    return fn.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]
