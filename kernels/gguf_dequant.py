"""GGUF block dequantisation on the GPU: ``out (N, K) = dequant(q)`` for a packed weight ``q (N, K/QK · TYPE_SIZE)``
uint8 in one of the formats of :mod:`lora_fast.gguf.formats` (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K), written in fp32,
fp16 or bf16 (computed in fp32, rounded once at the store, as torch's ``.to`` rounds).

Why a separate pass into a buffer, not a dequantise inside the GEMM's K loop. At training sizes the GEMM over a
packed W is compute-bound, and an in-loop dequantise repeats its unpacking in every program that reads the W tile:
``cdiv(M, BLOCK_M)`` times per weight. Bf16, M = 8192 (16 × 512), K = N = 4096, BLOCK_M = 128 on an H100: the GEMM
is 2·M·N·K = 275 GFLOP (about 0.4 ms); in-loop unpacking is 64 · N·K ≈ 1.1 G weights × 8-12 integer and fp32
instructions ≈ 10 G instructions on the CUDA cores (about 0.35 ms at ~29 T instructions/s), competing with the MMA
issue for the same warps, and it moves the W operand through registers instead of the TMA → shared memory → wgmma
path the LoRA GEMMs use on sm_90. Dequantising once per pass costs N·K unpackings (1/64 of that), reads the packed
bytes (0.56-1.06 B per weight) and writes 2 B per weight: about 45 MB, ~15 µs at 3.35 TB/s, a few percent of the
GEMM, which then runs unchanged. In-loop wins only where W's bytes dominate (M of a few dozen rows: decoding, not
training). So this kernel writes the layer's float weight, the LoRA kernels use it and it is freed right away: the
CUDA caching allocator hands the same block to the next layer, which makes it the reused scratch buffer without any
state of ours. A bonus: the LoRA kernels see exactly the float weight, so the packed path gives the float path's
bits.

One program owns a BLOCK_N × BLOCK_K tile of out and gathers, for each weight, its block's scale bytes and its
quantised bits (byte loads; the reads hit L1/L2, as a block's bytes serve its 32 or 256 weights). Every product
before the last operation is exact in fp32 (fp16 scales × small integers), so a fused multiply-add gives the same
result as the ``gguf`` package's separate multiply and add: the output is bit for bit its dequantisation.
"""

import torch
import triton
import triton.language as tl

from .configs import cfg, launch
from .utils import TL_DTYPES, _to, interpreting

# Format name -> (QTYPE switch, weights per block, bytes per block); the switch values are the kernel's.
FORMATS = {
    "Q4_0": (0, 32, 18),
    "Q4_1": (1, 32, 20),
    "Q5_0": (2, 32, 22),
    "Q8_0": (3, 32, 34),
    "Q4_K": (4, 256, 144),
    "Q6_K": (5, 256, 210),
}
TILE = cfg(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=1)

# ---------------------------------------------------------------- jit helpers


@triton.jit
def _byte(ptrs, mask):
    """The bytes at ``ptrs`` as int32."""
    return tl.load(ptrs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptrs, mask):
    """The little-endian fp16 at ``ptrs`` (two bytes), widened to fp32."""
    bits = _byte(ptrs, mask) | (_byte(ptrs + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


# ---------------------------------------------------------------- kernel


@triton.jit
def _gguf_dequant_kernel(
    # pointers
    q_ptr,
    out_ptr,
    # sizes
    N,
    K,
    # strides (q's row stride in bytes; out's in elements)
    stride_qn,
    stride_on,
    stride_ok,
    # meta-parameters
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Owns ``out[pid_n·BLOCK_N : +BLOCK_N, pid_k·BLOCK_K : +BLOCK_K]``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: every row offset below is too
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    j = (offs_k % QK)[None, :]  # the weight's place in its block
    base = q_ptr + offs_n[:, None] * stride_qn + ((offs_k // QK) * TYPE_SIZE)[None, :]  # its block's first byte

    if QTYPE == 0:  # Q4_0: d · (q - 8)
        q = (_byte(base + 2 + j % 16, mask) >> (4 * (j // 16))) & 0x0F
        w = _f16(base, mask) * (q - 8).to(tl.float32)
    elif QTYPE == 1:  # Q4_1: d · q + m
        q = (_byte(base + 4 + j % 16, mask) >> (4 * (j // 16))) & 0x0F
        w = _f16(base, mask) * q.to(tl.float32) + _f16(base + 2, mask)
    elif QTYPE == 2:  # Q5_0: d · (q - 16), the fifth bit from a little-endian uint32
        low = (_byte(base + 6 + j % 16, mask) >> (4 * (j // 16))) & 0x0F
        high = (_byte(base + 2 + j // 8, mask) >> (j % 8)) & 1
        w = _f16(base, mask) * ((low | (high << 4)) - 16).to(tl.float32)
    elif QTYPE == 3:  # Q8_0: q · d
        q = tl.load(base + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True)
        w = q.to(tl.float32) * _f16(base, mask)
    elif QTYPE == 4:  # Q4_K: (d · sc) · q - dmin · m, eight 6-bit (sc, m) pairs in 12 bytes
        sub = j // 32
        lo = sub < 4
        r = _byte(base + 4 + sub, mask)
        p = _byte(base + 8 + sub, mask)
        t = _byte(base + 4 + sub % 4, mask)
        sc = tl.where(lo, r & 0x3F, (p & 0x0F) | ((t >> 6) << 4))
        mn = tl.where(lo, p & 0x3F, (p >> 4) | ((r >> 6) << 4))
        q = (_byte(base + 16 + (j // 64) * 32 + j % 32, mask) >> (4 * (sub % 2))) & 0x0F
        d_sc = _f16(base, mask) * sc.to(tl.float32)
        w = d_sc * q.to(tl.float32) - _f16(base + 2, mask) * mn.to(tl.float32)
    else:  # Q6_K: (d · sc) · (q - 32), q from a nibble and a 2-bit pair
        h = j // 128
        r = j % 128
        low = (_byte(base + h * 64 + r % 64, mask) >> (4 * (r // 64))) & 0x0F
        high = (_byte(base + 128 + h * 32 + r % 32, mask) >> (2 * (r // 32))) & 0x03
        sc = tl.load(base + 192 + j // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
        d_sc = _f16(base + 208, mask) * sc.to(tl.float32)
        w = d_sc * ((low | (high << 4)) - 32).to(tl.float32)

    out_ptrs = out_ptr + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok
    tl.store(out_ptrs, _to(w, OUT_DTYPE, INTERPRET), mask=mask)  # fp32 rounded once to the output's dtype


# ---------------------------------------------------------------- launcher


def gguf_dequantize(q: torch.Tensor, qtype: str, k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The float weight ``(N, k)`` of ``out_dtype`` from the packed ``q (N, k/QK · TYPE_SIZE)`` uint8 (any row
    stride; the bytes of a row contiguous), on q's device."""
    if qtype not in FORMATS:
        raise ValueError(f"GGUF type {qtype!r} has no dequantisation kernel; supported: {', '.join(FORMATS)}")
    switch, qk, type_size = FORMATS[qtype]
    n = q.shape[0]
    if q.dtype != torch.uint8 or q.dim() != 2 or k % qk or q.shape[1] != k // qk * type_size:
        raise ValueError(
            f"packed {qtype} data of a (N, {k}) weight must be uint8 (N, {k // qk * type_size}), got shape "
            f"{tuple(q.shape)}, dtype {q.dtype}"
        )
    if q.shape[1] and q.stride(1) != 1:
        raise ValueError(f"packed {qtype} data must have contiguous rows, got strides {q.stride()}")
    if out_dtype not in TL_DTYPES:
        raise TypeError(f"out_dtype must be one of {list(TL_DTYPES)}, got {out_dtype}")
    out = torch.empty((n, k), dtype=out_dtype, device=q.device)
    if out.numel() == 0:
        return out
    launch(
        _gguf_dequant_kernel,
        lambda c: (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(k, c["BLOCK_K"])),
        (q, out, n, k, q.stride(0), out.stride(0), out.stride(1)),
        dict(QTYPE=switch, QK=qk, TYPE_SIZE=type_size, OUT_DTYPE=TL_DTYPES[out_dtype], INTERPRET=interpreting()),
        [TILE],
    )
    return out
