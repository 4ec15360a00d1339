"""Kernel timing that attributes: per shape, each pass of each design timed alone, each of its kernels timed alone
against its cuBLAS counterpart, the configurations the launches chose (and any fallback), and the measured design
table that ``auto`` loads (``LORA_FAST_DESIGNS=designs.json``).

    python3 bench/kernel_timing.py --out OUT                 # the rows below (CUDA)
    python3 bench/kernel_timing.py --out OUT --device cpu    # plumbing only: tiny shapes, Triton's interpreter

Rows: K→N, M = 8192 tokens, Conv1D-layout weight, R = 16: 768→2304 and 3072→768 at p ∈ {0, 0.1}, 4096→4096 at
p ∈ {0, 0.1}, all bf16; one mixed row, 768→2304 at p = 0.1 with bf16 activations and weights and fp32 LoRA weights
without autocast (PEFT's default set-up); last, 768→2304 at R = 8 (PEFT's default rank: the fused dx reads a padded
copy of B there), p = 0, bf16. Per row, GPU time (``triton.testing.do_bench_cudagraph``, median):

- ``floor``: ``x Wᵀ + bias`` and ``g W`` by cuBLAS, each alone;
- per design (fused, split, hybrid): the forward launcher and the backward launcher (dx, dA, dB), each alone, and
  within them every Triton kernel launch alone (``kernels``: name, configuration, its index in the candidate list,
  0 unless it fell back, ms), beside the cuBLAS product it stands in for (the forward GEMM beside ``x Wᵀ``, the dx
  GEMM beside ``g W``);
- ``eager``: what HF PEFT runs, forward + backward through autograd; ``auto``: ``lora_linear(backend="triton")``,
  forward + backward through autograd, as a user runs it;
- ``predicted``: the cost model's estimate (H100) for the floor and each design.

The calibration: every timed launch is paired with its launch in the cost model's plan (the floor's cuBLAS
products, and each design's Triton kernels in plan order, matched by kernel name; a pass whose launches differ
from the plan's, or one that fell back from the table's tile, is listed in ``unpaired`` and left out), and
:func:`lora_fast.kernels.cost.fit` solves the model for its ``cublas``, ``triton`` and ``hbm`` figures over all
rows with one dtype (a mixed row's fp32 rank work is not what those figures price).

``kernel_timing.json`` and ``designs.json`` (per row, the measured fastest design of each pass, stamped with the GPU,
and the calibration) are rewritten atomically after every row, so a run cut short keeps what it measured;
``kernel_timing.md`` at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from lora_fast import lora_linear  # noqa: E402
from lora_fast.kernels import configs, cost, designs  # noqa: E402
from lora_fast.kernels.dropout import dropout_key  # noqa: E402
from lora_fast.kernels.lora_backward import launch_lora_backward  # noqa: E402
from lora_fast.kernels.lora_forward import launch_lora_forward  # noqa: E402
from lora_fast.triton_backend import config  # noqa: E402

bf16, f32 = torch.bfloat16, torch.float32
# (K, N, R, p, LoRA weights' dtype), most wanted first: a run cut short by its time limit keeps the rows it finished.
ROWS = [(768, 2304, 16, 0.0, bf16), (768, 2304, 16, 0.1, bf16), (768, 2304, 16, 0.1, f32), (3072, 768, 16, 0.0, bf16)]
ROWS += [(3072, 768, 16, 0.1, bf16), (4096, 4096, 16, 0.0, bf16), (4096, 4096, 16, 0.1, bf16)]
ROWS += [(768, 2304, 8, 0.0, bf16)]
TINY = [(48, 40, 8, 0.0, f32), (48, 40, 8, 0.1, f32)]  # --device cpu


def _eager(x, weight, bias, A, B, s, p):
    lora_x = x.to(A.dtype)  # PEFT casts x to the LoRA weights' dtype
    drop = torch.nn.functional.dropout(lora_x, p) if p > 0 else lora_x
    return torch.nn.functional.linear(x, weight, bias) + (s * ((drop @ A.t()) @ B.t())).to(x.dtype)


def _precision(lora_dtype: torch.dtype) -> str:
    """The fp32 precision of a row's rank work: torch's default ("ieee") for fp32 LoRA weights, as the backend's
    "auto" takes it; "tf32" (unused by 16-bit dots) otherwise."""
    return "ieee" if lora_dtype == f32 else "tf32"


def _time(fn, device: str) -> float:
    """Median ms: GPU time from CUDA-graph replays (CUDA, eager events where capture fails); a plain timer on CPU."""
    if device == "cpu":
        fn()
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - t0))
        return round(statistics.median(samples), 4)
    try:
        return round(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"), 4)
    except Exception:  # noqa: BLE001 (a capture failure: the eager time still stands)
        return round(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"), 4)


class KernelTimer:
    """A launch hook (:func:`lora_fast.kernels.configs.capture_launches`): runs each launch as the pruner would (the
    first candidate the GPU holds) and times it alone; records kernel, configuration, candidate index and ms."""

    def __init__(self, device: str):
        self.device = device
        self.rows: list[dict] = []

    def __call__(self, kernel, grid, arguments, constexprs, candidates):
        for i, candidate in enumerate(candidates):
            args = arguments(candidate)

            def run(candidate=candidate, args=args):
                kernel[grid(candidate)](*args, **constexprs, **candidate.kwargs())

            try:
                run()
            except OutOfResources:
                continue
            ms = _time(run, self.device)
            self.rows.append(dict(kernel=kernel.__name__, config=str(candidate), candidate=i, ms=ms))
            return candidate
        raise RuntimeError(f"{kernel.__name__}: no configuration fits")


def time_row(M: int, K: int, N: int, R: int, p: float, lora_dtype: torch.dtype, device: str) -> dict:
    """One row: the floor, every design's passes and kernels, PEFT's eager path, auto, the prediction."""
    dt = bf16 if device == "cuda" else f32
    s = 2.0
    gen = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape, dtype=dt: torch.randn(*shape, device=device, dtype=dtype, generator=gen)  # noqa: E731
    x = rnd(M, K)
    w = (rnd(K, N) / K**0.5).t()  # Conv1D layout, read through strides
    b = rnd(N)
    A, B = rnd(R, K, dtype=lora_dtype) / K**0.5, rnd(N, R, dtype=lora_dtype)
    g = rnd(M, N)
    key = dropout_key(device, 1) if p > 0 else None
    precision = _precision(lora_dtype)
    info = configs.device_info(x.device)
    row = {"K": K, "N": N, "R": R, "p": p, "M": M, "dtype": "bf16" if dt == bf16 else "fp32"}
    row["lora_dtype"] = str(lora_dtype).removeprefix("torch.")
    row["dtypes"] = designs.dtype_key(dt, lora_dtype)
    row["floor"] = {"forward": _time(lambda: torch.nn.functional.linear(x, w, b), device),
                    "backward": _time(lambda: g @ w, device)}  # fmt: skip
    kw = dict(input_precision=precision, lora_dtype=lora_dtype)
    row["designs"] = {}
    for design in designs.DESIGNS:
        fwd = lambda design=design: launch_lora_forward(x, w, b, A, B, s, p, key, design=design, **kw)  # noqa: E731
        _, h = fwd()
        bwd = lambda design=design, h=h: launch_lora_backward(g, x, w, A, B, h, s, p, key, design=design, **kw)  # noqa: E731
        entry = {"forward": _time(fwd, device), "backward": _time(bwd, device), "kernels": {}}
        for pass_, fn in (("forward", fwd), ("backward", bwd)):
            timer = KernelTimer(device)
            with configs.capture_launches(timer, info):
                fn()
            entry["kernels"][pass_] = timer.rows
        row["designs"][design] = entry
    xg, Ag, Bg = x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()

    def step(fn):
        def run():
            xg.grad = Ag.grad = Bg.grad = None
            fn().backward(g)

        return run

    row["eager"] = _time(step(lambda: _eager(xg, w, b, Ag, Bg, s, p)), device)
    saved = config.fp32_precision, config.design
    config.fp32_precision, config.design = precision, "auto"
    try:
        row["auto"] = _time(step(lambda: lora_linear(xg, w, b, Ag, Bg, s, dropout_p=p, backend="triton")), device)
    finally:
        config.fp32_precision, config.design = saved
    shape = cost.Shape(M, N, K, R, p, dt, lora_dtype, precision)
    row["auto_design"] = {
        pass_: designs.choose(pass_, "auto", shape, True, info.name) for pass_ in ("forward", "backward")
    }
    row["fastest"] = {
        pass_: min(designs.DESIGNS, key=lambda d: row["designs"][d][pass_]) for pass_ in ("forward", "backward")
    }
    floor = cost.floor_plan(shape)
    row["predicted_ms"] = {"floor": {k: round(1e3 * cost.total_seconds(v), 4) for k, v in floor.items()}}
    for design in designs.DESIGNS:
        row["predicted_ms"][design] = {
            "forward": round(1e3 * cost.total_seconds(cost.forward_plan(shape, design)), 4),
            "backward": round(1e3 * cost.total_seconds(cost.backward_plan(shape, design)), 4),
        }
    row["fallbacks"] = [
        k for d in row["designs"].values() for ks in d["kernels"].values() for k in ks if k["candidate"]
    ]
    return row


def launch_pairs(row: dict, machine: cost.Machine) -> tuple[list[tuple[cost.Launch, float]], list[str]]:
    """The row's timed launches paired with the cost model's (Launch, seconds), and the passes left unpaired."""
    dt = {"bf16": bf16, "fp32": f32}[row["dtype"]]
    lora_dtype = getattr(torch, row["lora_dtype"])
    shape = cost.Shape(row["M"], row["N"], row["K"], row["R"], row["p"], dt, lora_dtype, _precision(lora_dtype))
    floor = cost.floor_plan(shape)
    pairs = [(floor[pass_][0], row["floor"][pass_] / 1e3) for pass_ in ("forward", "backward")]
    unpaired = []
    plans = {"forward": cost.forward_plan, "backward": cost.backward_plan}
    for design in designs.DESIGNS:
        for pass_, plan in plans.items():
            ran = designs.choose(pass_, design, shape, designs.hybrid_supported(dt, dt))
            launches = [la for la in plan(shape, ran, machine) if la.impl in ("triton", "memory")]
            timed = row["designs"][design]["kernels"][pass_]
            names = [cost.TRITON_KERNELS.get(la.kernel) for la in launches]
            if names != [k["kernel"] for k in timed] or any(k["candidate"] for k in timed):
                unpaired.append(f"{row['K']}→{row['N']} p={row['p']} {design} {pass_}: plan {names}, ran "
                                f"{[(k['kernel'], k['candidate']) for k in timed]}")  # fmt: skip
                continue
            pairs += [(la, k["ms"] / 1e3) for la, k in zip(launches, timed, strict=True)]
    return pairs, unpaired


def calibration(meta: dict, rows: list[dict], machine: cost.Machine) -> dict:
    """The cost model's figures fitted to the rows with one dtype (:func:`lora_fast.kernels.cost.fit`), as the
    record designs.json carries, with the passes left unpaired."""
    pairs, unpaired = [], []
    for row in rows:
        if row["dtypes"] == row["dtype"]:
            more, missed = launch_pairs(row, machine)
            pairs += more
            unpaired += missed
    record = cost.calibration_record(machine, cost.fit(pairs, machine), meta["device"])
    return dict(record, unpaired=unpaired)


def _write(path: pathlib.Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def design_table(meta: dict, rows: list[dict], calibrated: dict) -> dict:
    """The measured design table :func:`lora_fast.kernels.designs.load_table` reads: per row the fastest design of
    each pass (a mixed row's dtypes are named ``bf16+fp32``, so it does not stand in for plain bf16), and the
    calibration that prices the shapes it does not hold."""
    out = [dict(K=r["K"], N=r["N"], R=r["R"], p=r["p"], M=r["M"], dtype=r["dtypes"], **r["fastest"]) for r in rows]
    return {"device": meta["device"], "triton": meta["triton"], "date": meta["date"], "rows": out,
            "calibration": calibrated}  # fmt: skip


def markdown(meta: dict, rows: list[dict], calibrated: dict) -> str:
    lines = [f"# LoRA layer passes, {meta['device']}, M = {meta['M']} (median ms: {meta['timing']})", ""]
    figures = ", ".join(f"{k} = {calibrated[k]:.4g} ({calibrated['samples'][k]} launches)" for k in cost.CALIBRATED)
    lines += [f"Calibrated cost model ({calibrated['base']} data sheet): {figures}; "
              f"{len(calibrated['unpaired'])} passes unpaired.", ""]  # fmt: skip
    lines += ["| K→N | R | p | LoRA | pass | floor | fused | split | hybrid | fastest | auto picks | predicted best |"]
    lines += ["|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for pass_ in ("forward", "backward"):
            cells = " | ".join(f"{r['designs'][d][pass_]:.4f}" for d in designs.DESIGNS)
            predicted = min(designs.DESIGNS, key=lambda d: r["predicted_ms"][d][pass_])
            lines.append(
                f"| {r['K']}→{r['N']} | {r['R']} | {r['p']} | {r['lora_dtype']} | {pass_} | {r['floor'][pass_]:.4f} "
                f"| {cells} | {r['fastest'][pass_]} | {r['auto_design'][pass_]} | {predicted} |"
            )
    lines += ["", "Forward + backward through autograd: PEFT eager and `auto` (what a user runs):", ""]
    lines += ["| K→N | R | p | LoRA | floor | eager | auto | auto / floor |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = r["floor"]["forward"] + r["floor"]["backward"]
        lines.append(
            f"| {r['K']}→{r['N']} | {r['R']} | {r['p']} | {r['lora_dtype']} | {floor:.4f} | {r['eager']:.4f} "
            f"| {r['auto']:.4f} | {r['auto'] / floor:.3f} |"
        )
    lines += ["", "Each Triton launch alone (candidate > 0: it fell back from the table's tile):", ""]
    lines += [
        "| K→N | p | LoRA | design | pass | kernel | config | candidate | ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for d, entry in r["designs"].items():
            for pass_, kernels in entry["kernels"].items():
                for k in kernels:
                    lines.append(
                        f"| {r['K']}→{r['N']} | {r['p']} | {r['lora_dtype']} | {d} | {pass_} | {k['kernel']} "
                        f"| {k['config']} | {k['candidate']} | {k['ms']:.4f} |"
                    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "device_out"), help="folder for the .json and .md")
    ap.add_argument("--M", type=int, help="tokens per call (default 8192 on CUDA, 64 on CPU)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: plumbing only (interpreter)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    M = args.M or (8192 if args.device == "cuda" else 64)
    meta = {
        "device": configs.device_info(torch.device(args.device)).name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "M": M,
        "timing": "do_bench_cudagraph" if args.device == "cuda" else "wall clock, Triton interpreter",
    }
    info = configs.device_info(torch.device(args.device))
    machine = cost.base_machine(info.capability, info.num_sms)
    rows: list[dict] = []
    for K, N, R, p, lora_dtype in TINY if args.device == "cpu" else ROWS:
        rows.append(time_row(M, K, N, R, p, lora_dtype, args.device))
        calibrated = calibration(meta, rows, machine)
        _write(out / "kernel_timing.json", {"meta": dict(meta, calibration=calibrated), "rows": rows})
        _write(out / "designs.json", design_table(meta, rows, calibrated))
        print(
            json.dumps({k: rows[-1][k] for k in ("K", "N", "p", "lora_dtype", "floor", "fastest", "auto")}), flush=True
        )
    table = markdown(meta, rows, calibrated)
    (out / "kernel_timing.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
