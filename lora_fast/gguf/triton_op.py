"""The ``triton`` backend's dequantisation of a GGUF-packed base weight, as a custom op (``torch.compile`` traces it).

Per pass, :mod:`lora_fast.triton_backend` has the layer's weight dequantised by
:func:`lora_fast.kernels.gguf_dequant.gguf_dequantize` into a fresh buffer in the base GEMM's dtype, runs the fused
LoRA kernels on it (its ops, unchanged), and frees it: forward dequantises for ``x Wᵀ``, backward again for ``g W``;
only the packed bytes are saved between them. Why a buffer rather than a dequantise inside the GEMM's K loop: the
kernel module's docstring (the byte and FLOP counts at training sizes). The float weight the kernels see is bit for bit
the dequantised one, so the result is the float path's.
"""

from __future__ import annotations

import contextlib

import torch

from lora_fast.gguf.packed import PackedWeight
from lora_fast.kernels.gguf_dequant import gguf_dequantize

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
