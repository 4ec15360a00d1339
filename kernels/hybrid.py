"""The hybrid design's Triton part: the LoRA term written into the buffer that cuBLAS then adds the base product to.

``out (M, C) = drop?(L Rt) + bias`` for ``L (M, R)`` fp32 (h_s or u_s) and ``Rt (R, C)`` (Bᵀ or A, through strides):

- forward: ``C = bias + h_s Bᵀ`` (y's buffer, y's dtype), then ``C.addmm_(x, Wᵀ)`` by cuBLAS gives
  ``y = x Wᵀ + bias + h_s Bᵀ``;
- backward: ``C = keep ⊙ (u_s A)`` (dx's buffer), then ``C.addmm_(g, W)`` gives ``dx = g W + keep ⊙ (u_s A)``; extra
  programs of the same launch run the split-sum of the partials the reduction launch (before it) wrote.

So the base GEMM runs at cuBLAS's pace and the rank-R work in Triton: the forward reads x once more (the skinny
``h_s``) and writes and reads C once (2·e·M·N bytes); the backward reads g once more (``u_s``) and x and g for the
partials, and writes and reads C (2·e·M·K). The sum is rounded twice: the LoRA term (with the bias) to the output's
dtype in C, then cuBLAS's fp32 accumulation of ``x Wᵀ + C`` once more, as PEFT's base + LoRA sum is.
One program owns a (BLOCK_M, BLOCK_C) tile of out. FLOPs 2·M·R·C.
"""

import torch
import triton
import triton.language as tl

from .configs import finalize_configs, launch, rank_out_configs
from .dropout import _keep_mask, dropout_groups
from .partials import Partials, _finalize_block, finalize_blocks
from .utils import TL_DTYPES, _grouped_pid, _rank_update, _to, block_r, interpreting, rank_chunk


@triton.jit(do_not_specialize=["threshold"])
def _lora_rank_out_kernel(
    # pointers
    left_ptr,
    right_ptr,
    bias_ptr,
    out_ptr,
    key_ptr,
    part_a_ptr,
    part_b_ptr,
    part_bias_ptr,
    da_ptr,
    db_ptr,
    dbias_ptr,
    # sizes (N and K: the split-sum's)
    M,
    C,
    R,
    n_split,
    N,
    K,
    # strides
    stride_lm,
    stride_lr,
    stride_rr,
    stride_rc,
    stride_om,
    stride_oc,
    # scalars
    threshold,
    n_groups,
    # meta-parameters
    LORA_DTYPE: tl.constexpr,
    BASE_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    FINALIZE: tl.constexpr,
    HAS_DA: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Owns the (BLOCK_M, BLOCK_C) tile of out (programs past the last tile run the split-sum, FINALIZE)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_c = tl.cdiv(C, BLOCK_C)
    if pid >= num_pid_m * num_pid_c:
        if FINALIZE:
            _finalize_block(
                pid - num_pid_m * num_pid_c, part_a_ptr, part_b_ptr, part_bias_ptr, da_ptr, db_ptr, dbias_ptr,
                n_split, N, K, R, HAS_DA, HAS_DB, HAS_DBIAS, INTERPRET, BLOCK_F, BLOCK_R,
            )  # fmt: skip
    else:
        pid_m, pid_c = _grouped_pid(pid, num_pid_m, num_pid_c, GROUP_M)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_m = offs_m < M
        mask_c = offs_c < C
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        acc = _rank_update(
            acc, left_ptr, right_ptr, offs_m, offs_c, mask_m, mask_c, R, stride_lm, stride_lr, stride_rr, stride_rc,
            LORA_DTYPE, INPUT_PRECISION, INTERPRET, R_CHUNK,
        )  # fmt: skip
        if HAS_DROPOUT:
            acc = tl.where(
                _keep_mask(key_ptr, offs_m, pid_c * BLOCK_C, n_groups, threshold, BLOCK_M, BLOCK_C), acc, 0.0
            )
        if HAS_BIAS:
            # bias rounded to the base dtype first, as nn.Linear's is
            bias = _to(tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0), BASE_DTYPE, INTERPRET)
            acc += bias.to(tl.float32)[None, :]
        # The one cast of the LoRA term (and bias) to out's element type.
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc,
            _to(acc, out_ptr.dtype.element_ty, INTERPRET).to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_c[None, :],
        )


def lora_rank_out(
    left: torch.Tensor,
    right: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    key: torch.Tensor,
    threshold: int,
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    input_precision: str,
    info,
    finalize: tuple | None = None,
) -> None:
    """``out (M, C) = drop?(left (M, R) @ right (R, C)) + bias``; ``threshold > 0`` applies x's mask (C = K).
    ``finalize``: ``(parts, outputs, N, K, needs)``, the split-sum run by extra programs of this launch."""
    M, C = out.shape
    R = left.shape[1]
    parts, outputs, N, K, needs = finalize or (Partials(0, left, left, left), (left, left, left), 0, 0, (0, 0, 0))
    block_f = finalize_configs()[0]["BLOCK_C"]
    n_fin = finalize_blocks(N, K, needs[0], needs[1] or needs[2], block_f) if finalize else 0
    BLOCK_R = block_r(R)
    pointers = (left, right, bias if bias is not None else out, out, key, parts.a, parts.b, parts.bias, *outputs)
    sizes = (M, C, R, parts.S, N, K)
    strides = (*left.stride(), *right.stride(), *out.stride())
    constexprs = dict(
        LORA_DTYPE=TL_DTYPES[lora_dtype],
        BASE_DTYPE=TL_DTYPES[base_dtype],
        HAS_BIAS=bias is not None,
        HAS_DROPOUT=threshold > 0,
        FINALIZE=n_fin > 0,
        HAS_DA=bool(needs[0]),
        HAS_DB=bool(needs[1]),
        HAS_DBIAS=bool(needs[2]),
        INPUT_PRECISION=input_precision,
        INTERPRET=interpreting(),
        BLOCK_R=BLOCK_R,
        R_CHUNK=rank_chunk(BLOCK_R, lora_dtype),
        BLOCK_F=block_f,
    )
    grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(C, c["BLOCK_C"]) + n_fin,)
    args = (*pointers, *sizes, *strides, threshold, dropout_groups(C))
    candidates = rank_out_configs(lora_dtype)
    launch(_lora_rank_out_kernel, grid, args, constexprs, candidates, info, f"M={M} C={C} R={R}")
