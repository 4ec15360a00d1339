"""The functional LoRA op, ``lora_linear``, and its ``reference`` and ``torch`` backends.

``y = x Wᵀ + bias + s · (drop(x) Aᵀ) Bᵀ`` (letters as in :mod:`lora_fast.reference`). Callers pick a backend:

- ``reference``: plain autograd over :func:`lora_fast.reference.lora_forward`; the dropout mask is an ordinary tensor.
- ``torch``: :class:`_TorchLoRAFunction`, the explicit backward in torch ops. It saves only ``x`` and the small
  ``h = drop(x) Aᵀ (M, R)``; the dropout mask is regenerated from ``seed`` in backward, never stored.
- ``triton``: the fused kernels of :mod:`lora_fast.kernels` (CUDA; the CPU runs them under ``TRITON_INTERPRET=1``).
- ``auto``: ``triton`` for CUDA tensors when Triton is importable, ``torch`` elsewhere.
"""

from __future__ import annotations

import torch

from lora_fast import reference

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


# ---------------------------------------------------------------- input checks (shared by every backend)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_lora_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
) -> None:
    """Raise a clear error naming the tensor and the expected/actual value when the inputs do not fit together.

    Expected: ``x (..., K)``, ``weight (N, K)``, ``bias (N,)`` or None, ``lora_A (R, K)`` with R ≥ 1,
    ``lora_B (N, R)``; all on one device; ``x``, ``weight`` and ``bias`` of one floating dtype (``lora_A``/``lora_B``
    may differ: fp32 masters beside bf16 activations are the usual mixed-precision set-up).
    """
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension (..., in_features), got {_describe(x)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {_describe(weight)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight (out_features, in_features) = {(n, k)} "
            f"expects {k}; for a transformers Conv1D pass conv1d.weight.t() (got x {_describe(x)})"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must be (r, in_features) = (r, {k}), got {_describe(lora_A)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got lora_A {_describe(lora_A)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must be (out_features, r) = ({n}, {r}), got {_describe(lora_B)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias must be (out_features,) = ({n},), got {_describe(bias)}")
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    for name in ("weight", "bias"):
        t = tensors.get(name)
        if t is not None and t.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match (or run under torch.autocast)"
            )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a dtype")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python number, got {type(scaling).__name__}")


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
    """The dropout multiplier (0 or 1/(1-p), fp32) of :func:`seeded_keep_mask`'s mask."""
    return reference.dropout_mask(shape, p, _generator(seed, device), device)


# ---------------------------------------------------------------- the torch backend


def _compute_dtypes(x: torch.Tensor, lora_A: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(base dtype, LoRA dtype). Under autocast both are the autocast dtype, as nn.Linear would do; otherwise the base
    GEMM runs in x's dtype and the LoRA branch in A's (PEFT casts x to lora_A's dtype the same way)."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        return dt, dt
    return x.dtype, lora_A.dtype


class _TorchLoRAFunction(torch.autograd.Function):
    """Explicit forward/backward in torch ops. Saved: ``x`` and ``h (M, R)``; the dropout mask is regenerated.

    Dropout is a boolean keep-mask times ``1/(1-p)``; the factor is folded into the small operands (``h``, and the
    scalars of ``dA`` and ``dx``'s LoRA term), so each pass touches an ``(M, K)`` tensor once for the mask.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        base_dt, lora_dt = _compute_dtypes(x, lora_A)
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
                h.mul_(1.0 / (1.0 - dropout_p))
            b = lora_B.to(lora_dt).t()
            if y.dtype == lora_dt:
                y.addmm_(h, b, alpha=scaling)  # y += s · h Bᵀ in place: no (M, N) temporary
            else:
                y.add_((h @ b).to(y.dtype), alpha=scaling)  # the LoRA term cast once to y's dtype
        ctx.save_for_backward(x, weight, lora_A, lora_B, h)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.dtypes = (base_dt, lora_dt)
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, h = ctx.saved_tensors
        base_dt, lora_dt = ctx.dtypes
        s, p = ctx.scaling, ctx.dropout_p
        s_drop = s / (1.0 - p)  # s times the dropout multiplier's kept value
        need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        dx = d_bias = dA = dB = None
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
            if need_bias and ctx.has_bias:
                d_bias = g2.sum(0)
        return dx, None, d_bias, dA, dB, None, None, None


# ---------------------------------------------------------------- the functional op


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` means for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
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
    weight: torch.Tensor,
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
    Dropout (probability ``dropout_p``, LoRA branch only) applies when ``training``; its mask comes from ``seed``
    (drawn from torch's generator when None), so a given seed gives a deterministic result.
    """
    check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = draw_seed()
    which = resolve_backend(backend, x.device)
    if which == "reference":
        mask = None if p == 0.0 else seeded_dropout_mask(tuple(x.shape), p, seed, x.device)
        base_dt, lora_dt = _compute_dtypes(x, lora_A)
        y_base = torch.nn.functional.linear(x, weight, bias)
        h = (x.to(lora_dt) if mask is None else x.to(lora_dt) * mask.to(lora_dt)) @ lora_A.t()
        return y_base + (scaling * (h @ lora_B.t())).to(y_base.dtype)
    if which == "torch":
        return _TorchLoRAFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), p, seed)
    from lora_fast.triton_backend import triton_lora_linear

    return triton_lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), p, seed)
