"""LoRA backward with W frozen: ``u_s = s · g B``, ``dB = gᵀ h_s``, ``dA = u_sᵀ drop(x)``, ``dx = g W + drop'(u_s A)``.

Shapes: ``g (M, N)``, ``x (M, K)``, ``W (N, K)`` (any strides), ``A (R, K)``, ``B (N, R)``, ``h_s = s · drop(x) Aᵀ``
(M, R) fp32 from the forward, ``dx (M, K)`` in x's dtype, ``dA``/``dB``/``dbias`` in A's/B's/bias's dtypes, cast
once by the split-sum that produces them. ``s/keep`` sits in u_s and h_s, so the dropout mask, regenerated from the
forward's key, is a select. Weight gradients are deterministic fp32 partial sums (:mod:`kernels.partials`).

Three designs; :func:`kernels.designs.backward_design` picks one from the cost model (or a measured table):

- fused (2 launches: ``_lora_dx_kernel`` then the split-sum): the program owning dx tile (m, k) streams ``g[m, :]``
  over N for ``g W`` and accumulates ``u[m, :] = g[m, :] B`` from the same tiles; it also forms, for every N tile,
  the dB product ``gᵀ h_s`` (and, when dbias is asked for, ``gᵀ 1``: the column sums of g), and stores it only for
  every ``cdiv(K, BLOCK_K)``-th N tile, its share, so g is read once in all and the loop has no branch
  (2·R/BLOCK_K extra FLOPs for u and dB); its epilogue draws the mask of its (m, k) tile once, adds
  ``keep ⊙ (u_s A)`` to dx, reads the x tile and writes the dA partial ``keep(x)ᵀ u_s``. Partials:
  4·cdiv(M, BLOCK_M)·((K + N)·R + N) bytes each way.
- split (3 launches): the skinny kernel makes ``u_s`` (one read of g), ``_lora_reduce_kernel`` the partials over a
  few row splits (x and g read once more, the mask drawn once), then ``_lora_dx_kernel`` adds ``keep ⊙ (u_s A)``
  R_CHUNK ranks at a time, while extra programs of the same launch run the split-sum. No rank work is repeated.
- hybrid (4 launches): u_s and the partials as split, then :mod:`kernels.hybrid` writes ``keep ⊙ (u_s A)`` into dx
  (extra programs: the split-sum) and cuBLAS adds ``g W`` to it (``addmm_``).

FLOPs: 2·M·N·K (dx base) + 2·M·N·R (u; ×cdiv(K, BLOCK_K) fused) + 2·M·R·K (u A) + 2·M·N·R (dB; ×cdiv(K, BLOCK_K)
fused) + 2·M·K·R (dA).
"""

import torch
import triton
import triton.language as tl

from .configs import check_int32_offsets, device_info, dx_configs, finalize_configs, launch
from .designs import backward_design, hybrid_supported
from .dropout import _keep_mask, check_key, dropout_groups, dropout_threshold, keep_scale
from .hybrid import lora_rank_out
from .partials import Partials, _finalize_block, finalize_blocks, lora_finalize, lora_reduce, max_partials
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


@triton.jit(do_not_specialize=["threshold"])
def _lora_dx_kernel(
    # pointers
    g_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    x_ptr,
    h_ptr,
    u_ptr,
    dx_ptr,
    part_a_ptr,
    part_b_ptr,
    part_bias_ptr,
    da_ptr,
    db_ptr,
    dbias_ptr,
    key_ptr,
    # sizes
    M,
    N,
    K,
    R,
    n_split,
    # strides
    stride_gm,
    stride_gn,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_xm,
    stride_xk,
    stride_hm,
    stride_hr,
    stride_um,
    stride_ur,
    stride_dxm,
    stride_dxk,
    # scalars: u_s = scale · g B with scale = s/keep
    scale,
    threshold,
    n_groups,
    # meta-parameters
    BASE_DTYPE: tl.constexpr,
    LORA_DTYPE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    FUSE_U: tl.constexpr,
    HAS_DA: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    FINALIZE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_RB: tl.constexpr,
    BIAS_IN_H: tl.constexpr,
    R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Owns the (BLOCK_M, BLOCK_K) tile of dx (programs past the last tile run the split-sum, FINALIZE). Removes,
    against the eager path, the HBM round trips of g W, u A, the dropped term and their sum; fused (FUSE_U) also the
    separate passes over g for u, dB and dbias, and over x for dA (HAS_DA, HAS_DB, HAS_DBIAS: partials)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    if pid >= num_pid_m * num_pid_k:
        if FINALIZE:
            _finalize_block(
                pid - num_pid_m * num_pid_k, part_a_ptr, part_b_ptr, part_bias_ptr, da_ptr, db_ptr, dbias_ptr,
                n_split, N, K, R, HAS_DA, HAS_DB, HAS_DBIAS, INTERPRET, BLOCK_F, BLOCK_R,
            )  # fmt: skip
    else:
        # ---- grouped program order over (m, k) tiles: here the "columns" are K
        pid_m, pid_k = _grouped_pid(pid, num_pid_m, num_pid_k, GROUP_M)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_k = offs_k < K

        # ---- split: the accumulator starts as keep ⊙ (u_s A), R_CHUNK ranks at a time (u_s is ready), so the mask
        # needs no second (BLOCK_M, BLOCK_K) tile. Fused: u = g B builds up in the main loop below.
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if not FUSE_U:
            acc = _rank_update(
                acc, u_ptr, a_ptr, offs_m, offs_k, mask_m, mask_k, R, stride_um, stride_ur, stride_ar, stride_ak,
                LORA_DTYPE, INPUT_PRECISION, INTERPRET, R_CHUNK,
            )  # fmt: skip
            if HAS_DROPOUT:
                acc = tl.where(
                    _keep_mask(key_ptr, offs_m, pid_k * BLOCK_K, n_groups, threshold, BLOCK_M, BLOCK_K), acc, 0.0
                )
        if FUSE_U:
            offs_r = tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            # The dB product's right operand: h_s in columns [0, R) and, for dbias with BIAS_IN_H, ones in column R:
            # the column sums of g come out of the same product (one store, one wait per iteration). Where R + 1
            # columns would double a wide padded rank, dbias sums the g tile's columns on the CUDA cores instead (a
            # second, ones product would add a second wgmma wait per iteration).
            offs_rb = tl.arange(0, BLOCK_RB)
            if HAS_DB or BIAS_IN_H:
                h = tl.zeros((BLOCK_M, BLOCK_RB), dtype=tl.float32)
                if HAS_DB:
                    h = tl.load(
                        h_ptr + offs_m[:, None] * stride_hm + offs_rb[None, :] * stride_hr,
                        mask=mask_m[:, None] & (offs_rb < R)[None, :],
                        other=0.0,
                    )
                if BIAS_IN_H:
                    h = tl.where((offs_rb == R)[None, :], 1.0, h)
        # ---- main loop over N: acc += g W; fused also u = g B, and this program's share of the dB/dbias partials
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
                # B's rows hold BLOCK_R columns, zeros from R on, in LORA_DTYPE (the launcher makes a copy so where
                # they do not): a mask on the rank (R = 4 or 8), rows not 16-element aligned, or fp32 tiles cast in
                # registers (autocast) each cost the loop a second wgmma wait.
                b = tl.load(
                    b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None],
                    other=0.0,
                )
                u = _dot(g, b, u, LORA_DTYPE, INPUT_PRECISION, INTERPRET)
                # Branch-free: every program forms this g tile's dB (and dbias) product and only the one whose turn
                # it is stores it (row block m's programs take turns over the N tiles, so each g tile feeds one
                # partial). A data-dependent `if` here made the compiler wait after every wgmma of the loop; now
                # the loop's products stay in flight up to the one wait the store needs. (The turn per column, not
                # one scalar: the interpreter mis-types a scalar condition and'ed into a mask.)
                mine = mask_n & ((offs_n // BLOCK_N) % num_pid_k == pid_k)
                if HAS_DB or BIAS_IN_H:
                    # Columns [0, R) to the dB partial (S, N, R); column R (BIAS_IN_H) to the dbias partial (S, N).
                    part = _dot(
                        tl.trans(g), h, tl.zeros((BLOCK_N, BLOCK_RB), dtype=tl.float32),
                        LORA_DTYPE, INPUT_PRECISION, INTERPRET,
                    )  # fmt: skip
                    part_ptrs = tl.where(
                        (offs_rb < R)[None, :],
                        part_b_ptr + (pid_m * N + offs_n[:, None]) * R + offs_rb[None, :],
                        part_bias_ptr + pid_m * N + offs_n[:, None],
                    )
                    cols = ((offs_rb < R) & HAS_DB) | ((offs_rb == R) & BIAS_IN_H)
                    tl.store(part_ptrs, part, mask=mine[:, None] & cols[None, :])
                if HAS_DBIAS and not BIAS_IN_H:
                    # Rows past M load as 0; g cast to the LoRA compute dtype as a product operand is, summed in fp32.
                    sums = tl.sum(_to(g, LORA_DTYPE, INTERPRET).to(tl.float32), axis=0)
                    tl.store(part_bias_ptr + pid_m * N + offs_n, sums, mask=mine)

        # ---- fused epilogue: + keep ⊙ (u_s A) (the mask on the LoRA term only)
        if FUSE_U:
            u = scale * u
            a = tl.load(
                a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :],
                other=0.0,
            )
            if HAS_DROPOUT:
                keep = _keep_mask(key_ptr, offs_m, pid_k * BLOCK_K, n_groups, threshold, BLOCK_M, BLOCK_K)
                lora = _dot(
                    u, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), LORA_DTYPE, INPUT_PRECISION, INTERPRET
                )
                acc += tl.where(keep, lora, 0.0)
            else:
                acc = _dot(u, a, acc, LORA_DTYPE, INPUT_PRECISION, INTERPRET)
        # The single cast of the fp32 accumulator to dx's element type.
        tl.store(
            dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
            _to(acc, dx_ptr.dtype.element_ty, INTERPRET).to(dx_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_k[None, :],
        )

        # ---- fused: the dA partial of this row block from the x tile, masked by the same draw
        if FUSE_U:
            if HAS_DA:
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0,
                )
                if HAS_DROPOUT:
                    x = tl.where(keep, x, 0.0)
                part = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
                part = _dot(tl.trans(x), u, part, LORA_DTYPE, INPUT_PRECISION, INTERPRET)
                part_ptrs = part_a_ptr + (pid_m * K + offs_k[:, None]) * R + offs_r[None, :]
                tl.store(part_ptrs, part, mask=mask_k[:, None] & mask_r[None, :])


# ---------------------------------------------------------------- launcher


def launch_lora_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    h_s: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    key: torch.Tensor | None = None,
    *,
    need_dx: bool = True,
    need_dA: bool = True,
    need_dB: bool = True,
    need_dbias: bool = False,
    bias_dtype: torch.dtype | None = None,
    base_dtype: torch.dtype | None = None,
    lora_dtype: torch.dtype | None = None,
    design: str = "auto",
    input_precision: str = "tf32",
    dx_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Return ``(dx, dA, dB, dbias)``, each None when not asked for: dx (M, K) in x's dtype, dA (R, K) and dB (N, R)
    in A's and B's dtypes, dbias (N,) in ``bias_dtype`` (default: g's dtype).

    ``g (M, N)`` and ``x (M, K)`` are 2-D with any strides; ``h_s (M, R)`` fp32 is the forward's. Dtypes
    default to x's (base) and lora_A's (LoRA); ``design`` is ``"auto"``, ``"fused"`` or ``"split"``. ``dx_out`` is
    an optional preallocated dx (tests poison it). Launches: 2 fused, 3 split, nothing but allocations in between.

    The partials are indexed in int32 (:func:`kernels.partials.max_partials`): where the fused design's one partial
    per row block would pass that (long M times wide N or K times R), the split design runs, whatever ``design``
    asks. Raises ValueError, naming the tensor, where another offset the kernels form in int32 would pass it.
    """
    M, K = x.shape
    N, R = lora_B.shape
    dev = x.device
    base_dtype = base_dtype or x.dtype
    lora_dtype = lora_dtype or lora_A.dtype
    dx = (dx_out if dx_out is not None else torch.empty((M, K), dtype=x.dtype, device=dev)) if need_dx else None
    dA = torch.empty((R, K), dtype=lora_A.dtype, device=dev) if need_dA else None
    dB = torch.empty((N, R), dtype=lora_B.dtype, device=dev) if need_dB else None
    dbias = torch.empty((N,), dtype=bias_dtype or g.dtype, device=dev) if need_dbias else None
    if M == 0:
        for t in (dA, dB, dbias):
            if t is not None:
                t.zero_()
        return dx, dA, dB, dbias
    if not (need_dx or need_dA or need_dB or need_dbias):
        return dx, dA, dB, dbias
    # Columns of g (dx, u, dB), B and A's rows index in int32 (rows of g, x, h_s, u and dx in int64); W's rows in the
    # dx GEMM, x's columns in the split reduction.
    check_int32_offsets("g", g, 1)
    check_int32_offsets("lora_B", lora_B, 0, 1)
    check_int32_offsets("lora_A", lora_A, 0)
    check_int32_offsets("h_s", h_s, 1)
    if need_dx:
        check_int32_offsets("weight", weight, 0)
    if need_dA:
        check_int32_offsets("x", x, 1)
    info = device_info(dev)
    threshold = dropout_threshold(dropout_p)
    key = check_key(key, threshold, h_s)
    scale = scaling * keep_scale(threshold)
    BLOCK_R = block_r(R)
    n_groups = dropout_groups(K)
    needs = (need_dA, need_dB, need_dbias)
    # dbias from a ones column of the dB product where R + 1 columns fit the padded rank or 64 (R <= 32, or R not a
    # power of two): one product and one wait per iteration of the fused loop; else (a 128-wide product spills at
    # R = 64 on sm_90) the g tile's column sums on the CUDA cores, which keep the one wait.
    bias_in_h = need_dbias and block_r(R + 1) <= max(BLOCK_R, 64)
    hybrid_ok = need_dx and hybrid_supported(base_dtype, x.dtype, weight.dtype, g.dtype)
    chosen = backward_design(
        design, M, N, K, R, dropout_p, base_dtype, input_precision, lora_dtype, hybrid_ok, info.name
    )  # fmt: skip
    fused = need_dx and chosen == "fused"
    if fused:
        # One partial per row block of the tile that runs (at most the smallest candidate's); past int32 offsets the
        # split design's few row splits take over.
        tiles = dx_configs(base_dtype, lora_dtype, input_precision, True, threshold > 0, BLOCK_R, info, M, K)
        rows = min(c["BLOCK_M"] for c in tiles)
        fused = triton.cdiv(M, rows) <= max_partials(N, K, R, needs)
    # Placeholders for pointers a launch does not use (its constexpr switches never touch them).
    spare = h_s
    outputs = (dA if need_dA else spare, dB if need_dB else spare, dbias if need_dbias else spare)
    n_fin = finalize_blocks(N, K, need_dA, need_dB or need_dbias, finalize_configs()[0]["BLOCK_C"])
    constexprs = dict(
        BASE_DTYPE=TL_DTYPES[base_dtype],
        LORA_DTYPE=TL_DTYPES[lora_dtype],
        HAS_DROPOUT=threshold > 0,
        FUSE_U=fused,
        HAS_DA=need_dA,
        HAS_DB=need_dB,
        HAS_DBIAS=need_dbias,
        FINALIZE=not fused,
        INPUT_PRECISION=input_precision,
        INTERPRET=interpreting(),
        BLOCK_R=BLOCK_R,
        BLOCK_RB=block_r(R + 1) if bias_in_h else BLOCK_R,
        BIAS_IN_H=bias_in_h,
        R_CHUNK=rank_chunk(BLOCK_R, lora_dtype),
        BLOCK_F=finalize_configs()[0]["BLOCK_C"],
    )
    box: list[Partials] = []
    # The fused loop reads B in whole rows of BLOCK_R, 16-element aligned (see its load), and on wgmma GPUs (sm_90)
    # in the LoRA compute dtype: where B is not so (R not BLOCK_R, other strides, fp32 weights under autocast) a copy
    # is, once per backward (N·BLOCK_R elements; the cast rounds as the kernel's per-tile cast does, to nearest
    # even). On mma.sync GPUs the per-tile cast costs no wait, and a 16-bit B tipped sm_80's R = 64 tile into spills.
    cast_b = lora_B.dtype != lora_dtype and info.capability[0] == 9
    rows_b = lora_B
    if fused and (R < BLOCK_R or lora_B.stride(1) != 1 or lora_B.stride(0) % 16 or cast_b):
        rows_b = lora_B.to(lora_dtype) if cast_b else lora_B
        rows_b = (torch.nn.functional.pad(rows_b, (0, BLOCK_R - R)) if R < BLOCK_R else rows_b).contiguous()

    def dx_args(c, u):
        if fused:  # the partials of each row block of this tile shape
            box[:] = [Partials.allocate(triton.cdiv(M, c["BLOCK_M"]), N, K, R, needs, spare)]
        parts = box[0]
        pointers = (g, weight, lora_A, rows_b, x, h_s, u, dx, parts.a, parts.b, parts.bias, *outputs, key)
        strides = (*g.stride(), *weight.stride(), *lora_A.stride(), *rows_b.stride(), *x.stride(), *h_s.stride())
        strides += (*u.stride(), *dx.stride())
        return (*pointers, M, N, K, R, parts.S, *strides, float(scale), threshold, n_groups)

    candidates = dx_configs(base_dtype, lora_dtype, input_precision, fused, threshold > 0, BLOCK_R, info, M, K)
    shape = f"M={M} N={N} K={K} R={R}"
    if fused:
        # ---- 1: dx with u, and the dA/dB/dbias partials of each row block; 2: the split-sum
        grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(K, c["BLOCK_K"]),)
        launch(_lora_dx_kernel, grid, lambda c: dx_args(c, h_s), constexprs, candidates, info, shape)
        if n_fin:
            lora_finalize(box[0], outputs, N, K, R, needs, info)
        return dx, dA, dB, dbias

    # ---- split: 1: u_s = scale · g B (when dx or dA needs it)
    u = spare
    if need_dx or need_dA:
        # u_s's rows padded to the padded rank (64-byte aligned whatever R is): at R = 4 or 8 rows of R made the
        # split dx's main loop wait after every wgmma (bench/results/compile_tier.json).
        u = torch.empty((M, BLOCK_R), dtype=torch.float32, device=dev)
        u = u[:, :R] if R < BLOCK_R else u
        lora_skinny(g, lora_B, u, scale, 0, spare, lora_dtype, input_precision, info)
    # ---- 2: the dA/dB/dbias partials over row splits (x and g read once more, the mask drawn once)
    if n_fin:
        box[:] = [lora_reduce(x, u, g, h_s, needs, key, threshold, lora_dtype, input_precision, info, spare)]
    else:
        box[:] = [Partials(0, spare, spare, spare)]
    # ---- 3: dx = g W + keep ⊙ (u_s A), with the split-sum in extra programs; or the split-sum alone
    if need_dx and chosen == "hybrid":
        # dx = keep ⊙ (u_s A) by Triton (and the split-sum), then dx += g W by cuBLAS.
        fin = (box[0], outputs, N, K, needs) if n_fin else None
        lora_rank_out(u, lora_A, None, dx, key, threshold, base_dtype, lora_dtype, input_precision, info, fin)
        with no_autocast(x.device):  # the operands are in base_dtype already
            dx.addmm_(g, weight)
    elif need_dx:
        grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(K, c["BLOCK_K"]) + n_fin,)
        launch(_lora_dx_kernel, grid, lambda c: dx_args(c, u), constexprs, candidates, info, shape)
    elif n_fin:
        lora_finalize(box[0], outputs, N, K, R, needs, info)
    return dx, dA, dB, dbias
