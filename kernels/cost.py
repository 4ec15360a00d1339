"""The cost model: per launch of each design, of the frozen-layer floor and of PEFT's eager path, the tensor-core
FLOPs, the HBM bytes, the L2 re-reads, the dropout mask draws and the CTAs, and the time they predict.

Predicted time of a launch on a :class:`Machine`:

    max(bytes / HBM, l2_bytes / L2, FLOPs / (peak · efficiency · wave_fill) + mask) + LAUNCH

    mask = (draws · RNG_INSTR + bit_writes · PACK_INSTR + bit_reads · BITS_INSTR) / INT

- ``bytes``: the fewest HBM bytes the launch must move (each operand read once, outputs written once);
- ``l2_bytes`` (Triton GEMMs): the operand tiles each CTA streams, ``e · Kdim · (rows · col_tiles + cols ·
  row_tiles)``, which a narrow tile multiplies (the dropout dx's 128×64 tile at 768→2304 streams ~680 MB);
- ``efficiency``: cuBLAS runs at :attr:`Machine.cublas` of the data sheet's peak, a Triton GEMM main loop at
  :attr:`Machine.triton` of cuBLAS's (no TMA, no persistence, no clusters); memory passes have no FLOP term to speak of;
- ``wave_fill`` (Triton GEMMs, one CTA per SM): ``waves / ceil(waves)``; cuBLAS is taken to choose its tiles (and
  stream-K) so that it loses nothing to the last wave;
- ``draws``: dropout mask elements, ~12.5 SASS integer instructions each (measured in the compile tier), competing
  with the MMAs for issue slots. Each pass that needs the mask draws it (the forward's pass over x; one or two
  passes of the backward).
- A design the kernels do not run, priced for comparison (:attr:`Shape.stored_mask`): the forward stores the mask
  one bit per element (``bit_writes``, ~4.5 instructions each beside the draw, and M·⌈K/8⌉ bytes) and the backward
  reads it back (``bit_reads``, ~4.7 each, and those bytes per pass) instead of drawing it (both costs measured by
  the compile tier's probes).

The constants of :data:`H100` and :data:`A100` are public figures and assumptions; nothing in them is measured on a
GPU. Calibration replaces the three that decide most predictions: ``bench/device_check.sh`` times each kernel alone
beside its cuBLAS counterpart, :func:`fit` solves the model for ``cublas``, ``triton`` and ``hbm`` from those
timings, and the record goes into the run's design table, which :func:`kernels.designs.choose` loads
(``LORA_FAST_DESIGNS=file.json``: the measured design for the shapes it holds, the calibrated model for the rest)
and ``python -m lora_fast.kernels --table file.json`` prints the estimate with.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import torch

from .configs import KernelConfig, dtype_class, reduce_configs
from .tiles import by_waves, dx_tiles, forward_tiles, gpu_class
from .utils import block_r

# SASS instructions per dropout-mask element (Philox-4x32-10, eight 16-bit lanes per call, compare, select), as
# bench/compile_check.py measures them in the mask probe on sm_90; tests/bench/test_compile_tier.py checks it still
# holds.
RNG_INSTR = 12.5
# The stored-mask alternative (Shape.stored_mask), per element, as the same tier's probes measure them on sm_90
# (4.6 and 4.75; 2.9 and 5.0 on sm_80): packing the drawn mask one bit per element from the Philox words and storing
# it (beside the draw), and reading it back (a byte per eight elements, unpacked, select).
PACK_INSTR = 4.5
BITS_INSTR = 4.7


@dataclasses.dataclass(frozen=True)
class Machine:
    """A GPU as the model sees it. ``cublas``: fraction of the peak cuBLAS reaches on LoRA-sized GEMMs (M = 8192,
    K, N of 768-4096); ``triton``: a Triton GEMM main loop relative to cuBLAS's."""

    name: str
    sms: int
    capability: tuple[int, int]
    hbm: float  # bytes/s
    l2: float  # bytes/s the SMs can stream from L2 together
    mma: dict  # dense FLOP/s by dtype class: "16" (bf16/fp16 tensor cores), "tf32", "ieee" (fp32 FMA)
    int_rate: float  # 32-bit integer instructions/s
    launch: float = 2e-6  # s between dependent launches in one stream
    cublas: float = 0.70
    triton: float = 0.88
    full_waves: bool = False  # True: every Triton grid fills its last wave (what-if rows of the target table)


# H100 SXM (data sheet: 3.35 TB/s, 989 / 494 / 67 TFLOP/s dense, 132 SMs at 1.755 GHz boost); L2 at 64 B per SM and
# clock (assumed); cuBLAS at 70% of peak and Triton's loop at 0.88 of cuBLAS (midpoint of 0.85-0.92 reported for
# Triton GEMMs without TMA or persistence).
H100 = Machine("H100 SXM", 132, (9, 0), 3.35e12, 132 * 64 * 1.755e9, {"16": 989e12, "tf32": 494e12, "ieee": 67e12},
               64 * 132 * 1.755e9)  # fmt: skip
# A100 SXM 80 GB (2.04 TB/s, 312 / 156 / 19.5 TFLOP/s, 108 SMs at 1.41 GHz), same assumptions.
A100 = Machine("A100 SXM", 108, (8, 0), 2.04e12, 108 * 64 * 1.41e9, {"16": 312e12, "tf32": 156e12, "ieee": 19.5e12},
               64 * 108 * 1.41e9)  # fmt: skip


@dataclasses.dataclass
class Launch:
    """One kernel launch: what it must compute and move. ``impl``: "triton" (a Triton GEMM), "cublas", "memory" (an
    elementwise or skinny pass: bandwidth-bound, its FLOPs at the tensor cores' rate) or "torch" (a torch op the
    launchers run, priced as "memory"). ``ctas``: the GEMM grid, for the wave fill."""

    kernel: str
    flops: float
    bytes: float
    draws: float = 0.0
    mma: str = "16"
    impl: str = "triton"
    ctas: int = 0
    l2_bytes: float = 0.0
    lora_flops: float = 0.0  # rank work inside a GEMM launch, at its own dtype's rate (fp32 FMA beside bf16 MMAs)
    lora_mma: str = "16"
    bit_writes: float = 0.0  # mask elements also stored packed (stored_mask)
    bit_reads: float = 0.0  # mask elements read from packed bits instead of drawn (stored_mask)

    def mask_seconds(self, machine: Machine = H100) -> float:
        """The integer work of the dropout mask: its draws, their packing and the reads of the packed bits."""
        work = self.draws * RNG_INSTR + self.bit_writes * PACK_INSTR + self.bit_reads * BITS_INSTR
        return work / machine.int_rate

    def seconds(self, machine: Machine = H100) -> float:
        loop = machine.cublas
        if self.impl == "triton" and self.ctas:
            loop *= machine.triton * (1.0 if machine.full_waves else wave_fill(self.ctas, machine.sms))
        compute = self.flops / (machine.mma[self.mma] * loop) + self.lora_flops / (machine.mma[self.lora_mma] * loop)
        compute += self.mask_seconds(machine)
        return max(self.bytes / machine.hbm, self.l2_bytes / machine.l2, compute) + machine.launch


# The Triton kernel behind each launch of the designs' plans (a device run pairs its timings with the plans by it).
TRITON_KERNELS = {
    "forward, h fused": "_lora_forward_kernel",
    "forward, h_s read": "_lora_forward_kernel",
    "skinny h_s": "_lora_skinny_kernel",
    "skinny u_s": "_lora_skinny_kernel",
    "C = bias + h_s Bᵀ": "_lora_rank_out_kernel",
    "C = keep ⊙ u_s A; split-sum": "_lora_rank_out_kernel",
    "dx, u fused, partials": "_lora_dx_kernel",
    "dx, u_s read; split-sum": "_lora_dx_kernel",
    "partials over splits": "_lora_reduce_kernel",
    "split-sum": "_lora_finalize_kernel",
}


def wave_fill(ctas: int, sms: int) -> float:
    """Busy fraction of the SMs over a grid's waves, one CTA per SM: 192 CTAs on 132 SMs fill 1.45 of 2 waves."""
    waves = ctas / sms
    return waves / math.ceil(waves)


def total_seconds(plan: list[Launch], machine: Machine = H100) -> float:
    return sum(launch.seconds(machine) for launch in plan)


# ---------------------------------------------------------------- shapes the launchers will choose


@dataclasses.dataclass(frozen=True)
class Shape:
    """One layer call: tokens, features, rank, dropout, and the dtypes (base compute, LoRA compute, fp32 precision)."""

    M: int
    N: int
    K: int
    R: int
    p: float = 0.0
    dtype: torch.dtype = torch.bfloat16
    lora_dtype: torch.dtype | None = None
    precision: str = "tf32"
    stored_mask: bool = False  # price the design that stores the mask packed (not run by the kernels)

    @property
    def e(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    @property
    def el(self) -> int:
        return torch.finfo(self.lora_dtype or self.dtype).bits // 8

    @property
    def mma(self) -> str:
        return dtype_class(self.dtype, self.precision)

    @property
    def lora_mma(self) -> str:
        return dtype_class(self.lora_dtype or self.dtype, self.precision)

    @property
    def rp(self) -> int:
        return block_r(self.R)

    @property
    def draws(self) -> int:
        return self.M * self.K if self.p > 0 else 0

    @property
    def mask_bytes(self) -> int:
        """The stored mask (stored_mask): one byte per eight columns of x."""
        return self.M * math.ceil(self.K / 8) if self.p > 0 and self.stored_mask else 0

    def mask(self, forward: bool) -> dict:
        """A pass's mask work over x: drawn, or with stored_mask drawn and stored (forward) or read back."""
        if not self.stored_mask:
            return {"draws": self.draws}
        return {"draws": self.draws, "bit_writes": self.draws} if forward else {"bit_reads": self.draws}


def gemm_tile(kind: str, s: Shape, fused: bool, machine: Machine = H100) -> KernelConfig:
    """The tile the launchers choose on ``machine`` for the forward ("forward") or dx ("dx") GEMM."""
    gpu = gpu_class(machine.capability)
    if kind == "forward":
        tiles = forward_tiles(gpu, s.mma, s.lora_mma, fused, s.rp)
        return by_waves(tiles, s.M, s.N, "BLOCK_N", machine.sms, float(s.rp) if fused else 0.0)[0]
    tiles = dx_tiles(gpu, s.mma, s.lora_mma, fused, s.p > 0, s.rp > 16)
    return by_waves(tiles, s.M, s.K, "BLOCK_K", machine.sms, 2.0 * s.rp if fused else 0.0)[0]


def _gemm(name: str, s: Shape, flops: float, bytes_: float, tile: KernelConfig, col_key: str, **kw) -> Launch:
    """A Triton GEMM launch over (M, cols) output tiles (``col_key`` "BLOCK_N": y, over K; "BLOCK_K": dx, over N):
    its CTAs and the operand bytes its CTAs stream through L2."""
    cols, kdim = (s.N, s.K) if col_key == "BLOCK_N" else (s.K, s.N)
    row_tiles, col_tiles = math.ceil(s.M / tile["BLOCK_M"]), math.ceil(cols / tile[col_key])
    l2 = s.e * kdim * (s.M * col_tiles + cols * row_tiles)
    return Launch(name, flops, bytes_, ctas=row_tiles * col_tiles, l2_bytes=l2, mma=s.mma, lora_mma=s.lora_mma, **kw)


# ---------------------------------------------------------------- plans


def floor_plan(s: Shape) -> dict[str, list[Launch]]:
    """The frozen layer alone, by cuBLAS: ``x Wᵀ + bias`` and ``g W``."""
    M, N, K, e = s.M, s.N, s.K, s.e
    return {
        "forward": [
            Launch("cuBLAS x Wᵀ + bias", 2 * M * N * K, e * (M * K + N * K + M * N + N), mma=s.mma, impl="cublas")
        ],
        "backward": [Launch("cuBLAS g W", 2 * M * N * K, e * (M * N + N * K + M * K), mma=s.mma, impl="cublas")],
    }


def peft_plan(s: Shape) -> dict[str, list[Launch]]:
    """HF PEFT's eager LoRA: the base layer, dropout on a copy of x (and its mask), ``x Aᵀ``, ``· Bᵀ``, the scaling
    and the sum each a launch; backward mirrors it and adds the two dx."""
    M, N, K, R, e = s.M, s.N, s.K, s.R, s.e
    mem = dict(mma=s.mma, impl="memory")
    floor = floor_plan(s)
    fwd = list(floor["forward"])
    if s.p > 0:
        fwd.append(Launch("dropout (copy of x, mask)", 0, e * 2 * M * K + M * K, **mem))
    fwd += [
        Launch("x Aᵀ", 2 * M * K * R, e * (M * K + R * K + M * R), **mem),
        Launch("h Bᵀ", 2 * M * R * N, e * (M * R + N * R + M * N), **mem),
        Launch("· scaling", 0, 2 * e * M * N, **mem),
        Launch("base + lora", 0, 3 * e * M * N, **mem),
    ]
    bwd = [
        Launch("g · scaling", 0, 2 * e * M * N, **mem),
        Launch("dB = gᵀ h", 2 * M * N * R, e * (M * N + M * R), **mem),
        Launch("dh = g B", 2 * M * N * R, e * (M * N + M * R), **mem),
        Launch("dA = dhᵀ x", 2 * M * K * R, e * (M * K + M * R), **mem),
        Launch("dh A", 2 * M * R * K, e * (M * R + M * K), **mem),
    ]
    if s.p > 0:
        bwd.append(Launch("dropout backward", 0, e * 2 * M * K + M * K, **mem))
    bwd += [*floor["backward"], Launch("dx + dx_lora", 0, 3 * e * M * K, **mem)]
    return {"forward": fwd, "backward": bwd}


def forward_plan(s: Shape, design: str, machine: Machine = H100) -> list[Launch]:
    """The forward's launches for one design ("fused", "split" or "hybrid") on ``machine``."""
    M, N, K, R, rp, e, el = s.M, s.N, s.K, s.R, s.rp, s.e, s.el
    small = el * (R * K + N * R)  # A and B
    gemm_bytes = e * (M * K + N * K + M * N + N) + small + 4 * M * R  # h_s written or read
    skinny_bytes = e * M * K + el * R * K + 4 * M * R + s.mask_bytes
    skinny = Launch("skinny h_s", 2 * M * K * rp, skinny_bytes, mma=s.lora_mma, impl="memory", **s.mask(True))
    if design == "fused" and s.p == 0:  # with dropout "fused" runs split (kernels.lora_forward)
        tile = gemm_tile("forward", s, True, machine)
        col_tiles = math.ceil(N / tile["BLOCK_N"])
        rank = col_tiles * 2 * M * K * rp + 2 * M * rp * N
        return [_gemm("forward, h fused", s, 2 * M * N * K, gemm_bytes, tile, "BLOCK_N", lora_flops=rank)]
    if design in ("fused", "split"):
        tile = gemm_tile("forward", s, False, machine)
        gemm = _gemm("forward, h_s read", s, 2 * M * N * K, gemm_bytes, tile, "BLOCK_N", lora_flops=2 * M * rp * N)
        return [skinny, gemm]
    out = Launch("C = bias + h_s Bᵀ", 2 * M * rp * N, 4 * M * R + el * N * R + e * (M * N + N), 0, s.lora_mma, "memory")
    base = Launch("cuBLAS C += x Wᵀ", 2 * M * N * K, e * (M * K + N * K + 2 * M * N), mma=s.mma, impl="cublas")
    return [skinny, out, base]


def _partials(s: Shape, S: int) -> float:
    return 4 * S * ((s.K + s.N) * s.R + s.N)


def _splits(s: Shape, machine: Machine = H100) -> int:
    block_c = reduce_configs(s.rp, s.lora_dtype or s.dtype, s.precision, interpret=False)[0]["BLOCK_C"]
    return max(1, min(math.ceil(s.M / 64), 4 * machine.sms // (math.ceil(s.K / block_c) + math.ceil(s.N / block_c))))


def backward_plan(s: Shape, design: str, machine: Machine = H100) -> list[Launch]:
    """The backward's launches for one design on ``machine``, all of dx, dA, dB and dbias asked for."""
    M, N, K, R, rp, e, el = s.M, s.N, s.K, s.R, s.rp, s.e, s.el
    small = el * (R * K + N * R)
    dx_bytes = e * (M * N + N * K + M * K) + small
    mask = s.mask(False)  # drawn again, or read from the stored bits
    if design == "fused":
        tile = gemm_tile("dx", s, True, machine)
        S, col_tiles = math.ceil(M / tile["BLOCK_M"]), math.ceil(K / tile["BLOCK_K"])
        parts = _partials(s, S)
        # g W; u = g B and the branch-free dB product per column tile, u A, dA
        rank = col_tiles * 2 * 2 * M * N * rp + 2 * M * rp * K + 2 * M * K * rp
        fused_bytes = dx_bytes + e * M * K + 4 * M * R + parts + s.mask_bytes
        fused = _gemm("dx, u fused, partials", s, 2 * M * N * K, fused_bytes, tile, "BLOCK_K", lora_flops=rank, **mask)
        plan = [fused, Launch("split-sum", 0, parts + el * (K + N) * R + e * N, impl="memory")]
        if R != rp:  # the fused loop reads B in whole padded rows: a copy padded with zeros (kernels.lora_backward)
            plan.insert(0, Launch("B padded to the padded rank", 0, el * N * (R + rp), impl="torch"))
        return plan
    S = _splits(s, machine)
    parts = _partials(s, S)
    skinny = Launch("skinny u_s", 2 * M * N * rp, e * M * N + el * N * R + 4 * M * R, 0, s.lora_mma, "memory")
    reduce_bytes = e * (M * K + M * N) + 8 * M * R + parts + s.mask_bytes
    reduce = Launch("partials over splits", 2 * M * (K + N) * rp, reduce_bytes, mma=s.lora_mma, impl="memory", **mask)
    if design == "split":
        tile = gemm_tile("dx", s, False, machine)
        dx = _gemm("dx, u_s read; split-sum", s, 2 * M * N * K, dx_bytes + 4 * M * R + parts + s.mask_bytes, tile,
                   "BLOCK_K", lora_flops=2 * M * rp * K, **mask)  # fmt: skip
        return [skinny, reduce, dx]
    out_bytes = 4 * M * R + el * R * K + e * M * K + parts + s.mask_bytes
    out = Launch("C = keep ⊙ u_s A; split-sum", 2 * M * rp * K, out_bytes, mma=s.lora_mma, impl="memory", **mask)
    base = Launch("cuBLAS C += g W", 2 * M * N * K, e * (M * N + N * K + 2 * M * K), mma=s.mma, impl="cublas")
    return [skinny, reduce, out, base]


# ---------------------------------------------------------------- calibration by a device run

CALIBRATED = ("cublas", "triton", "hbm")


def base_machine(capability: tuple[int, int], sms: int) -> Machine:
    """The data-sheet machine a GPU of this capability is calibrated from (the A100's for sm_8x, else the H100's),
    with its own SM count."""
    machine = A100 if capability[0] == 8 else H100
    return dataclasses.replace(machine, sms=sms, capability=tuple(capability))


def fit(pairs: list[tuple[Launch, float]], machine: Machine = H100) -> dict:
    """The model's three efficiency figures from measured launches (``pairs`` of a plan's :class:`Launch` and its
    measured seconds, each launch timed alone), each the median over the launches that show it:

    - ``cublas``: cuBLAS launches, ``FLOPs / (peak · (t - launch))``;
    - ``hbm``: memory passes the model puts at their bytes, ``bytes / (t - launch)`` (achieved bytes/s);
    - ``triton``: Triton GEMMs that ran longer than their byte bounds, the compute term solved for the loop
      efficiency relative to the fitted ``cublas``, with the model's wave fill and mask cost taken as they are.

    Launches within 1.5 launch gaps of nothing are left out (too short to show a rate). A figure no launch shows
    keeps ``machine``'s value; ``samples`` says how many launches gave each."""
    gap = machine.launch
    timed = [(launch, t - gap) for launch, t in pairs if t > 1.5 * gap]
    cublas = [la.flops / (machine.mma[la.mma] * t) for la, t in timed if la.impl == "cublas" and la.flops]

    def at_its_bytes(la: Launch) -> bool:
        compute = la.flops / (machine.mma[la.mma] * machine.cublas) + la.mask_seconds(machine)
        return la.bytes / machine.hbm >= compute

    hbm = [la.bytes / t for la, t in timed if la.impl == "memory" and at_its_bytes(la)]
    figures = {"cublas": _median(cublas, machine.cublas), "hbm": _median(hbm, machine.hbm)}
    triton = []
    for la, t in timed:
        if la.impl != "triton" or not la.ctas:
            continue
        fill = 1.0 if machine.full_waves else wave_fill(la.ctas, machine.sms)
        work = la.flops / machine.mma[la.mma] + la.lora_flops / machine.mma[la.lora_mma]
        busy = t - la.mask_seconds(machine)
        if busy > max(la.bytes / figures["hbm"], la.l2_bytes / machine.l2):
            triton.append(work / (figures["cublas"] * fill * busy))
    figures["triton"] = _median(triton, machine.triton)
    figures["samples"] = {"cublas": len(cublas), "triton": len(triton), "hbm": len(hbm)}
    return figures


def _median(values: list[float], default: float) -> float:
    return float(statistics.median(values)) if values else default


def calibrated(machine: Machine, figures: dict, device: str) -> Machine:
    """``machine`` with the fitted figures of :func:`fit` (named for the device they were measured on)."""
    return dataclasses.replace(machine, name=f"{device} (calibrated)", **{k: float(figures[k]) for k in CALIBRATED})


def calibration_record(machine: Machine, figures: dict, device: str) -> dict:
    """The JSON record of a calibration (kept in a device run's designs.json): the base machine, the GPU, the
    figures and how many launches gave each."""
    return {"device": device, "base": machine.name, "sms": machine.sms,
            "capability": list(machine.capability), **{k: figures[k] for k in CALIBRATED},
            "samples": figures["samples"]}  # fmt: skip


def machine_from_record(record: dict, source: str) -> Machine:
    """The calibrated :class:`Machine` of a record of :func:`calibration_record`; ValueError naming ``source`` when
    it is not one."""
    try:
        bases = {m.name: m for m in (H100, A100)}
        if record["base"] not in bases:
            raise ValueError(f"base machine {record['base']!r} is none of {sorted(bases)}")
        figures = {k: float(record[k]) for k in CALIBRATED}
        bad = {k: v for k, v in figures.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"figures must be finite and > 0, got {bad}")
        sms, capability = int(record["sms"]), tuple(int(c) for c in record["capability"])
        if sms <= 0 or len(capability) != 2:
            raise ValueError(f"sms {sms} and capability {capability} are not a GPU's")
        machine = dataclasses.replace(bases[record["base"]], sms=sms, capability=capability)
        return calibrated(machine, figures, str(record["device"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: not a calibration of bench/kernel_timing.py ({e})") from e
