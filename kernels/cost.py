"""Counts for every launch of the two designs and of the frozen-layer floor, the H100 time they predict, and the
design choice built on them.

Per launch: tensor-core FLOPs (padded ranks counted as the dots run them), the fewest HBM bytes it must move
(each operand read once per launch, small weights once, outputs written once) and the dropout mask elements it
draws. Predicted time ``max(bytes / BW, FLOPs / MMA + draws · RNG_INSTR / INT) + LAUNCH``: memory and tensor-core
work overlap, integer work for the mask competes with the dot's issue slots, every launch costs a gap. The same
formula prices the floor (``y = x Wᵀ + bias``, ``dx = g W``), so the ratio is what the design adds.

These are estimates on a data sheet's H100 SXM (below), not measurements: ``bench/device_check.sh`` measures.
:func:`forward_design` and :func:`backward_design` ("auto") pick the design with the lower prediction, so the choice
is a pure function of the shape, the same in every process.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .configs import dtype_class, dx_tile, forward_tile, reduce_configs
from .utils import block_r

# ---------------------------------------------------------------- the machine (H100 SXM, data sheet)

BW = 3.35e12  # HBM3 bytes/s
MMA = {"16": 989e12, "tf32": 494e12, "ieee": 67e12}  # dense FLOP/s: bf16/fp16 tensor cores, TF32, fp32 FMA
INT = 64 * 132 * 1.755e9  # 32-bit integer instructions/s: 64 per SM per clock (sm_90), 132 SMs, 1.755 GHz
SMS = 132
LAUNCH = 2e-6  # s between dependent launches in one stream
# SASS instructions per dropout-mask element (Philox-4x32-10, eight 16-bit lanes per call, compare, select), as
# bench/compile_check.py measures them in the mask probe on sm_90; tests/test_compile_tier.py checks it still holds.
RNG_INSTR = 12.5


@dataclasses.dataclass
class Launch:
    """One kernel launch: what it must compute and move."""

    kernel: str
    flops: float
    bytes: float
    draws: float = 0.0  # dropout mask elements drawn
    mma: str = "16"

    def seconds(self) -> float:
        return max(self.bytes / BW, self.flops / MMA[self.mma] + self.draws * RNG_INSTR / INT) + LAUNCH


def total_seconds(plan: list[Launch]) -> float:
    return sum(launch.seconds() for launch in plan)


# ---------------------------------------------------------------- plans


def floor_plan(M: int, N: int, K: int, dtype: torch.dtype, input_precision: str = "tf32") -> dict[str, list[Launch]]:
    """The frozen layer alone: one GEMM each way (cuBLAS-like, at the same rates)."""
    e, mma = torch.finfo(dtype).bits // 8, dtype_class(dtype, input_precision)
    return {
        "forward": [Launch("x Wᵀ + bias", 2 * M * N * K, e * (M * K + N * K + M * N + N), mma=mma)],
        "backward": [Launch("g W", 2 * M * N * K, e * (M * N + N * K + M * K), mma=mma)],
    }


def forward_plan(
    M: int, N: int, K: int, R: int, p: float, dtype: torch.dtype, input_precision: str, fused: bool
) -> list[Launch]:
    """The forward's launches for one design (dtype: the base and LoRA compute dtype)."""
    e, mma, rp = torch.finfo(dtype).bits // 8, dtype_class(dtype, input_precision), block_r(R)
    base_bytes = e * (M * K + N * K + M * N + N) + e * (R * K + N * R) + 4 * M * R  # + A, B; h_s written
    draws = M * K if p > 0 else 0
    if fused:
        n_tiles = math.ceil(N / forward_tile(dtype, input_precision, True, p > 0)["BLOCK_N"])
        flops = 2 * M * N * K + n_tiles * 2 * M * K * rp + 2 * M * rp * N
        return [Launch("forward, h fused", flops, base_bytes, draws * n_tiles, mma)]
    return [
        Launch("skinny h_s", 2 * M * K * rp, e * (M * K + R * K) + 4 * M * R, draws, mma),
        Launch("forward, h_s read", 2 * M * N * K + 2 * M * rp * N, base_bytes, 0, mma),
    ]


def backward_plan(
    M: int, N: int, K: int, R: int, p: float, dtype: torch.dtype, input_precision: str, fused: bool
) -> list[Launch]:
    """The backward's launches for one design, all of dx, dA, dB and dbias asked for."""
    e, mma, rp = torch.finfo(dtype).bits // 8, dtype_class(dtype, input_precision), block_r(R)
    draws = M * K if p > 0 else 0
    small = e * (R * K + N * R)  # A and B
    dx_bytes = e * (M * N + N * K + M * K) + small
    if fused:
        tile = dx_tile(dtype, input_precision, True, p > 0, rp)
        S = math.ceil(M / tile["BLOCK_M"])
        n_tiles = math.ceil(K / tile["BLOCK_K"])
        parts = 4 * S * ((K + N) * R + N)
        flops = 2 * M * N * K + n_tiles * 2 * M * N * rp + 2 * M * rp * K + 2 * M * N * rp + 2 * M * K * rp
        return [
            Launch("dx, u fused, partials", flops, dx_bytes + e * M * K + 4 * M * R + parts, draws, mma),
            Launch("split-sum", 0, parts + e * ((K + N) * R + N), 0, mma),
        ]
    block_c = reduce_configs(rp, dtype, input_precision)[0]["BLOCK_C"] if M else 64
    n_blocks = math.ceil(K / block_c) + math.ceil(N / block_c)
    S = max(1, min(math.ceil(M / 64), 4 * SMS // n_blocks))
    parts = 4 * S * ((K + N) * R + N)
    return [
        Launch("skinny u_s", 2 * M * N * rp, e * (M * N + N * R) + 4 * M * R, 0, mma),
        Launch("partials over splits", 2 * M * (K + N) * rp, e * (M * K + M * N) + 8 * M * R + parts, draws, mma),
        Launch("dx, u_s read; split-sum", 2 * M * N * K + 2 * M * rp * K, dx_bytes + 4 * M * R + parts, draws, mma),
    ]


# ---------------------------------------------------------------- the design choice


def _choose(design: str, plans: dict[str, list[Launch]]) -> str:
    if design not in ("auto", "fused", "split"):
        raise ValueError(f"design must be 'auto', 'fused' or 'split', got {design!r}")
    if design != "auto":
        return design
    return min(plans, key=lambda name: (total_seconds(plans[name]), name))


def forward_design(
    design: str, M: int, N: int, K: int, R: int, p: float, dtype: torch.dtype, input_precision: str
) -> str:
    """``"fused"`` or ``"split"`` for the forward: ``design`` itself unless "auto", else the lower prediction. With
    dropout the fused design draws the mask once per N tile, so "auto" all but always splits then."""
    plans = {d: forward_plan(M, N, K, R, p, dtype, input_precision, d == "fused") for d in ("fused", "split")}
    return _choose(design, plans)


def backward_design(
    design: str, M: int, N: int, K: int, R: int, p: float, dtype: torch.dtype, input_precision: str
) -> str:
    """``"fused"`` or ``"split"`` for the backward: the fused design repeats u = g B for each K tile and writes
    partials per row block (both grow with R); the split design reads g twice more and launches once more."""
    plans = {d: backward_plan(M, N, K, R, p, dtype, input_precision, d == "fused") for d in ("fused", "split")}
    return _choose(design, plans)


# ---------------------------------------------------------------- the estimate table (docs/KERNELS.md)

HEADLINE = [(768, 2304, 16, 0.0), (768, 2304, 16, 0.1), (3072, 768, 16, 0.0), (3072, 768, 16, 0.1)]
HEADLINE += [(4096, 4096, 16, 0.0), (4096, 4096, 16, 0.1), (768, 2304, 128, 0.1)]


def estimate_markdown(M: int = 8192, shapes=HEADLINE) -> str:
    """Per headline shape (bf16, auto design): each launch's FLOPs, bytes, mask draws, mask instructions and
    predicted µs, then the totals against the floor. ``python -m lora_fast.kernels`` prints it."""
    bf16 = (torch.bfloat16, "tf32")
    lines = [
        "| K→N | R | p | pass | design | launch | GFLOP | MB | mask draws (M) | mask instr (M) | µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    totals = [
        "| K→N | R | p | floor fwd µs | fwd µs | fwd / floor | floor bwd µs | bwd µs | bwd / floor | fwd+bwd / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for K, N, R, p in shapes:
        floor = floor_plan(M, N, K, *bf16)
        passes = {}
        for name, plan_fn, choose in (("fwd", forward_plan, forward_design), ("bwd", backward_plan, backward_design)):
            design = choose("auto", M, N, K, R, p, *bf16)
            passes[name] = plan_fn(M, N, K, R, p, *bf16, design == "fused")
            for launch in passes[name]:
                lines.append(
                    f"| {K}→{N} | {R} | {p} | {name} | {design} | {launch.kernel} | {launch.flops / 1e9:.2f} "
                    f"| {launch.bytes / 1e6:.1f} | {launch.draws / 1e6:.2f} | {launch.draws * RNG_INSTR / 1e6:.0f} "
                    f"| {1e6 * launch.seconds():.1f} |"
                )
        f0, b0 = total_seconds(floor["forward"]), total_seconds(floor["backward"])
        f1, b1 = total_seconds(passes["fwd"]), total_seconds(passes["bwd"])
        totals.append(
            f"| {K}→{N} | {R} | {p} | {1e6 * f0:.1f} | {1e6 * f1:.1f} | {f1 / f0:.2f} | {1e6 * b0:.1f} "
            f"| {1e6 * b1:.1f} | {b1 / b0:.2f} | **{(f1 + b1) / (f0 + b0):.2f}** |"
        )
    return "\n".join(totals) + "\n\nPer launch:\n\n" + "\n".join(lines) + "\n"
