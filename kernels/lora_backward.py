"""LoRA backward with W frozen: ``u = g B``, ``dB = s gᵀ h``, ``dA = s uᵀ drop(x)``, ``dx = g W + s · drop'(u A)``.

Shapes: ``g (M, N)``, ``x (M, K)``, ``W (N, K)`` (any strides), ``A (R, K)``, ``B (N, R)``, ``h (M, R)`` fp32 saved
by the forward, ``u (M, R)`` fp32, ``dx (M, K)`` in x's dtype, ``dA (R, K)`` / ``dB (N, R)`` fp32 here (the autograd
glue casts them to A's/B's dtype). The dropout mask is regenerated from the forward's seed, never stored.

Kernels (launches for a full backward: 3, plus one deterministic ``sum`` per weight gradient):

- ``_lora_dx_kernel`` owns the (BLOCK_M, BLOCK_K) tile of dx: the K-transposed GEMM ``g W`` over N, with the LoRA term
  ``s · drop'(u A)`` added in the epilogue (the mask scales that term only). With ``FUSE_U`` the same N loop also
  accumulates ``u[m, :] = g[m, :] B`` from the g tiles already in registers (no extra pass over g; B is the only extra
  read) and the programs of column k = 0 store u for dA. Without it, ``_lora_skinny_kernel`` makes u first.
- ``_lora_reduce_m_kernel`` computes ``s · Pᵀ Q`` over the M rows of one split: ``dB`` from ``(P, Q) = (g, h)`` and
  ``dA``ᵀ from ``(drop(x), u)``. Each program writes its own fp32 partial (SPLIT, C, R); the splits are summed
  afterwards, so the result does not depend on scheduling (no atomics) and two runs are bitwise equal.

FLOPs: 2·M·N·K (dx base) + 2·M·N·R (u; ×cdiv(K, BLOCK_K) when fused) + 2·M·R·K (u A) + 2·M·N·R (dB) + 2·M·K·R (dA).
Bytes: g is read twice (dx, dB), x once (dA, besides the forward), W, A, B once per row of programs; written: dx,
u and h-sized buffers (4·M·R each) and the fp32 partials (4·SPLIT·(N + K)·R).
"""

import torch
import triton
import triton.language as tl

from .dropout import _dropout_scale
from .lora_forward import _gemm_configs, _lora_skinny_kernel
from .utils import TL_DTYPES, _dot, _grouped_pid, _to, block_r, interpreting, num_sms

# ---------------------------------------------------------------- kernels


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "R"])
@triton.jit
def _lora_dx_kernel(
    # pointers
    g_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    u_ptr,
    dx_ptr,
    # sizes
    M,
    N,
    K,
    R,
    # strides
    stride_gm,
    stride_gn,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_um,
    stride_ur,
    stride_dxm,
    stride_dxk,
    # scalars
    scaling,
    seed,
    p,
    inv_keep,
    # meta-parameters
    BASE_DTYPE: tl.constexpr,
    LORA_DTYPE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    FUSE_U: tl.constexpr,
    STORE_U: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Owns the (BLOCK_M, BLOCK_K) tile of dx. Removes, against the eager path, the HBM round trips of g W, u A, the
    dropped term and their sum; with FUSE_U also the separate pass over g that makes u."""
    # ---- grouped program order over (m, k) tiles: here "columns" are K
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = _grouped_pid(pid, num_pid_m, num_pid_k, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mask_r = offs_r < R

    # ---- main loop over N: acc = g W (and, fused, u = g B from the same g tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.load(
            g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        # W tile (BLOCK_N, BLOCK_K) through W's strides (Conv1D's .t() view included).
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        )
        acc = _dot(g, w, acc, BASE_DTYPE, INPUT_PRECISION, INTERPRET)
        if FUSE_U:
            b = tl.load(
                b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :],
                other=0.0,
            )
            u = _dot(g, b, u, LORA_DTYPE, INPUT_PRECISION, INTERPRET)

    # ---- epilogue: + s · drop'(u A) (mask on the LoRA term only), one cast to dx's dtype
    u_ptrs = u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur
    if FUSE_U:
        if STORE_U:
            if pid_k == 0:
                tl.store(u_ptrs, u, mask=mask_m[:, None] & mask_r[None, :])
    else:
        u = tl.load(u_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    a = tl.load(
        a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
        mask=mask_r[:, None] & mask_k[None, :],
        other=0.0,
    )
    # u is fp32; it enters the dot in the LoRA dtype.
    lora = _dot(u, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), LORA_DTYPE, INPUT_PRECISION, INTERPRET)
    if HAS_DROPOUT:
        lora = lora * _dropout_scale(seed, offs_m, offs_k, K, p, inv_keep)
    acc += scaling * lora
    # The single cast of the fp32 accumulator to dx's element type.
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
        _to(acc, dx_ptr.dtype.element_ty, INTERPRET).to(dx_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_k[None, :],
    )


@triton.jit
def _lora_reduce_m_kernel(
    # pointers
    p_ptr,
    q_ptr,
    part_ptr,
    # sizes
    M,
    C,
    R,
    rows_per_split,
    # strides
    stride_pm,
    stride_pc,
    stride_qm,
    stride_qr,
    stride_ps,
    stride_ptc,
    stride_ptr,
    # scalars
    scaling,
    seed,
    p,
    inv_keep,
    # meta-parameters
    LORA_DTYPE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``part[split] = s · drop?(P)ᵀ Q`` over the rows of one split; owns the (BLOCK_C, R) tile of that partial.

    P (M, C) is g (dB) or x (dA, with dropout at offsets m·C + c, i.e. m·K + k); Q (M, R) is h or u (fp32).
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_c = offs_c < C
    mask_r = offs_r < R
    m_start = pid_s.to(tl.int64) * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        # Pᵀ tile (BLOCK_C, BLOCK_M), read transposed through P's strides.
        pt = tl.load(
            p_ptr + offs_c[:, None] * stride_pc + offs_m[None, :] * stride_pm,
            mask=mask_c[:, None] & mask_m[None, :],
            other=0.0,
        )
        if HAS_DROPOUT:
            # The (m, k) multiplier laid out as (k, m): same offsets m·K + k as the forward.
            pt = pt.to(tl.float32) * tl.trans(_dropout_scale(seed, offs_m, offs_c, C, p, inv_keep))
        q = tl.load(
            q_ptr + offs_m[:, None] * stride_qm + offs_r[None, :] * stride_qr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = _dot(pt, q, acc, LORA_DTYPE, INPUT_PRECISION, INTERPRET)
    tl.store(
        part_ptr + pid_s * stride_ps + offs_c[:, None] * stride_ptc + offs_r[None, :] * stride_ptr,
        scaling * acc,
        mask=mask_c[:, None] & mask_r[None, :],
    )


# ---------------------------------------------------------------- launchers


def _reduce_m(
    p_mat: torch.Tensor,
    q: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    lora_dtype: torch.dtype,
    input_precision: str,
) -> torch.Tensor:
    """``s · drop?(P)ᵀ Q`` as (C, R) fp32: per-split partials in one launch, then a deterministic sum over splits."""
    M, C = p_mat.shape
    R = q.shape[1]
    BLOCK_R = block_r(R)
    if interpreting():
        BLOCK_M, BLOCK_C, n_split = 16, 32, 2
    else:
        BLOCK_M, BLOCK_C = 64, 64 if BLOCK_R <= 64 else 32
        # Enough programs to fill the GPU about 4 times; each split covers at least one BLOCK_M of rows.
        n_split = max(1, min(triton.cdiv(M, BLOCK_M), 4 * num_sms(p_mat.device) // triton.cdiv(C, BLOCK_C)))
    rows_per_split = triton.cdiv(triton.cdiv(M, n_split), BLOCK_M) * BLOCK_M
    n_split = triton.cdiv(M, rows_per_split)
    part = torch.empty((n_split, C, R), dtype=torch.float32, device=p_mat.device)
    _lora_reduce_m_kernel[(triton.cdiv(C, BLOCK_C), n_split)](
        p_mat,
        q,
        part,
        M,
        C,
        R,
        rows_per_split,
        p_mat.stride(0),
        p_mat.stride(1),
        q.stride(0),
        q.stride(1),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        float(scaling),
        int(seed),
        float(dropout_p),
        1.0 / (1.0 - dropout_p),
        LORA_DTYPE=TL_DTYPES[lora_dtype],
        HAS_DROPOUT=dropout_p > 0.0,
        INPUT_PRECISION=input_precision,
        INTERPRET=interpreting(),
        BLOCK_M=BLOCK_M,
        BLOCK_C=BLOCK_C,
        BLOCK_R=BLOCK_R,
    )
    return part[0] if n_split == 1 else part.sum(0)


def lora_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    h: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    *,
    need_dx: bool = True,
    need_dA: bool = True,
    need_dB: bool = True,
    base_dtype: torch.dtype | None = None,
    lora_dtype: torch.dtype | None = None,
    fused: bool = True,
    input_precision: str = "tf32",
    dx_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Return ``(dx (M, K) in x's dtype, dA (R, K) fp32, dB (N, R) fp32)``, each None when not asked for.

    ``g (M, N)`` and ``x (M, K)`` are 2-D with any strides, ``h`` is the forward's fp32 ``(M, R)``; dtypes default
    to x's (base) and lora_A's (LoRA). ``dx_out`` is an optional preallocated dx (tests poison it).
    """
    M, K = x.shape
    N, R = lora_B.shape
    base_dtype = base_dtype or x.dtype
    lora_dtype = lora_dtype or lora_A.dtype
    dev = x.device
    interp = interpreting()
    dx = dA = dB = None
    if need_dx:
        dx = dx_out if dx_out is not None else torch.empty((M, K), dtype=x.dtype, device=dev)
    if M == 0:
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=dev)
        return dx, zeros(R, K) if need_dA else None, zeros(N, R) if need_dB else None
    BLOCK_R = block_r(R)
    inv_keep = 1.0 / (1.0 - dropout_p)
    u = torch.empty((M, R), dtype=torch.float32, device=dev) if (need_dx or need_dA) else None
    if u is not None and not (need_dx and fused):
        # u = g B by the skinny kernel: the split design, or dA alone with no dx GEMM to fuse it into.
        BLOCK_M_U = 32 if interp else 64
        _lora_skinny_kernel[(triton.cdiv(M, BLOCK_M_U),)](
            g,
            lora_B,
            u,
            M,
            N,
            R,
            g.stride(0),
            g.stride(1),
            lora_B.stride(1),  # B (N, R) stands where Aᵀ does: its rank stride, then its reduction stride
            lora_B.stride(0),
            u.stride(0),
            u.stride(1),
            0,  # seed, p, 1/(1-p): no dropout on g
            0.0,
            1.0,
            LORA_DTYPE=TL_DTYPES[lora_dtype],
            HAS_DROPOUT=False,
            INPUT_PRECISION=input_precision,
            INTERPRET=interp,
            BLOCK_M=BLOCK_M_U,
            BLOCK_K=64 if BLOCK_R <= 64 else 32,
            BLOCK_R=BLOCK_R,
        )
    if need_dx:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
        _lora_dx_kernel[grid](
            g,
            weight,
            lora_A,
            lora_B,
            u,
            dx,
            M,
            N,
            K,
            R,
            g.stride(0),
            g.stride(1),
            weight.stride(0),
            weight.stride(1),
            lora_A.stride(0),
            lora_A.stride(1),
            lora_B.stride(0),
            lora_B.stride(1),
            u.stride(0),
            u.stride(1),
            dx.stride(0),
            dx.stride(1),
            float(scaling),
            int(seed),
            float(dropout_p),
            inv_keep,
            BASE_DTYPE=TL_DTYPES[base_dtype],
            LORA_DTYPE=TL_DTYPES[lora_dtype],
            HAS_DROPOUT=dropout_p > 0.0,
            FUSE_U=fused,
            STORE_U=need_dA,
            INPUT_PRECISION=input_precision,
            INTERPRET=interp,
            BLOCK_R=BLOCK_R,
        )
    if need_dB:
        dB = _reduce_m(g, h, scaling, 0.0, 0, lora_dtype, input_precision)
    if need_dA:
        dA = _reduce_m(x, u, scaling, dropout_p, seed, lora_dtype, input_precision).t()
    return dx, dA, dB
