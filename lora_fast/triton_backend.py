"""The ``triton`` backend of :func:`lora_fast.lora_linear`: autograd and ``torch.library`` glue over
:mod:`lora_fast.kernels`.

Three layers, thinnest first (Triton 06's ``attention = _attention.apply``):

- two custom ops, ``lora_fast::triton_lora_forward`` -> ``(y, h_s)`` and ``lora_fast::triton_lora_backward`` ->
  ``(dx, dA, dB, dbias)``, each with a fake (meta) implementation, so ``torch.compile`` traces through them without
  a graph break; the kernels return every gradient in its final dtype, so nothing runs between their launches;
- :class:`_TritonLoRAFunction`, the autograd Function calling them; it saves ``x``, ``W``, ``A``, ``B``, the small
  ``h_s = s · drop(x) Aᵀ (M, R)`` fp32 and the dropout key, never a dropout mask (the kernels regenerate it from the
  key);
- :func:`_lora_linear`, which fixes the compute dtypes, draws the dropout key and calls the Function; the inputs are
  checked before it, once, by :func:`lora_fast.lora_linear` (with :func:`check_supported` for what the kernels need).

Compute dtypes follow :func:`lora_fast.checks.compute_dtypes`: under autocast both the base GEMM and the LoRA
branch run in the autocast dtype; otherwise the base in x's dtype and the LoRA branch in A's. ``y`` comes back in the
base dtype, ``dx`` in x's dtype, ``dA``/``dB``/``dbias`` in A's/B's/bias's dtype. Autocast is resolved here, before
the ops, so the ops themselves take explicit dtypes and behave the same inside and outside an autocast region.
A base weight the caller made trainable gets ``dW = gᵀ x`` (a plain matmul beside the kernels).

Settings (:data:`config`): ``fp32_precision`` ("auto" by default: fp32 operands round as torch's own fp32 matmuls do
under the user's setting, see :func:`torch_fp32_precision`; "tf32" or "ieee", exact fp32, force one; env
``LORA_FAST_FP32_PRECISION``) and ``design`` ("auto" by default: fused, split or hybrid per pass and shape by the
cost model of :mod:`lora_fast.kernels.cost`, or by a measured table, ``LORA_FAST_DESIGNS=file.json``, and the
model it calibrates; "fused", "split" or "hybrid" force one; env ``LORA_FAST_DESIGN``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import torch

from lora_fast.checks import compute_dtypes
from lora_fast.gguf.packed import PackedWeight
from lora_fast.gguf.triton_op import triton_dequantize
from lora_fast.kernels.designs import CHOICES
from lora_fast.kernels.dropout import dropout_key
from lora_fast.kernels.lora_backward import launch_lora_backward
from lora_fast.kernels.lora_forward import launch_lora_forward
from lora_fast.kernels.utils import INPUT_PRECISIONS, TL_DTYPES, interpreting

__all__ = [
    "DESIGNS",
    "FP32_PRECISIONS",
    "TritonConfig",
    "config",
    "fp32_precision",
    "torch_fp32_precision",
    "check_supported",
]

DESIGNS = CHOICES  # "auto", "fused", "split", "hybrid"
FP32_PRECISIONS = ("auto", *INPUT_PRECISIONS)


@dataclasses.dataclass
class TritonConfig:
    """Process-wide settings of the triton backend (read at every call)."""

    fp32_precision: str = os.environ.get("LORA_FAST_FP32_PRECISION", "auto")
    design: str = os.environ.get("LORA_FAST_DESIGN", "auto")


config = TritonConfig()


# Evaluated when torch.compile traces a call: Dynamo cannot trace torch's precision getters, and its global-state
# guard recompiles when the setting changes.
@torch.compiler.assume_constant_result
def torch_fp32_precision() -> str:
    """The ``tl.dot`` precision that rounds fp32 operands as torch's own fp32 CUDA matmuls do now: "ieee" under
    ``torch.set_float32_matmul_precision("highest")`` (torch's default), "tf32" under "high" or "medium" (or the newer
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``)."""
    # The per-backend setting reflects both APIs; torch.get_float32_matmul_precision() raises once they are mixed.
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"


def fp32_precision() -> str:
    """The ``tl.dot`` precision the next call gives fp32 operands: ``config.fp32_precision``, "auto" meaning
    :func:`torch_fp32_precision`."""
    return torch_fp32_precision() if config.fp32_precision == "auto" else config.fp32_precision


# ---------------------------------------------------------------- what the kernels need beyond check_lora_inputs


def check_supported(
    x: torch.Tensor,
    weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
) -> None:
    """What the kernels need on top of :func:`lora_fast.checks.check_lora_inputs` (which :func:`lora_fast.lora_linear`
    has run): a device they run on, dtypes ``tl.dot`` takes (a GGUF-packed weight is dequantised to the base dtype,
    one it takes), known settings. Raises before any launch, naming the tensor or setting."""
    dev = x.device
    if dev.type == "cpu" and not interpreting():
        raise RuntimeError(
            "the triton backend got CPU tensors, but Triton runs on CPU only under its interpreter: "
            "set TRITON_INTERPRET=1 before triton is imported, move the tensors to CUDA, or use "
            "backend='torch'"
        )
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the triton backend runs on CUDA (or CPU under TRITON_INTERPRET=1), got x on {dev}")
    names = {"x": x, "lora_A": lora_A, "lora_B": lora_B}
    if isinstance(weight, torch.Tensor):  # not a PackedWeight
        names["weight"] = weight
    if bias is not None:
        names["bias"] = bias
    for name, t in names.items():
        if t.dtype not in TL_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; the triton backend takes {list(TL_DTYPES)} "
                f"(use backend='torch' for others)"
            )
    if torch.is_autocast_enabled(dev.type) and torch.get_autocast_dtype(dev.type) not in TL_DTYPES:
        raise TypeError(
            f"autocast dtype {torch.get_autocast_dtype(dev.type)} is not one the triton backend takes "
            f"({list(TL_DTYPES)})"
        )
    if config.fp32_precision not in FP32_PRECISIONS:
        raise ValueError(
            f"lora_fast.triton_backend.config.fp32_precision must be one of {FP32_PRECISIONS}, "
            f"got {config.fp32_precision!r}"
        )
    if config.design not in DESIGNS:
        raise ValueError(f"lora_fast.triton_backend.config.design must be one of {DESIGNS}, got {config.design!r}")


# ---------------------------------------------------------------- custom ops (torch.compile sees these)


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device and its stream: make them the tensors' (cuda:1 while the current
    device is cuda:0, say). Nothing to switch under the CPU interpreter."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("lora_fast::triton_lora_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    key: torch.Tensor | None,
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    design: str,
    input_precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y (..., N) in base_dtype, h_s (M, R) fp32)``."""
    # The kernels read any 2-D strides; reshape copies only when the leading dims cannot be flattened into one
    # stride (e.g. a permuted 3-D x), never for a plain non-contiguous 2-D view.
    x2 = x.reshape(-1, x.shape[-1])
    with _on_device(x.device):
        y, h_s = launch_lora_forward(
            x2, weight, bias, lora_A, lora_B, scaling, dropout_p, key,
            base_dtype=base_dtype, lora_dtype=lora_dtype, design=design, input_precision=input_precision,
        )  # fmt: skip
    return y.reshape(*x.shape[:-1], weight.shape[0]), h_s


@_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, key, base_dtype, lora_dtype, design, input_precision):
    m = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=base_dtype)
    return y, x.new_empty((m, lora_A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lora_fast::triton_lora_backward", mutates_args=())
def _backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    h_s: torch.Tensor,
    scaling: float,
    dropout_p: float,
    key: torch.Tensor | None,
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    bias_dtype: torch.dtype,
    design: str,
    input_precision: str,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx like x, dA like lora_A, dB like lora_B, dbias (N,) in bias_dtype)``; a gradient not asked for comes back
    as an empty tensor."""
    x2 = x.reshape(-1, x.shape[-1])
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    with _on_device(x.device):
        dx, dA, dB, dbias = launch_lora_backward(
            g2, x2, weight, lora_A, lora_B, h_s, scaling, dropout_p, key,
            need_dx=need_dx, need_dA=need_dA, need_dB=need_dB, need_dbias=need_dbias, bias_dtype=bias_dtype,
            base_dtype=base_dtype, lora_dtype=lora_dtype, design=design, input_precision=input_precision,
        )  # fmt: skip
    return (
        dx.reshape(x.shape) if need_dx else x.new_empty(0),
        dA if need_dA else lora_A.new_empty(0),
        dB if need_dB else lora_B.new_empty(0),
        dbias if need_dbias else grad_y.new_empty(0, dtype=bias_dtype),
    )


@_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, h_s, scaling, dropout_p, key, base_dtype, lora_dtype, bias_dtype, design,
      input_precision, need_dx, need_dA, need_dB, need_dbias):  # fmt: skip
    return (
        torch.empty_like(x) if need_dx else x.new_empty(0),
        torch.empty_like(lora_A) if need_dA else lora_A.new_empty(0),
        torch.empty_like(lora_B) if need_dB else lora_B.new_empty(0),
        grad_y.new_empty((weight.shape[0],) if need_dbias else (0,), dtype=bias_dtype),
    )


# ---------------------------------------------------------------- autograd


def _dense(weight: torch.Tensor, packed: tuple | None, dtype: torch.dtype) -> torch.Tensor:
    """The base weight the kernels read: ``weight`` itself, or, for a GGUF-packed base (``packed`` = its qtype, shape
    and dtype; ``weight`` its bytes), a fresh buffer dequantised to ``dtype`` by the Triton kernel (freed after use)."""
    if packed is None:
        return weight
    return triton_dequantize(PackedWeight(weight, *packed), dtype)


class _TritonLoRAFunction(torch.autograd.Function):
    """Saved for backward: x, W (a packed base: its bytes only), A, B, h_s (M, R) fp32 and the dropout key; the mask
    is regenerated from the key, a packed W dequantised again."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, key, base_dtype, lora_dtype, design, prec,
                packed):  # fmt: skip
        y, h_s = torch.ops.lora_fast.triton_lora_forward(
            x, _dense(weight, packed, base_dtype), bias, lora_A, lora_B, scaling, dropout_p, key, base_dtype,
            lora_dtype, design, prec,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, lora_A, lora_B, h_s, key)
        ctx.packed = packed
        ctx.args = (scaling, dropout_p)
        ctx.dtypes = (base_dtype, lora_dtype)
        ctx.bias_dtype = base_dtype if bias is None else bias.dtype
        ctx.options = (design, prec)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, h_s, key = ctx.saved_tensors
        need_dx, need_dW, need_dbias, need_dA, need_dB = ctx.needs_input_grad[:5]  # packed bytes: never need_dW
        dx = dW = dbias = dA = dB = None
        if need_dx or need_dA or need_dB or need_dbias:
            dx, dA, dB, dbias = torch.ops.lora_fast.triton_lora_backward(
                grad_y, x, _dense(weight, ctx.packed, ctx.dtypes[0]), lora_A, lora_B, h_s, *ctx.args, key,
                *ctx.dtypes, ctx.bias_dtype, *ctx.options, need_dx, need_dA, need_dB, need_dbias,
            )  # fmt: skip
            dx, dA, dB = (dx if need_dx else None), (dA if need_dA else None), (dB if need_dB else None)
            dbias = dbias if need_dbias else None
        if need_dW:
            # A base weight the caller made trainable: dW = gᵀ x in W's (N, K) layout (autograd routes it through
            # a Conv1D's .t() view to the stored (K, N) parameter); a plain matmul in the base dtype.
            base_dtype = ctx.dtypes[0]
            g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(base_dtype)
            dW = (g2.t() @ x.reshape(-1, x.shape[-1]).to(base_dtype)).to(weight.dtype)
        return dx, dW, dbias, dA, dB, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------- entry point


def _lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | PackedWeight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int | None,
) -> torch.Tensor:
    """``y = x Wᵀ + bias + scaling · (drop(x) Aᵀ) Bᵀ`` by the fused kernels, ``weight (N, K)`` with any strides or
    GGUF-packed (dequantised per pass into a fresh buffer, :mod:`lora_fast.gguf.triton_op`; only its bytes are saved):
    :func:`lora_fast.lora_linear`'s ``triton`` backend, on inputs it has checked.

    With ``dropout_p > 0`` the mask's key is drawn on x's device from torch's generator when ``seed`` is None (a new
    mask per call and per CUDA-graph replay; :func:`lora_fast.kernels.dropout.dropout_key`), else fixed by ``seed``.
    """
    base_dtype, lora_dtype = compute_dtypes(x, lora_A)
    key = dropout_key(x.device, seed) if dropout_p > 0 else None
    packed = None
    if isinstance(weight, PackedWeight):
        weight, packed = weight.data, (weight.qtype, weight.shape, weight.dtype)
    return _TritonLoRAFunction.apply(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, key, base_dtype, lora_dtype, config.design,
        fp32_precision(), packed,
    )  # fmt: skip
