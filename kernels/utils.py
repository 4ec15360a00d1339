"""Helpers shared by the LoRA kernels: the dot product every kernel uses, block sizes for the rank, launch settings.

``_dot(a, b, acc)`` accumulates ``a @ b`` into the fp32 ``acc``. Two details hide in it:

- fp32 operands go through ``tl.dot`` with ``INPUT_PRECISION`` ("tf32" is the fast default on NVIDIA, about 3e-4
  relative error; "ieee" is exact fp32 and is what the exactness tests use). fp16/bf16 operands ignore it.
- Triton's interpreter multiplies the raw bit patterns of bfloat16 operands (triton #11584). With ``UPCAST_BF16``
  (set by the launchers only when ``TRITON_INTERPRET=1``) bf16 tiles are widened to fp32 just before the dot. The
  widening is exact, so the CPU tier still sees every bf16 rounding of the inputs; the product is then accumulated in
  fp32, as the tensor cores do. Only the CUDA tier runs the real bf16 ``tl.dot``.
"""

import os

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------- Python-side settings

INPUT_PRECISIONS = ("tf32", "ieee")

# Operand dtypes the kernels accept (tl.dot on NVIDIA takes no fp64); torch dtype -> Triton dtype.
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block_r(r: int) -> int:
    """The padded rank: ``tl.dot`` needs every dimension ≥ 16 and ``tl.arange`` a power of two."""
    return max(16, triton.next_power_of_2(r))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (a small stand-in under the interpreter, where it only sets a split)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


# ---------------------------------------------------------------- jit helpers


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """``acc + a @ b`` in fp32; ``a`` and ``b`` share one dtype (the launchers cast tiles at load)."""
    if UPCAST_BF16:
        if a.dtype == tl.bfloat16:
            # Interpreter only (triton #11584): exact widening, the dot then accumulates in fp32 like the GPU.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        out = tl.dot(a, b, acc)
    return out
