"""Dropout on the LoRA branch, drawn from a seed so that nothing of size M×K is stored.

Element ``x[m, k]`` of the flattened ``x (M, K)`` is kept when a 16-bit random lane is ``>= threshold``, with
``threshold = round(p · 2¹⁶)`` (p quantised to 2⁻¹⁶, as the torch backend does); a kept element is scaled by
``1/(1-p)``, which the kernels fold into the rank-sized operands (``h``, ``u``), so applying the mask is a select.

The lanes come eight to a Philox-4x32-10 call: counter ``c = m · cdiv(K, 8) + k // 8`` (int64) gives four 32-bit
words, and column ``k = 8·(k // 8) + 2·w + j`` takes bits ``[16·j, 16·j + 16)`` of word ``w``. The mask of an element
depends only on ``(seed, m, k)``, so every kernel regenerates the identical mask whatever its tiling, as long as its
column tiles start at multiples of 8. One call serves eight elements: about 12 SASS instructions per element on
sm_90 against about 62 for one ``tl.rand`` per element (``bench/compile_check.py`` measures both).

:func:`lora_dropout_mask` materialises the multiplier as an ``(M, K)`` fp32 tensor, for tests, which give it to
:mod:`lora_fast.reference` to check the kernels against the spec with the very same mask.
"""

import torch
import triton
import triton.language as tl

from .configs import cfg, launch

# ---------------------------------------------------------------- Python-side helpers


def dropout_threshold(p: float) -> int:
    """``round(p · 2¹⁶)``: a lane (uniform on [0, 2¹⁶)) below it drops its element. Refuses p it cannot represent."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    threshold = round(p * 65536)
    if threshold >= 65536:
        raise ValueError(f"dropout p = {p} rounds to 1 at the mask's 2^-16 resolution; use p <= {65535 / 65536}")
    return threshold


def dropout_groups(K: int) -> int:
    """Philox counters per row of x: one per eight columns."""
    return triton.cdiv(K, 8)


# ---------------------------------------------------------------- jit helpers


@triton.jit
def _keep_mask(seed, offs_m, k0, n_groups, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Boolean keep mask (BLOCK_M, BLOCK_K) of rows ``offs_m`` (int64) and columns ``k0 + [0, BLOCK_K)`` of x.

    ``k0`` must be a multiple of 8 (and BLOCK_K one too): the tile then covers whole Philox counters.
    """
    offs_g = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    counter = offs_m[:, None].to(tl.int64) * n_groups + offs_g[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    # (BLOCK_M, BLOCK_K/8, 2, 2) flattened row-major: the word w = 2·i + j of each counter sits at position w.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_K // 2))
    # Each word's low lane shifted up, then the word itself: comparing both with threshold·2¹⁶ (low 16 bits clear)
    # tests exactly the lane's 16 bits, low lane at column 2w, high lane at 2w + 1.
    lanes = tl.reshape(tl.join(words << 16, words), (BLOCK_M, BLOCK_K))
    return lanes >= (threshold.to(tl.uint32) << 16)


@triton.jit
def _load_dropped(
    ptr,
    offs_m,
    offs_c,
    mask_m,
    mask_c,
    stride_m,
    stride_c,
    c0,
    seed,
    threshold,
    n_groups,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The (BLOCK_M, BLOCK_C) tile at rows ``offs_m``, columns ``offs_c = c0 + [0, BLOCK_C)`` (0 outside the
    matrix), with, when HAS_DROPOUT, x's keep mask applied as a select (1/(1-p) is left to the caller's scale)."""
    tile = tl.load(
        ptr + offs_m[:, None] * stride_m + offs_c[None, :] * stride_c,
        mask=mask_m[:, None] & mask_c[None, :],
        other=0.0,
    )
    if HAS_DROPOUT:
        tile = tl.where(_keep_mask(seed, offs_m, c0, n_groups, threshold, BLOCK_M, BLOCK_C), tile, 0.0)
    return tile


# ---------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["seed", "threshold"])
def _lora_dropout_mask_kernel(
    # pointers
    mask_ptr,
    # sizes
    M,
    K,
    # scalars
    seed,
    threshold,
    n_groups,
    inv_keep,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Writes the (BLOCK_M, BLOCK_K) tile of the contiguous fp32 multiplier (M, K) that program (pid_m, pid_k) owns."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, offs_m, k0, n_groups, threshold, BLOCK_M, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(mask_ptr + offs_m[:, None] * K + offs_k[None, :], tl.where(keep, inv_keep, 0.0), mask=mask)


# ---------------------------------------------------------------- launcher


def lora_dropout_mask(M: int, K: int, p: float, seed: int, device: torch.device | str) -> torch.Tensor:
    """The (M, K) fp32 dropout multiplier the kernels use for ``(p, seed)``: 0 or ``1/(1-p)``."""
    threshold = dropout_threshold(p)
    mask = torch.empty((M, K), dtype=torch.float32, device=device)
    if M == 0 or K == 0:
        return mask
    args = (mask, M, K, int(seed), threshold, dropout_groups(K), 1.0 / (1.0 - p))
    config = cfg(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=1)
    grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(K, c["BLOCK_K"]))
    launch(_lora_dropout_mask_kernel, grid, args, {}, [config])
    return mask
