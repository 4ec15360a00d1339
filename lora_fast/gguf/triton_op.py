"""The ``triton`` backend of :func:`lora_fast.lora_linear` over a GGUF-packed base weight.

Per pass, the layer's weight is dequantised by :func:`lora_fast.kernels.gguf_dequant.gguf_dequantize` into a fresh
buffer in the base GEMM's dtype, the fused LoRA kernels run on it (the ops of :mod:`lora_fast.triton_backend`,
unchanged), and it is freed: forward dequantises for ``x Wᵀ``, backward again for ``g W``; only the packed bytes are
saved between them. Why a buffer rather than a dequantise inside the GEMM's K loop: the kernel module's docstring
(the byte and FLOP counts at training sizes). The float weight the kernels see is bit for bit the dequantised one, so
the result is the float path's.
"""

from __future__ import annotations

import contextlib

import torch

from lora_fast.checks import compute_dtypes
from lora_fast.gguf.packed import PackedWeight
from lora_fast.kernels.dropout import dropout_key
from lora_fast.kernels.gguf_dequant import gguf_dequantize
from lora_fast.triton_backend import config, fp32_precision

__all__ = ["triton_dequantize"]


@torch.library.custom_op("lora_fast::gguf_dequantize", mutates_args=())
def _dequantize_op(data: torch.Tensor, qtype: str, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The float weight ``(N, k)`` of ``dtype`` from packed ``data``."""
    # Triton launches on the current CUDA device: make it data's (nothing to switch under the CPU interpreter).
    with torch.cuda.device(data.device) if data.device.type == "cuda" else contextlib.nullcontext():
        return gguf_dequantize(data, qtype, k, dtype)


@_dequantize_op.register_fake
def _(data, qtype, k, dtype):
    return data.new_empty((data.shape[0], k), dtype=dtype)


def triton_dequantize(weight: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` dequantised by the Triton kernel (CUDA, or the CPU under ``TRITON_INTERPRET=1``)."""
    return torch.ops.lora_fast.gguf_dequantize(weight.data, weight.qtype, weight.shape[1], dtype)


class _TritonPackedLoRAFunction(torch.autograd.Function):
    """Saved for backward: x, the packed bytes, A, B, h_s (M, R) fp32 and the dropout key; W is dequantised again in
    backward."""

    @staticmethod
    def forward(ctx, x, data, bias, lora_A, lora_B, scaling, dropout_p, key, meta, base_dtype, lora_dtype, options):
        qtype, shape, dtype = meta
        w = triton_dequantize(PackedWeight(data, qtype, shape, dtype), base_dtype)
        y, h_s = torch.ops.lora_fast.triton_lora_forward(
            x, w, bias, lora_A, lora_B, scaling, dropout_p, key, base_dtype, lora_dtype, *options
        )
        ctx.save_for_backward(x, data, lora_A, lora_B, h_s, key)
        ctx.args = (scaling, dropout_p)
        ctx.dtypes = (base_dtype, lora_dtype)
        ctx.meta, ctx.options = meta, options
        ctx.bias_dtype = base_dtype if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, data, lora_A, lora_B, h_s, key = ctx.saved_tensors
        need_dx, _, need_dbias, need_dA, need_dB = ctx.needs_input_grad[:5]
        if not (need_dx or need_dA or need_dB or need_dbias):
            return (None,) * 12
        w = triton_dequantize(PackedWeight(data, *ctx.meta), ctx.dtypes[0])
        dx, dA, dB, dbias = torch.ops.lora_fast.triton_lora_backward(
            grad_y, x, w, lora_A, lora_B, h_s, *ctx.args, key, *ctx.dtypes, ctx.bias_dtype, *ctx.options,
            need_dx, need_dA, need_dB, need_dbias,
        )  # fmt: skip
        return (
            dx if need_dx else None, None, dbias if need_dbias else None, dA if need_dA else None,
            dB if need_dB else None, None, None, None, None, None, None, None,
        )  # fmt: skip


def _packed_lora_linear(
    x: torch.Tensor,
    weight: PackedWeight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int | None,
) -> torch.Tensor:
    """``y = x Wᵀ + bias + scaling · (drop(x) Aᵀ) Bᵀ`` for a packed ``W``: :func:`lora_fast.lora_linear`'s ``triton``
    backend on a GGUF-packed weight, on inputs it has checked; the dropout key drawn as
    :func:`lora_fast.triton_backend._lora_linear` draws it."""
    base_dtype, lora_dtype = compute_dtypes(x, lora_A)
    key = dropout_key(x.device, seed) if dropout_p > 0 else None
    return _TritonPackedLoRAFunction.apply(
        x, weight.data, bias, lora_A, lora_B, scaling, dropout_p, key,
        (weight.qtype, weight.shape, weight.dtype), base_dtype, lora_dtype, (config.design, fp32_precision()),
    )  # fmt: skip
