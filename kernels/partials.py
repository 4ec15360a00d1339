"""The weight gradients as fp32 partial sums over row blocks, and their deterministic split-sum.

``dA = u_sᵀ keep(x)`` (R, K), ``dB = gᵀ h_s`` (N, R) and ``dbias = Σ_m g`` (N,) are sums over the M rows. Each
producer program writes its own fp32 partial (``part_a (S, K, R)``, ``part_b (S, N, R)``, ``part_bias (S, N)``, all
contiguous); :func:`_finalize_block` then sums the S partials of each output element in a fixed order (s = 0, 1, …)
and stores it cast once to the parameter's dtype, ``dA`` transposed into A's (R, K) layout. No atomics: two runs give
the same bits.

Producers: in the fused backward the dx GEMM's programs (one partial per row block of BLOCK_M rows, see
:mod:`kernels.lora_backward`); in the split backward ``_lora_reduce_kernel`` below, one partial per split of
``rows_per_split`` rows, with programs over (column blocks of K for dA, then of N for dB and dbias) × splits.
The sum runs in its own launch (``_lora_finalize_kernel``) or, in the split backward, in extra programs of the dx
launch, which starts after the reduction has finished.

Bytes: the partials are written once and read once: 2·4·S·(K + N)·R (+ 2·4·S·N for dbias).
"""

import dataclasses

import torch
import triton
import triton.language as tl

from .configs import finalize_configs, int32_room, launch, reduce_configs
from .dropout import _load_dropped, dropout_groups
from .utils import TL_DTYPES, _dot, _to, block_r, interpreting

# ---------------------------------------------------------------- jit helpers


@triton.jit
def _reduce_block(
    mat_ptr,
    rank_ptr,
    part_ptr,
    sum_ptr,
    pid_c,
    pid_s,
    M,
    C,
    R,
    rows_per_split,
    stride_mm,
    stride_mc,
    stride_rm,
    stride_rr,
    key_ptr,
    threshold,
    n_groups,
    LORA_DTYPE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_PROD: tl.constexpr,
    HAS_SUM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Partial ``pid_s`` of columns ``[pid_c·BLOCK_C, …)``: ``drop?(P)ᵀ Q`` (BLOCK_C, R) and, with HAS_SUM, the column
    sums of P, over the rows of split ``pid_s``. P (M, C) is x (dA, dropout at its own (m, k)) or g; Q is u_s or h_s."""
    c0 = pid_c * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_c = offs_c < C
    mask_r = offs_r < R
    m_start = pid_s.to(tl.int64) * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        tile = _load_dropped(
            mat_ptr, offs_m, offs_c, mask_m, mask_c, stride_mm, stride_mc, c0, key_ptr, threshold, n_groups,
            HAS_DROPOUT, BLOCK_M, BLOCK_C,
        )  # fmt: skip
        if HAS_SUM:
            col_sum += tl.sum(tile.to(tl.float32), axis=0)
        if HAS_PROD:
            rank = tl.load(
                rank_ptr + offs_m[:, None] * stride_rm + offs_r[None, :] * stride_rr,
                mask=mask_m[:, None] & mask_r[None, :],
                other=0.0,
            )
            acc = _dot(tl.trans(tile), rank, acc, LORA_DTYPE, INPUT_PRECISION, INTERPRET)
    if HAS_PROD:
        part_ptrs = part_ptr + (pid_s * C + offs_c[:, None]) * R + offs_r[None, :]
        tl.store(part_ptrs, acc, mask=mask_c[:, None] & mask_r[None, :])
    if HAS_SUM:
        tl.store(sum_ptr + pid_s * C + offs_c, col_sum, mask=mask_c)


@triton.jit
def _sum_partials(part_ptr, S, C, R, offs_c, offs_r, mask, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """``Σ_s part[s, offs_c, offs_r]`` over s = 0 … S-1 in order (fp32), for a contiguous (S, C, R) buffer."""
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + (s * C + offs_c[:, None]) * R + offs_r[None, :], mask=mask, other=0.0)
    return acc


@triton.jit
def _finalize_block(
    t,
    part_a_ptr,
    part_b_ptr,
    part_bias_ptr,
    da_ptr,
    db_ptr,
    dbias_ptr,
    S,
    N,
    K,
    R,
    HAS_DA: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Block ``t`` of the split-sum: blocks ``[0, cdiv(K, BLOCK_C))`` sum dA's columns (stored transposed into dA
    (R, K)), the following ``cdiv(N, BLOCK_C)`` blocks sum dB's rows and dbias. Each is cast once, at its store."""
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    n_blocks_a = 0
    if HAS_DA:
        n_blocks_a = tl.cdiv(K, BLOCK_C)
    # (Names differ between the branches: Triton merges a name assigned in both into one typed value.)
    if t < n_blocks_a:
        offs_k = t * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_a = (offs_k[:, None] < K) & mask_r[None, :]
        acc_a = _sum_partials(part_a_ptr, S, K, R, offs_k, offs_r, mask_a, BLOCK_C, BLOCK_R)
        # Transposed store into dA (R, K), cast once to A's dtype.
        out_a = _to(acc_a, da_ptr.dtype.element_ty, INTERPRET).to(da_ptr.dtype.element_ty)
        tl.store(da_ptr + offs_r[None, :] * K + offs_k[:, None], out_a, mask=mask_a)
    else:
        offs_n = (t - n_blocks_a) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_n = offs_n < N
        if HAS_DB:
            mask_b = mask_n[:, None] & mask_r[None, :]
            acc_b = _sum_partials(part_b_ptr, S, N, R, offs_n, offs_r, mask_b, BLOCK_C, BLOCK_R)
            out_b = _to(acc_b, db_ptr.dtype.element_ty, INTERPRET).to(db_ptr.dtype.element_ty)
            tl.store(db_ptr + offs_n[:, None] * R + offs_r[None, :], out_b, mask=mask_b)
        if HAS_DBIAS:
            col = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for s in range(0, S):
                col += tl.load(part_bias_ptr + s * N + offs_n, mask=mask_n, other=0.0)
            out_bias = _to(col, dbias_ptr.dtype.element_ty, INTERPRET).to(dbias_ptr.dtype.element_ty)
            tl.store(dbias_ptr + offs_n, out_bias, mask=mask_n)


def finalize_blocks(N: int, K: int, has_da: bool, has_db_or_bias: bool, block_c: int) -> int:
    """Programs the split-sum needs: column blocks of dA, then row blocks of dB/dbias."""
    return (triton.cdiv(K, block_c) if has_da else 0) + (triton.cdiv(N, block_c) if has_db_or_bias else 0)


# ---------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["threshold"])
def _lora_reduce_kernel(
    # pointers
    x_ptr,
    u_ptr,
    g_ptr,
    h_ptr,
    part_a_ptr,
    part_b_ptr,
    part_bias_ptr,
    key_ptr,
    # sizes
    M,
    N,
    K,
    R,
    rows_per_split,
    # strides
    stride_xm,
    stride_xk,
    stride_um,
    stride_ur,
    stride_gm,
    stride_gn,
    stride_hm,
    stride_hr,
    # scalars
    threshold,
    n_groups,
    # meta-parameters
    LORA_DTYPE: tl.constexpr,
    HAS_DA: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Split backward: program (c, s) writes partial s of a BLOCK_C-column block of dA (c < cdiv(K, BLOCK_C)) or
    of dB and dbias (the blocks after). Reads x once with the mask drawn once per element, g once."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_blocks_a = 0
    if HAS_DA:
        n_blocks_a = tl.cdiv(K, BLOCK_C)
    if pid_c < n_blocks_a:
        _reduce_block(
            x_ptr, u_ptr, part_a_ptr, part_a_ptr, pid_c, pid_s, M, K, R, rows_per_split,
            stride_xm, stride_xk, stride_um, stride_ur, key_ptr, threshold, n_groups,
            LORA_DTYPE, HAS_DROPOUT, True, False, INPUT_PRECISION, INTERPRET, BLOCK_M, BLOCK_C, BLOCK_R,
        )  # fmt: skip
    else:
        _reduce_block(
            g_ptr, h_ptr, part_b_ptr, part_bias_ptr, pid_c - n_blocks_a, pid_s, M, N, R, rows_per_split,
            stride_gm, stride_gn, stride_hm, stride_hr, key_ptr, threshold, n_groups,
            LORA_DTYPE, False, HAS_DB, HAS_DBIAS, INPUT_PRECISION, INTERPRET, BLOCK_M, BLOCK_C, BLOCK_R,
        )  # fmt: skip


@triton.jit
def _lora_finalize_kernel(
    # pointers
    part_a_ptr,
    part_b_ptr,
    part_bias_ptr,
    da_ptr,
    db_ptr,
    dbias_ptr,
    # sizes
    S,
    N,
    K,
    R,
    # meta-parameters
    HAS_DA: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The split-sum as its own launch (fused backward, or no dx): one block of :func:`_finalize_block` each."""
    _finalize_block(
        tl.program_id(0), part_a_ptr, part_b_ptr, part_bias_ptr, da_ptr, db_ptr, dbias_ptr, S, N, K, R,
        HAS_DA, HAS_DB, HAS_DBIAS, INTERPRET, BLOCK_C, BLOCK_R,
    )  # fmt: skip


# ---------------------------------------------------------------- launchers


def max_partials(N: int, K: int, R: int, needs: tuple[bool, bool, bool]) -> int:
    """The most partials S (row blocks or splits) whose buffers stay below :data:`kernels.configs.INT32_LIMIT`
    elements: the producers and the split-sum index them ``(s·C + c)·R + r`` in int32 (s a program id or a loop
    index), ``S·K·R``, ``S·N·R`` and ``S·N`` for those in ``needs``; the split-sum's dA (R, K) and dB (N, R) stores
    stay within one partial's offsets. The fused backward hands over to the split one past it, the split one caps
    its row splits by it, and :meth:`Partials.allocate` refuses what would pass it."""
    need_da, need_db, need_dbias = needs
    return int32_room(max(K * R if need_da else 0, N * R if need_db else 0, N if need_dbias else 0))


@dataclasses.dataclass
class Partials:
    """The fp32 partial buffers of one backward: ``a (S, K, R)``, ``b (S, N, R)``, ``bias (S, N)``; a buffer not
    asked for is a placeholder tensor the kernels never touch (their switches skip it)."""

    S: int
    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def allocate(cls, S: int, N: int, K: int, R: int, needs: tuple[bool, bool, bool], spare: torch.Tensor):
        need_da, need_db, need_dbias = needs
        if S > max_partials(N, K, R, needs):
            shapes = (("dA (S, K, R)", (S, K, R)), ("dB (S, N, R)", (S, N, R)), ("dbias (S, N)", (S, N)))
            asked = ", ".join(f"{name} = {shape}" for (name, shape), need in zip(shapes, needs, strict=True) if need)
            raise ValueError(
                f"the fp32 partials of {asked} need offsets past int32, which the kernels index them with: "
                f"at most {max_partials(N, K, R, needs)} partials fit for N = {N}, K = {K}, R = {R}"
            )
        f32 = dict(dtype=torch.float32, device=spare.device)
        return cls(
            S,
            torch.empty((S, K, R), **f32) if need_da else spare,
            torch.empty((S, N, R), **f32) if need_db else spare,
            torch.empty((S, N), **f32) if need_dbias else spare,
        )


def lora_reduce(x, u, g, h_s, needs, key, threshold, lora_dtype, input_precision, info, spare) -> Partials:
    """Split backward, launch 2: the dA/dB/dbias partials over row splits (``needs`` = (dA, dB, dbias))."""
    M, K = x.shape
    N, R = g.shape[1], h_s.shape[1]
    BLOCK_R = block_r(R)
    parts: list[Partials] = []

    def args(c):
        n_blocks = finalize_blocks(N, K, needs[0], needs[1] or needs[2], c["BLOCK_C"])
        # Enough programs to fill the GPU about four times; each split covers at least one BLOCK_M of rows; no more
        # splits than int32 offsets index (one alone past them is refused by Partials.allocate).
        most = max_partials(N, K, R, needs)
        n_split = max(1, min(triton.cdiv(M, c["BLOCK_M"]), 4 * info.num_sms // n_blocks, most))
        rows = triton.cdiv(triton.cdiv(M, n_split), c["BLOCK_M"]) * c["BLOCK_M"]
        parts[:] = [Partials.allocate(triton.cdiv(M, rows), N, K, R, needs, spare)]
        pointers = (x, u, g, h_s, parts[0].a, parts[0].b, parts[0].bias, key)
        strides = (*x.stride(), *u.stride(), *g.stride(), *h_s.stride())
        return (*pointers, M, N, K, R, rows, *strides, threshold, dropout_groups(K))

    grid = lambda c: (finalize_blocks(N, K, needs[0], needs[1] or needs[2], c["BLOCK_C"]), parts[0].S)
    constexprs = dict(
        LORA_DTYPE=TL_DTYPES[lora_dtype],
        HAS_DA=needs[0],
        HAS_DB=needs[1],
        HAS_DBIAS=needs[2],
        HAS_DROPOUT=threshold > 0 and needs[0],
        INPUT_PRECISION=input_precision,
        INTERPRET=interpreting(),
        BLOCK_R=BLOCK_R,
    )
    candidates = reduce_configs(BLOCK_R, lora_dtype, input_precision)
    launch(_lora_reduce_kernel, grid, args, constexprs, candidates, info, f"M={M} N={N} K={K} R={R}")
    return parts[0]


def lora_finalize(
    parts: Partials, outputs: tuple, N: int, K: int, R: int, needs: tuple[bool, bool, bool], info
) -> None:
    """The split-sum as its own launch: ``outputs`` = (dA, dB, dbias), placeholders where not asked for."""
    grid = lambda c: (finalize_blocks(N, K, needs[0], needs[1] or needs[2], c["BLOCK_C"]),)
    args = (parts.a, parts.b, parts.bias, *outputs, parts.S, N, K, R)
    constexprs = dict(HAS_DA=needs[0], HAS_DB=needs[1], HAS_DBIAS=needs[2], INTERPRET=interpreting())
    constexprs = dict(constexprs, BLOCK_R=block_r(R))
    launch(_lora_finalize_kernel, grid, args, constexprs, finalize_configs(), info, f"S={parts.S} N={N} K={K} R={R}")
