"""LoRA forward: ``y = x Wᵀ + bias + s · h Bᵀ`` with ``h = drop(x) Aᵀ`` kept for backward (fp32).

Shapes: ``x (M, K)`` and ``W (N, K)`` with any strides (GPT-2's Conv1D weight arrives as the view ``weight.t()``),
``bias (N,)``, ``A (R, K)``, ``B (N, R)``, ``h (M, R)`` fp32, ``y (M, N)``. Accumulation is fp32 throughout; the base
product runs in ``BASE_DTYPE`` and the LoRA branch in ``LORA_DTYPE`` (both chosen by the caller: the autocast dtype,
or x's and A's dtypes), each cast once when its tile is loaded.

Two designs, one kernel body (``FUSE_H``):

- split (``FUSE_H=False``, 2 launches): ``_lora_skinny_kernel`` makes ``h`` (reads x and A once), then
  ``_lora_forward_kernel`` runs the base GEMM and adds ``s · h Bᵀ`` and bias in its epilogue.
- fused (``FUSE_H=True``, 1 launch): the program owning tile (m, n) already streams the row block ``x[m, :]`` over K
  for the base GEMM, so it accumulates its own ``h[m, :]`` in the same loop (the A tile is the only extra read); the
  programs of column n = 0 store h. The h FLOPs are repeated across the N tiles (R/BLOCK_N extra), the extra pass over
  x is gone.

FLOPs: 2·M·K·N (base) + 2·M·K·R (h; ×cdiv(N, BLOCK_N) when fused) + 2·M·R·N (h Bᵀ).
Bytes (element sizes e_x, e_w, e_y; fp32 h): split reads x twice, fused once; both read W, A, B, bias, write y and
h (4·M·R). The eager path (PEFT) also writes and reads a dropped copy of x and its mask, and writes/reads y twice.
"""

import torch
import triton
import triton.language as tl

from .dropout import _dropout_scale
from .utils import TL_DTYPES, _dot, _grouped_pid, _to, block_r, interpreting

# ---------------------------------------------------------------- autotune configs


def _gemm_configs() -> list[triton.Config]:
    """≤ 8 tile shapes for an H100-class GPU; one small tile under the interpreter (each trial there costs seconds)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 256, 32, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


# ---------------------------------------------------------------- kernels


@triton.jit
def _lora_skinny_kernel(
    # pointers
    x_ptr,
    a_ptr,
    h_ptr,
    # sizes
    M,
    K,
    R,
    # strides
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_hm,
    stride_hr,
    # scalars
    seed,
    p,
    inv_keep,
    # meta-parameters
    LORA_DTYPE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Split design, launch 1: ``h = drop(x) Aᵀ`` (fp32) for the (BLOCK_M, R) row block that program pid_m owns.

    The split backward launches it too, for ``u = g B``: x := g, Aᵀ := B (read through B's strides), no dropout."""
    pid_m = tl.program_id(0)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        # Aᵀ tile (BLOCK_K, BLOCK_R); padded ranks load as 0 and give h columns of 0.
        a = tl.load(
            a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        if HAS_DROPOUT:
            # Mask applied in fp32 (1/(1-p) stays fp32), then one cast to the LoRA compute dtype.
            x = x.to(tl.float32) * _dropout_scale(seed, offs_m, offs_k, K, p, inv_keep)
        acc = _dot(x, a, acc, LORA_DTYPE, INPUT_PRECISION, INTERPRET)
    tl.store(
        h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr, acc, mask=mask_m[:, None] & mask_r[None, :]
    )


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "R"])
@triton.jit
def _lora_forward_kernel(
    # pointers
    x_ptr,
    w_ptr,
    bias_ptr,
    a_ptr,
    b_ptr,
    h_ptr,
    y_ptr,
    # sizes
    M,
    N,
    K,
    R,
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_hm,
    stride_hr,
    stride_ym,
    stride_yn,
    # scalars
    scaling,
    seed,
    p,
    inv_keep,
    # meta-parameters
    BASE_DTYPE: tl.constexpr,
    LORA_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    FUSE_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Owns the (BLOCK_M, BLOCK_N) tile of y. Removes, against the eager path, the round trips of x·Wᵀ, h·Bᵀ and
    their sum through HBM; with FUSE_H also the second read of x (h comes out of the base GEMM's K loop)."""
    # ---- grouped program order: GROUP_M row blocks share the W column block in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    # ---- main loop over K: acc = x Wᵀ (and, fused, h = drop(x) Aᵀ from the same x tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        # Wᵀ tile (BLOCK_K, BLOCK_N) read through W's strides: nn.Linear and Conv1D's .t() view alike.
        w = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = _dot(x, w, acc, BASE_DTYPE, INPUT_PRECISION, INTERPRET)
        if FUSE_H:
            a = tl.load(
                a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                mask=mask_k[:, None] & mask_r[None, :],
                other=0.0,
            )
            xl = x
            if HAS_DROPOUT:
                # Dropout on the LoRA branch only, multiplier in fp32, then one cast to the LoRA dtype.
                xl = x.to(tl.float32) * _dropout_scale(seed, offs_m, offs_k, K, p, inv_keep)
            h = _dot(xl, a, h, LORA_DTYPE, INPUT_PRECISION, INTERPRET)

    # ---- epilogue: + s · h Bᵀ, + bias, one cast to y's dtype
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr
    if FUSE_H:
        if pid_n == 0:
            tl.store(h_ptrs, h, mask=mask_m[:, None] & mask_r[None, :])
    else:
        h = tl.load(h_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    # Bᵀ tile (BLOCK_R, BLOCK_N).
    b = tl.load(
        b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    )
    # h is fp32; it enters the dot in the LoRA dtype (tensor cores under bf16/fp16 autocast).
    lora = _dot(h, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LORA_DTYPE, INPUT_PRECISION, INTERPRET)
    acc += scaling * lora
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += _to(bias, BASE_DTYPE, INTERPRET).to(tl.float32)[
            None, :
        ]  # bias rounded to the base dtype, as nn.Linear's is
    # The single cast of the fp32 accumulator to y's element type.
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        _to(acc, y_ptr.dtype.element_ty, INTERPRET).to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


# ---------------------------------------------------------------- launcher


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    *,
    base_dtype: torch.dtype | None = None,
    lora_dtype: torch.dtype | None = None,
    fused: bool = True,
    input_precision: str = "tf32",
    out: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y (M, N), h (M, R) fp32)`` for 2-D ``x (M, K)`` (any strides) and ``weight (N, K)`` (any strides).

    ``base_dtype``/``lora_dtype`` default to x's and lora_A's dtypes; ``y`` is in ``base_dtype``. ``out`` and
    ``h_out`` are optional preallocated outputs (tests poison them to catch unwritten elements). Inputs are assumed
    checked by the caller (:func:`lora_fast.triton_backend.triton_lora_linear` does).
    """
    M, K = x.shape
    N, R = lora_B.shape
    base_dtype = base_dtype or x.dtype
    lora_dtype = lora_dtype or lora_A.dtype
    y = out if out is not None else torch.empty((M, N), dtype=base_dtype, device=x.device)
    h = h_out if h_out is not None else torch.empty((M, R), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, h
    has_dropout = dropout_p > 0.0
    inv_keep = 1.0 / (1.0 - dropout_p)
    interp = interpreting()
    BLOCK_R = block_r(R)
    if not fused:
        BLOCK_M_H = 32 if interpreting() else 64
        _lora_skinny_kernel[(triton.cdiv(M, BLOCK_M_H),)](
            x,
            lora_A,
            h,
            M,
            K,
            R,
            x.stride(0),
            x.stride(1),
            lora_A.stride(0),
            lora_A.stride(1),
            h.stride(0),
            h.stride(1),
            int(seed),
            float(dropout_p),
            inv_keep,
            LORA_DTYPE=TL_DTYPES[lora_dtype],
            HAS_DROPOUT=has_dropout,
            INPUT_PRECISION=input_precision,
            INTERPRET=interp,
            BLOCK_M=BLOCK_M_H,
            BLOCK_K=64 if BLOCK_R <= 64 else 32,
            BLOCK_R=BLOCK_R,
        )
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _lora_forward_kernel[grid](
        x,
        weight,
        bias if bias is not None else y,
        lora_A,
        lora_B,
        h,
        y,
        M,
        N,
        K,
        R,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        h.stride(0),
        h.stride(1),
        y.stride(0),
        y.stride(1),
        float(scaling),
        int(seed),
        float(dropout_p),
        inv_keep,
        BASE_DTYPE=TL_DTYPES[base_dtype],
        LORA_DTYPE=TL_DTYPES[lora_dtype],
        HAS_BIAS=bias is not None,
        HAS_DROPOUT=has_dropout,
        FUSE_H=fused,
        INPUT_PRECISION=input_precision,
        INTERPRET=interp,
        BLOCK_R=BLOCK_R,
    )
    return y, h
