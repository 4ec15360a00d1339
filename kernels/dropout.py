"""Dropout on the LoRA branch, drawn from a seed so that nothing of size M×K is stored.

The multiplier of element ``x[m, k]`` of the flattened ``x (M, K)`` is ``1/(1-p)`` (fp32) if
``tl.rand(seed, m·K + k) >= p`` and 0 otherwise. The offset is the element's linear index in x (int64), so forward
and backward regenerate the identical mask whatever their tiling, and every kernel calls :func:`_dropout_scale`.

:func:`lora_dropout_mask` materialises that multiplier as an ``(M, K)`` fp32 tensor. It exists for tests, which give
it to :mod:`lora_fast.reference` to check the fused kernels against the spec with the very same mask.
"""

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------- jit helpers


@triton.jit
def _dropout_scale(seed, offs_m, offs_k, K, p, inv_keep):
    """The fp32 multiplier (0 or ``inv_keep``) for rows ``offs_m`` (int64) × columns ``offs_k`` of x (M, K)."""
    offs = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    keep = tl.rand(seed, offs) >= p
    return tl.where(keep, inv_keep, 0.0)


# ---------------------------------------------------------------- kernels


@triton.jit
def _lora_dropout_mask_kernel(
    # pointers
    mask_ptr,
    # sizes
    M,
    K,
    # scalars
    seed,
    p,
    inv_keep,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Writes the (BLOCK_M, BLOCK_K) tile of the contiguous fp32 mask (M, K) that program (pid_m, pid_k) owns."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    scale = _dropout_scale(seed, offs_m, offs_k, K, p, inv_keep)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(mask_ptr + offs_m[:, None] * K + offs_k[None, :], scale, mask=mask)


# ---------------------------------------------------------------- launcher


def lora_dropout_mask(M: int, K: int, p: float, seed: int, device: torch.device | str) -> torch.Tensor:
    """The (M, K) fp32 dropout multiplier the fused kernels use for ``(p, seed)`` (0 or 1/(1-p))."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    mask = torch.empty((M, K), dtype=torch.float32, device=device)
    if M == 0 or K == 0:
        return mask
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 64))
    _lora_dropout_mask_kernel[grid](mask, M, K, int(seed), float(p), 1.0 / (1.0 - p), BLOCK_M=32, BLOCK_K=64)
    return mask
