"""Helpers shared by the LoRA kernels: casts and the dot product every kernel uses, rank padding, launch settings.

``_dot(a, b, acc, DTYPE)`` casts both tiles to the compute dtype ``DTYPE`` and accumulates ``a @ b`` into the fp32
``acc``. fp32 operands go through ``tl.dot`` with ``INPUT_PRECISION`` ("tf32", the fast default on NVIDIA with about
3e-4 relative error, or "ieee", exact fp32, which the exactness tests use); fp16/bf16 operands ignore it.

Under Triton's interpreter (``INTERPRET``, set by the launchers when ``TRITON_INTERPRET=1``) two of its bf16 faults
are worked around, so that the CPU tier checks the numerics the GPU has:

- ``tl.dot`` on bf16 operands multiplies their raw bit patterns (triton #11584);
- a cast fp32 -> bf16 truncates instead of rounding to nearest even.

There :func:`_to` rounds to bf16 on the fp32 bits (round to nearest even) and keeps the rounded value in an fp32
tensor, so the dot sees exactly the bf16 inputs the GPU would, accumulated in fp32 as the tensor cores do. Only the
CUDA tier runs the real bf16 ``tl.dot`` and bf16 conversion instructions.
"""

import contextlib
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


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` (cuBLAS calls of the hybrid design get operands already in the compute dtype)."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else contextlib.nullcontext()


def block_r(r: int) -> int:
    """The padded rank: ``tl.dot`` needs every dimension ≥ 16 and ``tl.arange`` a power of two."""
    return max(16, triton.next_power_of_2(r))


def rank_chunk(block_r: int, dtype: torch.dtype) -> int:
    """Ranks per step where a split epilogue reads h_s or u_s back: 64 for 16-bit dots, 32 for fp32 (whose dot
    operands take twice the registers)."""
    return min(block_r, 64 if dtype in (torch.float16, torch.bfloat16) else 32)


# ---------------------------------------------------------------- jit helpers


@triton.jit
def _to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``x`` cast to ``DTYPE``, rounding to nearest even (under the interpreter, bf16 values held in fp32)."""
    if INTERPRET:
        if DTYPE == tl.bfloat16:
            # Round-to-nearest-even on the fp32 bits: add 0x7FFF plus the lowest kept bit, clear the 16 dropped bits.
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            out = bits.to(tl.float32, bitcast=True)
        else:
            out = x.to(DTYPE)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in grouped order (Triton's matmul tutorial): GROUP_M consecutive row
    blocks walk one column block together, so its operand tile stays in L2 between them."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` in fp32, both tiles cast to the compute dtype ``DTYPE`` first (the one cast per load)."""
    a = _to(a, DTYPE, INTERPRET)
    b = _to(b, DTYPE, INTERPRET)
    if a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _rank_update(
    acc,
    left_ptr,
    right_ptr,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    R,
    stride_lm,
    stride_lr,
    stride_rr,
    stride_rn,
    DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    R_CHUNK: tl.constexpr,
):
    """``acc + L[offs_m, :] @ Rt[:, offs_n]`` for a rank-R product read from memory R_CHUNK ranks at a time (so a
    large rank never needs a (BLOCK_M, R) tile): the split epilogues ``h_s Bᵀ`` (forward) and ``u_s A`` (dx)."""
    for r0 in range(0, R, R_CHUNK):
        offs_r = r0 + tl.arange(0, R_CHUNK)
        mask_r = offs_r < R
        left = tl.load(
            left_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        right = tl.load(
            right_ptr + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = _dot(left, right, acc, DTYPE, INPUT_PRECISION, INTERPRET)
    return acc
