"""Dropout on the LoRA branch, drawn from a key so that nothing of size M×K is stored.

Element ``x[m, k]`` of the flattened ``x (M, K)`` is kept when a 16-bit random lane is ``>= threshold``, with
``threshold = round(p · 2¹⁶)``: p has a resolution of 1/65536, and the mask keeps an element with probability
``keep = (2¹⁶ - threshold) / 2¹⁶`` exactly. A kept element is scaled by ``1/keep`` (not ``1/(1-p)``, which differs
from it by up to 1.5× near p = 1), so the dropped-and-scaled branch is unbiased; the kernels fold the scale into the
rank-sized operands (``h``, ``u``), so applying the mask is a select. A p whose threshold is 0 (it would keep
everything) or 2¹⁶ (drop everything) is refused unless p is exactly 0, as :mod:`lora_fast.reference` specifies.

The key: an int64 pair ``(seed, offset)`` in device memory, read by the kernels (no host integer reaches them). By
default it is drawn on the device from torch's own generator (:func:`dropout_key`), which advances its 64-bit
Philox offset there: a step captured in a CUDA graph draws a new key at each replay, ``torch.manual_seed`` makes runs
repeatable, and ``torch.utils.checkpoint`` (which restores torch's generator states) recomputes the same mask. The
forward saves the key tensor for the backward, which therefore regenerates the very same mask.

The lanes come eight to a Philox-4x32-10 call keyed by ``seed``: counter words ``(c0, c1)`` are the element group
``c = m · cdiv(K, 8) + k // 8`` (int64), ``(c2, c3)`` the key's ``offset``, so two keys that share a seed still draw
disjoint streams. The call gives four 32-bit words, and column ``k = 8·(k // 8) + 2·w + j`` takes bits
``[16·j, 16·j + 16)`` of word ``w``. The mask of an element depends only on ``(key, m, k)``, so every kernel
regenerates the identical mask whatever its tiling, as long as its column tiles start at multiples of 8. One call
serves eight elements: about 12 SASS instructions per element on sm_90 against about 62 for one ``tl.rand`` per
element (``bench/compile_check.py`` measures both).

:func:`lora_dropout_mask` materialises the multiplier as an ``(M, K)`` fp32 tensor, for tests, which give it to
:mod:`lora_fast.reference` to check the kernels against the spec with the very same mask.
"""

import torch
import triton
import triton.language as tl

from .configs import cfg, launch

# ---------------------------------------------------------------- Python-side helpers


# The mask's resolution: p is rounded to a multiple of 1/LANES (as lora_fast.reference.dropout_threshold does).
LANES = 65536


def dropout_threshold(p: float) -> int:
    """``round(p · 2¹⁶)``: a lane (uniform on [0, 2¹⁶)) below it drops its element. Refuses, naming dropout_p, a p
    outside [0, 1) or one that rounds to "keep all" (threshold 0, unless p is exactly 0) or "drop all" (2¹⁶)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    threshold = round(p * LANES)
    if threshold >= LANES:
        raise ValueError(
            f"dropout_p = {p} rounds to 1 at the dropout mask's resolution of 1/{LANES}, which would drop every "
            f"element; use dropout_p <= {(LANES - 1) / LANES}"
        )
    if threshold == 0 and p != 0.0:
        raise ValueError(
            f"dropout_p = {p} rounds to 0 at the dropout mask's resolution of 1/{LANES}, which would drop nothing; "
            f"use dropout_p = 0 or dropout_p >= {1 / LANES}"
        )
    return threshold


def keep_scale(threshold: int) -> float:
    """``1/keep`` for the mask of ``threshold``: kept elements are scaled by the mask's real keep probability."""
    return LANES / (LANES - threshold)


def dropout_key(device: torch.device | str, seed: int | None = None) -> torch.Tensor:
    """The int64 ``(seed, offset)`` pair the kernels read, on ``device``: drawn there from torch's generator when
    ``seed`` is None (a fresh key per call, also per CUDA-graph replay), else ``(seed, seed)`` (a fixed mask)."""
    if seed is None:
        return torch.empty(2, dtype=torch.int64, device=device).random_(-(2**63), None)
    # torch.full, not torch.tensor: a fill is a kernel, which CUDA-graph capture allows (a host copy is refused).
    return torch.full((2,), seed, dtype=torch.int64, device=device)


def check_key(key: torch.Tensor | None, threshold: int, spare: torch.Tensor) -> torch.Tensor:
    """The key a launch passes: ``key`` itself with dropout (an int64 (2,) tensor on the operands' device, else a
    ValueError naming it), ``spare`` without (a placeholder pointer the kernels never read)."""
    if threshold == 0:
        return spare
    if not isinstance(key, torch.Tensor) or key.dtype != torch.int64 or tuple(key.shape) != (2,):
        got = f"{key.dtype} {tuple(key.shape)}" if isinstance(key, torch.Tensor) else repr(key)
        raise ValueError(f"dropout needs key, an int64 tensor (seed, offset) of shape (2,) (dropout_key), got {got}")
    if key.device != spare.device:
        raise ValueError(f"key is on {key.device} but the operands are on {spare.device}")
    return key


def dropout_groups(K: int) -> int:
    """Philox counters per row of x: one per eight columns."""
    return triton.cdiv(K, 8)


# ---------------------------------------------------------------- jit helpers


@triton.jit
def _keep_mask(key_ptr, offs_m, k0, n_groups, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Boolean keep mask (BLOCK_M, BLOCK_K) of rows ``offs_m`` (int64) and columns ``k0 + [0, BLOCK_K)`` of x, for the
    ``(seed, offset)`` key at ``key_ptr``.

    ``k0`` must be a multiple of 8 (and BLOCK_K one too): the tile then covers whole Philox counters.
    """
    seed = tl.load(key_ptr)
    offset = tl.load(key_ptr + 1)
    offs_g = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    counter = offs_m[:, None].to(tl.int64) * n_groups + offs_g[None, :]
    c0 = counter.to(tl.uint32)  # the low word (truncation)
    _0 = c0 * 0
    c1 = (counter >> 32).to(tl.uint32)
    c2 = _0 + offset.to(tl.uint32)
    c3 = _0 + (offset >> 32).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
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
    key_ptr,
    threshold,
    n_groups,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The (BLOCK_M, BLOCK_C) tile at rows ``offs_m``, columns ``offs_c = c0 + [0, BLOCK_C)`` (0 outside the
    matrix), with, when HAS_DROPOUT, x's keep mask applied as a select (1/keep is left to the caller's scale)."""
    tile = tl.load(
        ptr + offs_m[:, None] * stride_m + offs_c[None, :] * stride_c,
        mask=mask_m[:, None] & mask_c[None, :],
        other=0.0,
    )
    if HAS_DROPOUT:
        tile = tl.where(_keep_mask(key_ptr, offs_m, c0, n_groups, threshold, BLOCK_M, BLOCK_C), tile, 0.0)
    return tile


# ---------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["threshold"])
def _lora_dropout_mask_kernel(
    # pointers
    mask_ptr,
    key_ptr,
    # sizes
    M,
    K,
    # scalars
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
    keep = _keep_mask(key_ptr, offs_m, k0, n_groups, threshold, BLOCK_M, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(mask_ptr + offs_m[:, None] * K + offs_k[None, :], tl.where(keep, inv_keep, 0.0), mask=mask)


# ---------------------------------------------------------------- launcher


def lora_dropout_mask(M: int, K: int, p: float, key: torch.Tensor) -> torch.Tensor:
    """The (M, K) fp32 dropout multiplier the kernels use for ``(p, key)`` (on key's device): 0 or ``1/keep``
    (:func:`keep_scale`)."""
    threshold = dropout_threshold(p)
    mask = torch.empty((M, K), dtype=torch.float32, device=key.device)
    if M == 0 or K == 0:
        return mask
    args = (mask, key, M, K, threshold, dropout_groups(K), keep_scale(threshold))
    config = cfg(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=1)
    grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(K, c["BLOCK_K"]))
    launch(_lora_dropout_mask_kernel, grid, args, {}, [config])
    return mask
