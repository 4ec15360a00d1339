"""LoRA forward: ``y = x Wᵀ + bias + h_s Bᵀ`` with ``h_s = s · drop(x) Aᵀ / keep`` (fp32, kept for backward).

Shapes: ``x (M, K)`` and ``W (N, K)`` with any strides (GPT-2's Conv1D weight arrives as the view ``weight.t()``),
``bias (N,)``, ``A (R, K)``, ``B (N, R)``, ``h_s (M, R)`` fp32, ``y (M, N)``. The scaling ``s`` and dropout's
``1/keep`` are folded into ``h_s`` (an (M, R) tile), so the epilogue adds one product into the base accumulator.
Accumulation is fp32; the base product runs in ``BASE_DTYPE`` and the LoRA branch in ``LORA_DTYPE``, each tile cast
once when loaded.

Three designs; :func:`kernels.designs.forward_design` picks one from the cost model (or a measured table):

- fused (1 launch), without dropout only: the program owning tile (m, n) streams ``x[m, :]`` over K for the base GEMM
  and accumulates its own ``h[m, :]`` from the same tiles (the A tile is the only extra read); programs of column 0
  store h_s. The rank work is repeated for each of the ``cdiv(N, BLOCK_N)`` column tiles (R/BLOCK_N extra FLOPs),
  and so would the dropout mask be, with its tile in registers (the compile tier found two wgmma waits per
  iteration then): with dropout, "fused" runs split.
- split (2 launches): the skinny kernel (:mod:`kernels.skinny`) makes h_s, drawing the mask once per element of x,
  then this kernel adds ``h_s Bᵀ`` in its epilogue, R_CHUNK ranks at a time. One more read of x (e_x·M·K bytes).
- hybrid (3 launches): h_s as split, then :mod:`kernels.hybrid` writes ``bias + h_s Bᵀ`` into y and cuBLAS adds
  ``x Wᵀ`` (``addmm_``).

FLOPs: 2·M·K·N (base) + 2·M·K·R (h; ×cdiv(N, BLOCK_N) fused) + 2·M·R·N (h Bᵀ). Bytes: x (twice, split), W, A, B,
bias once per row of programs, y and h_s (4·M·R) written once.
"""

import torch
import triton
import triton.language as tl

from .configs import check_int32_offsets, device_info, forward_configs, launch
from .designs import forward_design, hybrid_supported
from .dropout import check_key, dropout_threshold, keep_scale
from .hybrid import lora_rank_out
from .skinny import lora_skinny
from .utils import (
    TL_DTYPES,
    _dot,
    _grouped_pid,
    _rank_update,
    _to,
    block_r,
    interpreting,
    no_autocast,
    rank_chunk,
)

# ---------------------------------------------------------------- kernels


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
    # scalars: h_s = scale · x Aᵀ with scale = s
    scale,
    # meta-parameters
    BASE_DTYPE: tl.constexpr,
    LORA_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FUSE_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Owns the (BLOCK_M, BLOCK_N) tile of y. Removes, against the eager path, the round trips of x·Wᵀ, h·Bᵀ, the
    scaling and their sum through HBM; with FUSE_H also the second read of x (h comes out of the base GEMM's loop)."""
    # ---- grouped program order: GROUP_M row blocks share the W column block in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # ---- main loop over K: acc = x Wᵀ (and, fused, h = x Aᵀ from the same x tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_H:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
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
            h = _dot(x, a, h, LORA_DTYPE, INPUT_PRECISION, INTERPRET)

    # ---- epilogue: acc += h_s Bᵀ (h_s enters the dot in the LoRA dtype), + bias, one cast to y's dtype
    if FUSE_H:
        h = scale * h
        if pid_n == 0:
            tl.store(
                h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                h,
                mask=mask_m[:, None] & mask_r[None, :],
            )
        b = tl.load(
            b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = _dot(h, b, acc, LORA_DTYPE, INPUT_PRECISION, INTERPRET)
    else:
        # h_s read back R_CHUNK ranks at a time: a large rank needs no (BLOCK_M, R) tile.
        acc = _rank_update(
            acc,
            h_ptr,
            b_ptr,
            offs_m,
            offs_n,
            mask_m,
            mask_n,
            R,
            stride_hm,
            stride_hr,
            stride_br,
            stride_bn,
            LORA_DTYPE,
            INPUT_PRECISION,
            INTERPRET,
            R_CHUNK,
        )
    if HAS_BIAS:
        # bias rounded to the base dtype first, as nn.Linear's is
        bias = _to(tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0), BASE_DTYPE, INTERPRET)
        acc += bias.to(tl.float32)[None, :]
    # The single cast of the fp32 accumulator to y's element type.
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        _to(acc, y_ptr.dtype.element_ty, INTERPRET).to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


# ---------------------------------------------------------------- launcher


def launch_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    key: torch.Tensor | None = None,
    *,
    base_dtype: torch.dtype | None = None,
    lora_dtype: torch.dtype | None = None,
    design: str = "auto",
    input_precision: str = "tf32",
    out: torch.Tensor | None = None,
    h_s_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y (M, N), h_s (M, R) fp32)`` for 2-D ``x (M, K)`` and ``weight (N, K)`` (any strides), where
    ``h_s = scaling · drop(x) Aᵀ`` is what :func:`kernels.lora_backward.launch_lora_backward` takes.

    ``base_dtype``/``lora_dtype`` default to x's and lora_A's dtypes; ``y`` is in ``base_dtype``. ``design`` is
    ``"auto"`` (:mod:`kernels.designs`), ``"fused"``, ``"split"`` or ``"hybrid"``. ``key``: the dropout key
    (:func:`kernels.dropout.dropout_key`), needed when ``dropout_p > 0``. ``out``/``h_s_out`` are optional
    preallocated outputs (tests poison them to catch unwritten elements). Inputs are assumed checked by the caller
    (:func:`lora_fast.lora_linear` does), except that a ValueError names the tensor where an
    offset the kernels form in int32 would pass it. Launches: 1 fused, 2 split, 3 hybrid (the third cuBLAS's).
    """
    M, K = x.shape
    N, R = lora_B.shape
    base_dtype = base_dtype or x.dtype
    lora_dtype = lora_dtype or lora_A.dtype
    y = out if out is not None else torch.empty((M, N), dtype=base_dtype, device=x.device)
    h_s = h_s_out if h_s_out is not None else torch.empty((M, R), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, h_s
    # Columns of x and W, both dims of A and B's rank index in int32 (rows of x, y and h_s and W's N in int64).
    check_int32_offsets("x", x, 1)
    check_int32_offsets("weight", weight, 1)
    check_int32_offsets("lora_A", lora_A, 0, 1)
    check_int32_offsets("lora_B", lora_B, 1)
    info = device_info(x.device)
    threshold = dropout_threshold(dropout_p)
    key = check_key(key, threshold, h_s)
    scale = scaling * keep_scale(threshold)
    BLOCK_R = block_r(R)
    hybrid_ok = hybrid_supported(base_dtype, x.dtype, weight.dtype, y.dtype)
    chosen = forward_design(
        design, M, N, K, R, dropout_p, base_dtype, input_precision, lora_dtype, hybrid_ok, info.name
    )  # fmt: skip
    fused = chosen == "fused"  # kernels.designs: never with dropout
    if not fused:
        lora_skinny(x, lora_A.t(), h_s, scale, threshold, key, lora_dtype, input_precision, info)
    if chosen == "hybrid":
        # y = bias + h_s Bᵀ by Triton, then y += x Wᵀ by cuBLAS (Bᵀ and Wᵀ are views: B's and W's strides).
        lora_rank_out(h_s, lora_B.t(), bias, y, key, 0, base_dtype, lora_dtype, input_precision, info)
        with no_autocast(x.device):  # the operands are in base_dtype already
            y.addmm_(x, weight.t())
        return y, h_s
    pointers = (x, weight, bias if bias is not None else y, lora_A, lora_B, h_s, y)
    sizes = (M, N, K, R)
    strides = (*x.stride(), *weight.stride(), *lora_A.stride(), *lora_B.stride(), *h_s.stride(), *y.stride())
    scalars = (float(scale),)
    constexprs = dict(
        BASE_DTYPE=TL_DTYPES[base_dtype],
        LORA_DTYPE=TL_DTYPES[lora_dtype],
        HAS_BIAS=bias is not None,
        FUSE_H=fused,
        INPUT_PRECISION=input_precision,
        INTERPRET=interpreting(),
        BLOCK_R=BLOCK_R,
        R_CHUNK=rank_chunk(BLOCK_R, lora_dtype),
    )
    grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)
    candidates = forward_configs(base_dtype, lora_dtype, input_precision, fused, BLOCK_R, info, M, N)
    args = (*pointers, *sizes, *strides, *scalars)
    launch(_lora_forward_kernel, grid, args, constexprs, candidates, info, f"M={M} N={N} K={K} R={R}")
    return y, h_s
