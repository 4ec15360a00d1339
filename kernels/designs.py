"""The design choice of ``design="auto"``: per pass and shape, the design the cost model (:mod:`kernels.cost`)
predicts fastest on an H100, or the one a measured design table names.

Designs: ``fused`` (one Triton GEMM per pass doing the rank work in its loop), ``split`` (the rank work in skinny
passes, the GEMM reads it back), ``hybrid`` (the base GEMM by cuBLAS, ``addmm_`` into a buffer the Triton passes
filled with the LoRA term: only the LoRA work in Triton). ``hybrid`` needs a 16-bit base product whose operands are
already in that dtype (cuBLAS then computes what the Triton GEMM would); elsewhere ``auto`` does not pick it and
asking for it runs ``split``.

A measured table (``LORA_FAST_DESIGNS=path.json``, written by ``bench/device_check.sh``) replaces the prediction for
the shapes it holds, on the GPU it was measured on (a table from another GPU, or a corrupt one, is refused with a
ValueError naming the file): rows ``{"K", "N", "R", "p", "dtype", "M", "forward", "backward"}``, matched on K, N,
the padded rank, dropout on or off and the dtypes (:func:`dtype_key`: "bf16", "bf16+fp32"), then the nearest M. Its
``calibration`` (:func:`kernels.cost.calibration_record`, the model's efficiency figures fitted to the same run)
prices the shapes it does not hold. The choice is a pure function of the shape (and the table), the same in every
process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib

import torch

from .cost import (
    A100,
    H100,
    Machine,
    Shape,
    backward_plan,
    floor_plan,
    forward_plan,
    gemm_tile,
    machine_from_record,
    peft_plan,
    total_seconds,
)
from .tiles import waves as wave_count
from .utils import block_r

DESIGNS = ("fused", "split", "hybrid")
CHOICES = ("auto", *DESIGNS)
TABLE_ENV = "LORA_FAST_DESIGNS"
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_key(dtype: torch.dtype, lora_dtype: torch.dtype | None = None) -> str:
    """A design table's name for the compute dtypes: "bf16", or "bf16+fp32" where the LoRA branch differs."""
    name = _DTYPE_NAMES.get(dtype, str(dtype))
    if lora_dtype is None or lora_dtype == dtype:
        return name
    return f"{name}+{_DTYPE_NAMES.get(lora_dtype, str(lora_dtype))}"


def hybrid_supported(base_dtype: torch.dtype, *operand_dtypes: torch.dtype) -> bool:
    """cuBLAS computes the base product as the Triton GEMM would: a 16-bit product of operands in that dtype."""
    return base_dtype in (torch.float16, torch.bfloat16) and all(d == base_dtype for d in operand_dtypes)


# ---------------------------------------------------------------- measured tables

_TABLES: dict[tuple[str, float], dict] = {}


def load_table(path: str | os.PathLike) -> dict:
    """The design table at ``path``: ``{"device": name, "rows": {key: [(M, forward, backward), ...]}, "machine":
    the calibrated Machine or None}``. Raises ValueError naming the file and the problem where it is not a table
    this version wrote."""
    path = pathlib.Path(path)
    try:
        stamp = path.stat().st_mtime
    except OSError as e:
        raise ValueError(f"{TABLE_ENV}={path}: cannot read the design table ({e.strerror})") from e
    cached = _TABLES.get((str(path), stamp))
    if cached is not None:
        return cached
    try:
        data = json.loads(path.read_text())
        rows: dict[tuple, list] = {}
        for row in data["rows"]:
            for pass_ in ("forward", "backward"):
                if row[pass_] not in DESIGNS:
                    raise ValueError(f"{pass_} design {row[pass_]!r} is none of {DESIGNS}")
            key = (int(row["K"]), int(row["N"]), block_r(int(row["R"])), float(row["p"]) > 0, str(row["dtype"]))
            rows.setdefault(key, []).append((int(row["M"]), row["forward"], row["backward"]))
        device, record = str(data["device"]), data.get("calibration")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{TABLE_ENV}={path}: not a design table of bench/device_check.sh ({e!r})") from e
    machine = None if record is None else machine_from_record(record, f"{TABLE_ENV}={path}")
    table = {"device": device, "rows": rows, "machine": machine}
    _TABLES[(str(path), stamp)] = table
    return table


def device_table(device: str | None) -> dict | None:
    """The table of ``LORA_FAST_DESIGNS`` for this GPU (None without one); one measured on another GPU is refused."""
    path = os.environ.get(TABLE_ENV)
    if not path or device is None:
        return None
    table = load_table(path)
    if table["device"] != device:
        raise ValueError(f"{TABLE_ENV}={path} was measured on {table['device']}, but this GPU is {device}")
    return table


def measured(pass_: str, s: Shape, table: dict | None) -> str | None:
    """The design ``table`` (:func:`device_table`) names for this pass and shape (None without a table or a row)."""
    if table is None:
        return None
    rows = table["rows"].get((s.K, s.N, s.rp, s.p > 0, dtype_key(s.dtype, s.lora_dtype)))
    if not rows:
        return None
    M, forward, backward = min(rows, key=lambda r: (abs(math.log2(max(r[0], 1)) - math.log2(max(s.M, 1))), r[0]))
    return forward if pass_ == "forward" else backward


# ---------------------------------------------------------------- the choice


def choose(pass_: str, design: str, s: Shape, hybrid: bool = True, device: str | None = None) -> str:
    """The design one pass runs: ``design`` itself unless "auto" (then the measured table's, else the lowest
    prediction, by the table's calibrated model where it has one); "hybrid" becomes "split" where ``hybrid``
    (:func:`hybrid_supported`) is False, and so does a "fused" forward with dropout."""
    if design not in CHOICES:
        raise ValueError(f"design must be one of {CHOICES}, got {design!r}")
    if design == "auto":
        table = device_table(device)
        machine = (table or {}).get("machine") or H100
        design = measured(pass_, s, table) or predicted(pass_, s, hybrid, machine)
    if pass_ == "forward" and design == "fused" and s.p > 0:
        return "split"  # the fused forward would draw the mask once per column tile (kernels.lora_forward)
    return "split" if design == "hybrid" and not hybrid else design


def predicted(pass_: str, s: Shape, hybrid: bool = True, machine: Machine = H100) -> str:
    """The design with the lowest predicted time for this pass on ``machine`` (ties: the name first in order)."""
    plan = forward_plan if pass_ == "forward" else backward_plan
    options = [
        d for d in DESIGNS if (hybrid or d != "hybrid") and not (pass_ == "forward" and d == "fused" and s.p > 0)
    ]
    return min(options, key=lambda d: (total_seconds(plan(s, d, machine), machine), d))


def pass_design(
    pass_: str,
    design: str,
    M: int,
    N: int,
    K: int,
    R: int,
    p: float,
    dtype: torch.dtype,
    input_precision: str,
    lora_dtype: torch.dtype | None = None,
    hybrid: bool = True,
    device: str | None = None,
) -> str:
    """The design of pass ``pass_`` ("forward" or "backward") for this shape (see :func:`choose`)."""
    return choose(pass_, design, Shape(M, N, K, R, p, dtype, lora_dtype, input_precision), hybrid, device)


forward_design = functools.partial(pass_design, "forward")
backward_design = functools.partial(pass_design, "backward")


# ---------------------------------------------------------------- the estimate table (docs/KERNELS.md)

HEADLINE = [(768, 2304, 16, 0.0), (768, 2304, 16, 0.1), (3072, 768, 16, 0.0), (3072, 768, 16, 0.1)]
HEADLINE += [(4096, 4096, 16, 0.0), (4096, 4096, 16, 0.1), (768, 2304, 128, 0.1)]


def estimate_rows(M: int = 8192, shapes=HEADLINE, machine: Machine = H100) -> list[dict]:
    """Per shape (bf16): the floor, PEFT's eager path, each design and ``auto`` (per pass), forward + backward µs."""
    rows = []
    for K, N, R, p in shapes:
        s = Shape(M, N, K, R, p)
        floor = {k: total_seconds(v, machine) for k, v in floor_plan(s).items()}
        peft = {k: total_seconds(v, machine) for k, v in peft_plan(s).items()}
        row = dict(K=K, N=N, R=R, p=p, floor=floor, peft=peft, designs={})
        for d in DESIGNS:
            row["designs"][d] = {
                "forward": total_seconds(forward_plan(s, d, machine), machine),
                "backward": total_seconds(backward_plan(s, d, machine), machine),
            }
        row["auto"] = {pass_: predicted(pass_, s, True, machine) for pass_ in ("forward", "backward")}
        rows.append(row)
    return rows


def estimate_markdown(M: int = 8192, shapes=HEADLINE, machine: Machine = H100) -> str:
    """The estimate table ``python -m lora_fast.kernels`` prints: fwd + bwd µs of the floor, PEFT's eager path and
    each design, and ``auto``'s choice and ratio to the floor, then every launch of ``auto``'s plans."""
    us = lambda d: 1e6 * (d["forward"] + d["backward"])  # noqa: E731
    lines = [
        f"{machine.name}, bf16, M = {M}, forward + backward µs (cost model, not measured):",
        "",
        "| K→N | R | p | floor | PEFT eager | fused | split | hybrid | auto (fwd / bwd) | auto µs | auto / floor "
        "| PEFT / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    detail = [
        "| K→N | R | p | pass | design | launch | GFLOP | MB | L2 MB | CTAs | mask draws (M) | µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in estimate_rows(M, shapes, machine):
        s = Shape(M, row["N"], row["K"], row["R"], row["p"])
        auto = {pass_: row["designs"][d][pass_] for pass_, d in row["auto"].items()}
        floor, peft, total = us(row["floor"]), us(row["peft"]), us(auto)
        cells = " | ".join(f"{us(row['designs'][d]):.1f}" for d in DESIGNS)
        lines.append(
            f"| {row['K']}→{row['N']} | {row['R']} | {row['p']} | {floor:.1f} | {peft:.1f} | {cells} "
            f"| {row['auto']['forward']} / {row['auto']['backward']} | {total:.1f} | **{total / floor:.2f}** "
            f"| {peft / floor:.2f} |"
        )
        for pass_, plan in (("fwd", forward_plan), ("bwd", backward_plan)):
            design = row["auto"]["forward" if pass_ == "fwd" else "backward"]
            for launch in plan(s, design, machine):
                detail.append(
                    f"| {row['K']}→{row['N']} | {row['R']} | {row['p']} | {pass_} | {design} | {launch.kernel} "
                    f"| {(launch.flops + launch.lora_flops) / 1e9:.2f} | {launch.bytes / 1e6:.1f} "
                    f"| {launch.l2_bytes / 1e6:.0f} "
                    f"| {launch.ctas or '–'} | {launch.draws / 1e6:.2f} | {1e6 * launch.seconds(machine):.1f} |"
                )
    return "\n".join(lines) + "\n\nPer launch of `auto`:\n\n" + "\n".join(detail) + "\n"


# ---------------------------------------------------------------- what the targets need (docs/KERNELS.md)

# The kernels' targets, auto / floor at bf16, M = 8192, R = 16: (K, N, p) -> the most auto may take.
TARGETS = {
    (768, 2304, 0.0): 1.25,
    (3072, 768, 0.0): 1.25,
    (768, 2304, 0.1): 1.35,
    (3072, 768, 0.1): 1.35,
    (4096, 4096, 0.0): 1.12,
}


def auto_ratio(s: Shape, machine: Machine) -> float:
    """``auto``'s predicted forward + backward time over the floor's, each pass its best design on ``machine``."""
    floor = sum(total_seconds(plan, machine) for plan in floor_plan(s).values())
    plans = {"forward": forward_plan, "backward": backward_plan}
    return sum(total_seconds(plans[p](s, predicted(p, s, True, machine), machine), machine) for p in plans) / floor


def targets_markdown(M: int = 8192, machine: Machine = H100) -> str:
    """Per target shape, ``auto`` / floor by the model as it stands; with every Triton GEMM loop at cuBLAS's pace
    (``triton`` = 1); with that and every grid filling its last wave; and with all that and the dropout mask free:
    how far the loop efficiency, the waves and the mask could each take the designs there are."""
    at_cublas = dataclasses.replace(machine, triton=1.0)
    full = dataclasses.replace(at_cublas, full_waves=True)
    free_mask = dataclasses.replace(full, int_rate=math.inf)
    lines = [
        f"{machine.name}, bf16, M = {M}, R = 16, `auto` / floor (cost model, not measured; ✓ within the target):",
        "",
        f"| K→N | p | target | model (Triton loop {machine.triton:.2f} of cuBLAS) | Triton loop = cuBLAS "
        "| and every wave full | and the mask free |",
        "|---|---|---|---|---|---|---|",
    ]
    for (K, N, p), target in TARGETS.items():
        s = Shape(M, N, K, 16, p)
        cells = []
        for m in (machine, at_cublas, full, free_mask):
            ratio = auto_ratio(s, m)
            cells.append(f"{ratio:.2f} {'✓' if ratio <= target else '✗'}")
        lines.append(f"| {K}→{N} | {p} | ≤ {target} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def stored_mask_markdown(M: int = 8192, machine: Machine = H100) -> str:
    """With dropout (p = 0.1), ``auto`` / floor as built (each pass draws the mask it needs) against the design the
    kernels do not run: the forward stores the mask one bit per element and the backward reads it back
    (:attr:`kernels.cost.Shape.stored_mask`), each pass again its best design; on ``machine``, and with every Triton
    loop at cuBLAS's pace and every wave full."""
    ideal = dataclasses.replace(machine, triton=1.0, full_waves=True)
    lines = [
        f"{machine.name}, bf16, M = {M}, p = 0.1, `auto` / floor (cost model, not measured), the mask drawn by each "
        "pass that needs it (as built) or stored by the forward, one bit per element, and read back by the backward:",
        "",
        "| K→N | R | drawn | stored | drawn, Triton = cuBLAS, waves full | stored, same | bits kept per layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for K, N, R, p in HEADLINE:
        if p == 0:
            continue
        drawn, stored = Shape(M, N, K, R, p), Shape(M, N, K, R, p, stored_mask=True)
        cells = [f"{auto_ratio(s, m):.2f}" for m in (machine, ideal) for s in (drawn, stored)]
        lines.append(f"| {K}→{N} | {R} | {' | '.join(cells)} | {stored.mask_bytes / 2**20:.2f} MiB |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the wave table (docs/KERNELS.md)

WAVE_SHAPES = [
    ("GPT-2 c_attn", 768, 2304), ("GPT-2 c_proj", 768, 768), ("GPT-2 c_fc", 768, 3072), ("GPT-2 mlp c_proj", 3072, 768),
    ("Llama-8B q/o", 4096, 4096), ("Llama-8B k/v", 4096, 1024), ("Llama-8B gate/up", 4096, 14336),
    ("Llama-8B down", 14336, 4096),
]  # fmt: skip


def waves_markdown(M: int = 8192, R: int = 16) -> str:
    """Per layer shape and GPU: the fused design's GEMM tiles the wave count picks (bf16, p = 0), their CTAs and
    waves, how full the last wave is and the SMs' busy fraction over all waves (waves / ceil(waves))."""
    lines = [
        "| layer | K→N | GPU | forward tile | CTAs | waves | last wave | busy | dx tile | CTAs | waves | last wave "
        "| busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for machine in (H100, A100):
        for name, K, N in WAVE_SHAPES:
            s = Shape(M, N, K, R)
            cells = []
            for kind, cols, col_key in (("forward", N, "BLOCK_N"), ("dx", K, "BLOCK_K")):
                tile = gemm_tile(kind, s, True, machine)
                ctas, waves = wave_count(M, cols, tile["BLOCK_M"], tile[col_key], machine.sms)
                last = ctas - (math.ceil(waves) - 1) * machine.sms
                cells.append(
                    f"{tile['BLOCK_M']}×{tile[col_key]} | {ctas} | {waves:.2f} | {100 * last / machine.sms:.0f}% "
                    f"| {100 * waves / math.ceil(waves):.0f}%"
                )
            lines.append(f"| {name} | {K}→{N} | {machine.name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"
