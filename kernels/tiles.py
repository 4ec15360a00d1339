"""GEMM tile tables per GPU class, and the choice among a table's tiles by wave count.

GPU classes, by the shared memory one block may opt into and the tensor-core instructions Triton emits:

| class | GPUs (compute capability) | shared memory per block | MMA |
|---|---|---|---|
| ``sm80`` | A100 (8.0), Jetson Orin (8.7) | 163 KB | mma.sync |
| ``sm86`` | RTX 30xx, A10, A40 (8.6); RTX 40xx, L4, L40 (8.9); RTX 50xx (12.x); anything older | 99 KB | mma.sync |
| ``sm90`` | H100, H200 (9.0) | 227 KB | wgmma |
| ``sm100`` | B200, GB200 (10.x) | 227 KB | tcgen05 |

A table gives, per GEMM kernel (the forward's tile of y, the dx kernel's tile of dx) and per compile-time case (the
base and LoRA dtype classes, rank work fused or not, the mask drawn or not, the padded rank), a short set of tiles
that fit the class's shared memory and do not spill for R <= 64 (``bench/compile_check.py`` compiles every one of
them for sm_80, sm_86, sm_89, sm_90, sm_100 and sm_120 and checks both).

:func:`by_waves` orders a set for one shape: the GEMM runs one CTA per SM (each tile takes most of an SM's shared
memory), so a grid of T tiles takes ``ceil(T / SMs)`` waves, and a tile's time is its FLOPs (the rank work it
repeats included) over its relative throughput. The relative throughputs (:data:`TILE_EFFICIENCY`) are assumptions,
not measurements: a wide tile reuses each loaded operand over more MMAs. ``bench/device_check.sh`` times the kernels.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Meta-parameters (``BLOCK_*``, ``GROUP_M``) plus warps and pipeline stages of one launch."""

    meta: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2

    def __getitem__(self, name: str) -> int:
        return dict(self.meta)[name]

    def kwargs(self) -> dict:
        return {**dict(self.meta), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def __str__(self) -> str:
        tiles = "x".join(str(v) for k, v in self.meta if k.startswith("BLOCK_"))
        return f"{tiles} w{self.num_warps} s{self.num_stages}"


def cfg(num_warps: int = 4, num_stages: int = 2, **meta: int) -> KernelConfig:
    return KernelConfig(tuple(meta.items()), num_warps, num_stages)


# Shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), by GPU class.
GPU_SHARED = {"sm80": 166912, "sm86": 101376, "sm90": 232448, "sm100": 232448}

# The padded rank from which the fused kernels with fp32 rank work (16-bit activations, fp32 LoRA weights, no
# autocast) take 16 warps and mma.sync on sm_100: every 8-warp tcgen05 tile of them spills there (the FMA work bounds
# them, not the base product's instruction). The dx table's ``wide_rank`` (a padded rank above 16) is the same bound.
SM100_FMA_FUSED_MMA_SYNC_RANK = 32

# Throughput of one CTA's main loop relative to a 128×256 tile, by tile area (rows × columns of the output tile):
# assumed, as a wide tile loads fewer operand bytes per MMA.
TILE_EFFICIENCY = {128 * 256: 1.0, 128 * 128: 0.9, 128 * 64: 0.8, 64 * 64: 0.65}


def gpu_class(capability: tuple[int, int]) -> str:
    """The tile table of a GPU of this compute capability (``sm86``, the smallest shared memory, for the unknown)."""
    major, minor = capability
    if major == 9:
        return "sm90"
    if major in (10, 11):
        return "sm100"
    if (major, minor) in ((8, 0), (8, 7)):
        return "sm80"
    return "sm86"


def _gemm(m: int, n: int, k: int, warps: int = 8, stages: int = 3) -> KernelConfig:
    return cfg(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=warps, num_stages=stages)


# ---------------------------------------------------------------- forward: tile (BLOCK_M, BLOCK_N) of y, loop over K


def forward_tiles(gpu: str, base: str, lora: str, fused: bool, block_r: int = 16) -> list[KernelConfig]:
    """Tiles for the forward GEMM. ``base``/``lora``: dtype classes ("16", "tf32", "ieee") of the base product and of
    the rank work (fused: in the loop; split: in the epilogue); ``block_r``: the padded rank."""
    wide_rank = block_r >= 64
    if base == "ieee":  # fp32 on the FMA units, operands in registers: small tiles
        return [_gemm(64, 64, 16, 8, 2)] if fused else [_gemm(64, 64, 32, 4, 2)]
    if base == "tf32":
        if gpu == "sm86":
            return [_gemm(64, 64, 32, 4, 3)] if fused and wide_rank else [_gemm(128, 64, 32, 8, 3)]
        return [_gemm(128, 128, 32)]
    # 16-bit base product
    if lora in ("ieee", "tf32"):  # fp32 rank work inside a 16-bit tile (no autocast): fp32 tiles, narrower
        if not fused:  # the rank work in the epilogue, R_CHUNK ranks at a time
            if gpu in ("sm86", "sm80"):
                return [_gemm(64, 64, 64, 4, 3)]
            return [_gemm(128, 64 if lora == "ieee" else 128, 64)]
        # The fused h = x Aᵀ holds fp32 operand tiles in registers: where the wide tile spills (sm_80 from R = 32,
        # "ieee" from R = 64) a 32-deep K step and 8 warps; on sm_100 16 warps (SM100_FMA_FUSED_MMA_SYNC_RANK).
        if gpu in ("sm86", "sm80"):
            return [_gemm(64, 64, 32, 8, 3)]
        if gpu == "sm100" and block_r >= SM100_FMA_FUSED_MMA_SYNC_RANK:
            return [_gemm(64, 32, 32, 16, 3)]
        if lora == "ieee" and block_r >= 64:
            return [_gemm(64, 64, 32, 8, 3)]
        return [_gemm(128, 64 if lora == "ieee" else 128, 64)]
    if gpu in ("sm86", "sm80"):  # mma.sync keeps operand fragments in registers: 128×256 spills
        return [_gemm(128, 128, 64), _gemm(128, 64, 64)]
    if wide_rank:  # h and B tiles of 64 ranks and more beside a 128×256 accumulator spill (fp32 weights, autocast)
        return [_gemm(128, 128, 64, 8, 4)]
    return [_gemm(128, 256, 64), _gemm(128, 128, 64, 8, 4)]


# ---------------------------------------------------------------- dx: tile (BLOCK_M, BLOCK_K) of dx, loop over N


def dx_tiles(gpu: str, base: str, lora: str, fused: bool, dropout: bool, wide_rank: bool) -> list[KernelConfig]:
    """Tiles for the dx GEMM. A wide K tile divides the fused rank work (u and dB: 2·R/BLOCK_K extra FLOPs); the fused
    epilogue with dropout holds a second (BLOCK_M, BLOCK_K) fp32 tile (the masked LoRA term) and a padded rank above
    16 (``wide_rank``) larger u, h and dA tiles, so both narrow the tile."""
    hopper = gpu in ("sm90", "sm100")
    if base == "ieee":
        return (
            [_gemm(16, 16, 32, 4, 2)]
            if fused and wide_rank
            else [_gemm(32, 16, 32, 4, 2) if fused else _gemm(64, 32, 64, 4, 2)]
        )
    if base == "tf32":
        if not fused:
            return [_gemm(128, 32, 64 if (dropout or gpu == "sm86") else 128)]
        if hopper:
            return [_gemm(128, 32, 64 if (dropout or wide_rank) else 128)]
        return [_gemm(64 if wide_rank else 128, 32, 64)]
    if lora in ("ieee", "tf32"):  # fp32 rank work: u and dB hold fp32 copies of the g tile
        if fused:  # operands in registers: from R = 32 (and on sm_120 at R = 16) a 32-deep step and 8 warps
            if gpu == "sm86":
                return [_gemm(32, 32, 32, 8, 3)]
            if gpu == "sm100" and wide_rank:  # SM100_FMA_FUSED_MMA_SYNC_RANK: 16 warps on mma.sync
                return [_gemm(64, 32, 32, 16, 3)]
            return [_gemm(64, 32, 32, 8, 3)] if wide_rank else [_gemm(64, 32, 64, 8 if hopper else 4, 3)]
        return [_gemm(128, 64, 64)] if hopper else [_gemm(128, 32, 64)]
    if not fused:
        if hopper:
            return [_gemm(128, 64, 128)] if dropout or wide_rank else [_gemm(128, 64, 256), _gemm(128, 64, 128)]
        return [_gemm(128, 64 if gpu == "sm80" else 32, 128)]
    if hopper:
        if dropout:
            return [_gemm(128, 64, 64)]
        return [_gemm(128, 64, 128)] if wide_rank else [_gemm(128, 64, 256), _gemm(128, 64, 128)]
    if wide_rank:  # u, h_s and the dB product of 32+ ranks beside the mma.sync fragments: half the rows again
        return [_gemm(32, 32, 64, 4, 3)] if dropout or gpu == "sm86" else [_gemm(64, 32, 64, 4, 3)]
    return [_gemm(128, 32, 64, 8, 4)]


# ---------------------------------------------------------------- the choice by waves


def waves(rows: int, cols: int, block_rows: int, block_cols: int, sms: int) -> tuple[int, float]:
    """(CTAs, waves) of a grid of output tiles over ``rows × cols`` on ``sms`` SMs, one CTA per SM."""
    ctas = math.ceil(rows / block_rows) * math.ceil(cols / block_cols)
    return ctas, ctas / sms


def tile_cost(config: KernelConfig, rows: int, cols: int, col_key: str, sms: int, rank_terms: float) -> float:
    """Relative time of the grid: full waves × one tile's work (its area, plus ``rank_terms`` · R-padded / tile
    columns of repeated rank work, folded in by the caller as a fraction) over the tile's relative throughput."""
    bm, bc = config["BLOCK_M"], config[col_key]
    ctas, _ = waves(rows, cols, bm, bc, sms)
    efficiency = TILE_EFFICIENCY.get(bm * bc, 0.5)
    return math.ceil(ctas / sms) * bm * bc * (1.0 + rank_terms / bc) / efficiency


def by_waves(
    candidates: list[KernelConfig], rows: int, cols: int, col_key: str, sms: int, rank_terms: float = 0.0
) -> list[KernelConfig]:
    """``candidates`` ordered by :func:`tile_cost` for this shape, ties kept in table order (the wider tile first)."""
    if rows <= 0 or cols <= 0 or len(candidates) < 2:
        return list(candidates)
    return sorted(candidates, key=lambda c: tile_cost(c, rows, cols, col_key, sms, rank_terms))
