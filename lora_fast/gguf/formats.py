"""GGUF block formats and their dequantisation in torch, bit for bit the ``gguf`` package's.

A quantised GGUF tensor ``W (N, K)`` is stored row by row: each row is ``K / block`` blocks of ``type_size`` bytes,
and each block holds ``block`` weights (32, or 256 for the K-quants) as small integers with one or a few fp16 scales.
Here a packed weight is a ``uint8`` tensor ``(N, K / block · type_size)``: the file's bytes, unchanged.

Formats (``w`` the weight, ``q`` the stored integer, ``d``/``m`` fp16 scales widened to fp32; byte offsets within the
block):

- ``Q4_0`` (18 B / 32): ``d`` @0, nibbles @2. Weight ``j < 16`` is the low nibble of byte ``j``, ``j ≥ 16`` the high
  nibble of byte ``j - 16``. ``w = d · (q - 8)``.
- ``Q4_1`` (20 B / 32): ``d`` @0, ``m`` @2, nibbles @4 as Q4_0. ``w = d · q + m``.
- ``Q5_0`` (22 B / 32): ``d`` @0, the fifth bits as one little-endian uint32 @2 (bit ``j`` for weight ``j``),
  nibbles @6 as Q4_0. ``w = d · (q - 16)``.
- ``Q8_0`` (34 B / 32): ``d`` @0, int8 weights @2. ``w = q · d``.
- ``Q4_K`` (144 B / 256): ``d`` @0, ``dmin`` @2, eight 6-bit scales and mins packed in 12 bytes @4, nibbles @16:
  64-weight chunk ``c`` takes the low nibbles of bytes ``32c … 32c+31`` then their high nibbles; sub-block ``i``
  (32 weights) has ``w = (d · sc_i) · q - dmin · m_i``.
- ``Q6_K`` (210 B / 256): low nibbles @0 (128 B), high 2-bit pairs @128 (64 B), sixteen int8 scales @192, ``d``
  @208. ``w = (d · sc_j) · (q - 32)`` with ``sc_j`` for weights ``16j … 16j+15``.

Exactness: every product above before the last operation is exact in fp32 (an fp16 ``d`` has 11 significant bits,
the integers at most 8), so each weight is rounded once, by the last ``+``, ``-`` or ``·``, in the order ``gguf``
evaluates it (``gguf.quants``): the results here equal ``gguf.dequantize`` bit for bit, and a fused multiply-add
(the Triton kernel's, or a CPU's) gives the same values, since its product is exact as well.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["QType", "QTYPES", "PACKED_TYPES", "dequantize_rows", "qtype_of"]


@dataclasses.dataclass(frozen=True)
class QType:
    """One GGML block format: its name, GGML type id, weights per block and bytes per block."""

    name: str
    ggml_id: int
    block: int
    type_size: int


# The formats kept packed (the common llama.cpp files: Q4_0/Q4_1/Q5_0/Q8_0 and the K-quants of Q4_K_M).
QTYPES = {
    q.name: q
    for q in (
        QType("Q4_0", 2, 32, 18),
        QType("Q4_1", 3, 32, 20),
        QType("Q5_0", 6, 32, 22),
        QType("Q8_0", 8, 32, 34),
        QType("Q4_K", 12, 256, 144),
        QType("Q6_K", 14, 256, 210),
    )
}
PACKED_TYPES = tuple(QTYPES)


def qtype_of(name: str) -> QType:
    """The format called ``name``; any other name is refused, listing the supported ones."""
    if name not in QTYPES:
        raise ValueError(f"GGUF type {name!r} is not kept packed; supported: {', '.join(PACKED_TYPES)}")
    return QTYPES[name]


# ---------------------------------------------------------------- per format: blocks (B, type_size) -> (B, block)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte ``at`` of every block, widened to fp32, ``(B, 1)``."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Low nibbles of ``qs (B, n)`` into ``out[:, :n]``, high nibbles into ``out[:, n:]`` (converted on the copy)."""
    n = qs.shape[1]
    out[:, :n] = qs & 0x0F
    out[:, n:] = qs >> 4
    return out


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:18], blocks.new_empty((blocks.shape[0], 32), dtype=torch.float32))
    return q.sub_(8).mul_(d)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:20], blocks.new_empty((blocks.shape[0], 32), dtype=torch.float32))
    return q.mul_(d).add_(m)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    qh = blocks[:, 2:6].to(torch.int64)
    qh = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
    high = ((qh[:, None] >> torch.arange(32, device=blocks.device)) & 1).to(torch.uint8) << 4
    low = _nibbles(blocks[:, 6:22], blocks.new_empty((blocks.shape[0], 32)))
    return (low | high).to(torch.float32).sub_(16).mul_(d)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:34].view(torch.int8).to(torch.float32).mul_(_f16(blocks, 0))


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's eight 6-bit scales and mins ``(B, 8)`` each from its 12 bytes (``gguf.quants.Q4_K.get_scale_min``)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    b = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales(blocks[:, 4:16])
    d_sc = (d * sc.to(torch.float32))[:, :, None]  # exact: 11 × 6 bits
    d_m = (dmin * mn.to(torch.float32))[:, :, None]
    qs = blocks[:, 16:144].reshape(b, 4, 32)
    q = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(b, 8, 32).to(torch.float32)
    return q.mul_(d_sc).sub_(d_m).reshape(b, 256)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    b = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(b, 2, 1, 64)
    qh = blocks[:, 128:192].reshape(b, 2, 1, 32)
    scales = blocks[:, 192:208].view(torch.int8).to(torch.float32)
    d_sc = (_f16(blocks, 208) * scales)[:, :, None]  # exact: 11 × 8 bits
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(b, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
    high = ((qh >> shifts) & 0x03).reshape(b, 8, 32)
    q = (low | (high << 4)).to(torch.float32).sub_(32).reshape(b, 16, 16)
    return q.mul_(d_sc).reshape(b, 256)


_DEQUANT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}


def dequantize_rows(data: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, K)`` weights of ``dtype`` from ``data (rows, K / block · type_size)`` uint8 of format ``qtype``.

    Computed in fp32 (bit for bit ``gguf.dequantize``) and cast once to ``dtype`` when another is asked for.
    """
    fmt = qtype_of(qtype)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] % fmt.type_size:
        raise ValueError(
            f"packed {qtype} data must be uint8 (rows, blocks · {fmt.type_size}), got shape {tuple(data.shape)}, "
            f"dtype {data.dtype}"
        )
    rows = data.shape[0]
    k = data.shape[1] // fmt.type_size * fmt.block
    blocks = data.reshape(-1, fmt.type_size)
    w = _DEQUANT[qtype](blocks).reshape(rows, k)
    return w if dtype == torch.float32 else w.to(dtype)
