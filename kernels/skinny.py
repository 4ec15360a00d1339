"""The skinny product of the split and hybrid designs: ``out = c · drop?(P) Q``, ``P (M, C)``, ``Q (C, R)``, fp32.

Two uses, one kernel:

- forward, ``h_s = (s/keep) · keep(x) Aᵀ``: P = x (dropout applied), Q = Aᵀ read through A's strides;
- backward, ``u_s = (s/keep) · g B``: P = g, Q = B, no dropout.

``s/keep`` (keep: the mask's keep probability, :mod:`kernels.dropout`) is folded in here, once per (M, R) element,
so the GEMM epilogues that consume h_s and u_s add a plain product and the dropout mask is a select. One program
owns BLOCK_M rows of ``out`` and streams ``P[rows, :]`` once. FLOPs 2·M·C·R; bytes: P once (e_P·M·C), Q once per
program (from L2), out written once (4·M·R).
"""

import torch
import triton
import triton.language as tl

from .configs import launch, skinny_configs
from .dropout import _load_dropped, dropout_groups
from .utils import TL_DTYPES, _dot, block_r, interpreting

# ---------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["threshold"])
def _lora_skinny_kernel(
    # pointers
    in_ptr,
    proj_ptr,
    out_ptr,
    key_ptr,
    # sizes
    M,
    C,
    R,
    # strides
    stride_im,
    stride_ic,
    stride_pc,
    stride_pr,
    stride_om,
    stride_or,
    # scalars
    scale,
    threshold,
    n_groups,
    # meta-parameters
    LORA_DTYPE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Owns rows ``[pid·BLOCK_M, (pid+1)·BLOCK_M)`` of out: ``scale · drop?(P[rows, :]) Q`` in fp32."""
    pid_m = tl.program_id(0)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        # P's tile, x's dropout mask applied as a select (1/keep is in `scale`).
        tile = _load_dropped(
            in_ptr, offs_m, offs_c, mask_m, mask_c, stride_im, stride_ic, c0, key_ptr, threshold, n_groups,
            HAS_DROPOUT, BLOCK_M, BLOCK_C,
        )  # fmt: skip
        # Q tile (BLOCK_C, BLOCK_R); padded ranks load as 0 and give columns of 0.
        proj = tl.load(
            proj_ptr + offs_c[:, None] * stride_pc + offs_r[None, :] * stride_pr,
            mask=mask_c[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = _dot(tile, proj, acc, LORA_DTYPE, INPUT_PRECISION, INTERPRET)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, scale * acc, mask=mask_m[:, None] & mask_r[None, :])


# ---------------------------------------------------------------- launcher


def lora_skinny(
    mat: torch.Tensor,
    proj: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    threshold: int,
    key: torch.Tensor,
    lora_dtype: torch.dtype,
    input_precision: str,
    info,
) -> None:
    """``out (M, R) = scale · drop?(mat) proj`` for ``mat (M, C)`` and ``proj (C, R)``, both read through strides.

    ``threshold > 0`` applies the dropout mask of ``(key, threshold)`` to ``mat`` (which must then be x).
    """
    M, C = mat.shape
    R = proj.shape[1]
    BLOCK_R = block_r(R)
    pointers = (mat, proj, out, key)
    sizes = (M, C, R)
    strides = (*mat.stride(), *proj.stride(), *out.stride())
    scalars = (float(scale), int(threshold), dropout_groups(C))
    constexprs = dict(
        LORA_DTYPE=TL_DTYPES[lora_dtype],
        HAS_DROPOUT=threshold > 0,
        INPUT_PRECISION=input_precision,
        INTERPRET=interpreting(),
        BLOCK_R=BLOCK_R,
    )
    elem = max(mat.element_size(), proj.element_size())
    candidates = skinny_configs(M, BLOCK_R, elem, info)
    grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]),)
    args = (*pointers, *sizes, *strides, *scalars)
    launch(_lora_skinny_kernel, grid, args, constexprs, candidates, info, f"M={M} C={C} R={R}")
