"""Kernel timing: the LoRA layer (forward + backward) against the frozen-layer floor and PEFT-style eager LoRA.

    python3 bench/kernel_timing.py --out OUT                 # the headline rows (CUDA)
    python3 bench/kernel_timing.py --out OUT --rows full     # and the rest of the GPT-2 shapes, R = 128
    python3 bench/kernel_timing.py --out OUT --device cpu    # plumbing only: tiny shapes, Triton's interpreter

Rows: K→N, M = 8192 tokens, bf16, Conv1D-layout weight, dropout p. Headline: 768→2304 and 3072→768 at R = 16,
p ∈ {0, 0.1}; 4096→4096 at R = 16, p ∈ {0, 0.1}. Columns, each forward + backward (dx, dA, dB; every gradient set
to None before each repetition, so no accumulation kernel runs):

- floor: the frozen base layer alone, ``y = x Wᵀ + bias`` and ``dx = g W`` (2·2·M·K·N FLOPs);
- eager: what HF PEFT runs: base linear, ``nn.functional.dropout`` on a copy of x, ``x Aᵀ``, ``· Bᵀ``, scale, add;
- triton (the ``auto`` design), triton fused, triton split: :func:`lora_fast.lora_linear`, ``backend="triton"``.

Two times per cell, both medians: ``gpu_ms`` from ``triton.testing.do_bench_cudagraph`` (the calls replayed from a
CUDA graph: GPU time without launch gaps) and ``wall_ms`` from ``triton.testing.do_bench(return_mode="median")``
(CUDA events around eager calls: what a training loop sees). Beside them, the cost model's prediction for the
auto design (``lora_fast.kernels.cost``), so a device run checks the estimate in docs/KERNELS.md.

``kernel_timing.json`` is rewritten (atomically) after every row, so a run cut short keeps what it measured;
``kernel_timing.md`` is written at the end. Both stamped with device, versions and date.
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

from lora_fast import lora_linear  # noqa: E402
from lora_fast.kernels import cost  # noqa: E402
from lora_fast.kernels.cost import backward_design, forward_design  # noqa: E402
from lora_fast.triton_backend import config  # noqa: E402

HEADLINE = [(768, 2304, 16, 0.0), (768, 2304, 16, 0.1), (3072, 768, 16, 0.0), (3072, 768, 16, 0.1)]
HEADLINE += [(4096, 4096, 16, 0.0), (4096, 4096, 16, 0.1)]
FULL = [(768, 768, 16, 0.1), (768, 3072, 16, 0.1), (768, 2304, 128, 0.1), (3072, 768, 128, 0.1)]
TINY = [(48, 40, 8, 0.0), (48, 40, 8, 0.1)]  # --device cpu
VARIANTS = ("floor", "eager", "triton", "triton_fused", "triton_split")


def _eager(x, weight, bias, A, B, s, p):
    drop = torch.nn.functional.dropout(x, p) if p > 0 else x
    return torch.nn.functional.linear(x, weight, bias) + s * ((drop @ A.t()) @ B.t())


def _step(fn, g, params):
    """One forward + backward; every gradient is set to None first, so no accumulation kernel runs."""

    def step():
        for t in params:
            t.grad = None
        fn().backward(g)

    return step


def _time(step, device: str) -> dict:
    """Median ms: GPU time from CUDA-graph replays and wall time from eager calls (CUDA); a plain timer on CPU."""
    if device == "cpu":
        step()
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            samples.append(1e3 * (time.perf_counter() - t0))
        return {"wall_ms": round(statistics.median(samples), 4)}
    out = {"wall_ms": round(triton.testing.do_bench(step, return_mode="median"), 4)}
    try:
        out["gpu_ms"] = round(triton.testing.do_bench_cudagraph(step, return_mode="median"), 4)
    except Exception as e:  # a capture failure is reported in the row, the wall time still stands
        out["gpu_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def time_row(M: int, K: int, N: int, r: int, p: float, device: str) -> dict:
    """One row: every variant's forward+backward times at one shape (bf16 on CUDA, fp32 on CPU)."""
    dt, s = (torch.bfloat16 if device == "cuda" else torch.float32), 2.0
    gen = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dt, generator=gen)  # noqa: E731
    x = rnd(M, K).requires_grad_()
    w = (rnd(K, N) / K**0.5).t()  # Conv1D layout, read through strides
    b = rnd(N)
    A = (rnd(r, K) / K**0.5).requires_grad_()
    B = rnd(N, r).requires_grad_()
    g = rnd(M, N)
    fns = {
        "floor": lambda: torch.nn.functional.linear(x, w, b),
        "eager": lambda: _eager(x, w, b, A, B, s, p),
        "triton": lambda: lora_linear(x, w, b, A, B, s, dropout_p=p, seed=1, backend="triton"),
    }
    row = {"K": K, "N": N, "r": r, "p": p, "M": M}
    saved = config.design
    try:
        for name in VARIANTS:
            config.design = {"triton_fused": "fused", "triton_split": "split"}.get(name, "auto")
            fn = fns["triton" if name.startswith("triton") else name]
            row[name] = _time(_step(fn, g, (x, A, B)), device)
    finally:
        config.design = saved
    key = "gpu_ms" if "gpu_ms" in row["triton"] else "wall_ms"
    row["timing"] = key
    row["triton_over_floor"] = round(row["triton"][key] / row["floor"][key], 3)
    row["eager_over_triton"] = round(row["eager"][key] / row["triton"][key], 3)
    row["design"] = {
        "forward": forward_design("auto", M, N, K, r, p, torch.bfloat16, "tf32"),
        "backward": backward_design("auto", M, N, K, r, p, torch.bfloat16, "tf32"),
    }
    row["predicted_ms"] = _predicted(M, N, K, r, p, row["design"])
    return row


def _predicted(M, N, K, r, p, design) -> dict:
    """The cost model's H100 estimate (ms) for the floor and the auto design, forward + backward."""
    bf16 = (torch.bfloat16, "tf32")
    floor = cost.floor_plan(M, N, K, *bf16)
    plans = cost.forward_plan(M, N, K, r, p, *bf16, design["forward"] == "fused")
    plans += cost.backward_plan(M, N, K, r, p, *bf16, design["backward"] == "fused")
    floor_s = cost.total_seconds(floor["forward"] + floor["backward"])
    return {"floor": round(1e3 * floor_s, 4), "triton": round(1e3 * cost.total_seconds(plans), 4)}


def _write_json(path: pathlib.Path, meta: dict, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(path)


def markdown(meta: dict, rows: list[dict]) -> str:
    head = "| K→N | r | p | floor | eager | triton | fused | split | triton/floor | eager/triton | predicted/floor |"
    lines = [f"# LoRA layer fwd+bwd, {meta['device']}, M={meta['M']}, {meta['dtype']} (median ms)", "", head]
    lines.append("|" + "---|" * 11)
    for rw in rows:
        cells = " | ".join(f"{rw[name].get(rw['timing'], float('nan')):.4f}" for name in VARIANTS)
        pred = rw["predicted_ms"]["triton"] / rw["predicted_ms"]["floor"]
        lines.append(
            f"| {rw['K']}→{rw['N']} | {rw['r']} | {rw['p']} | {cells} | {rw['triton_over_floor']} "
            f"| {rw['eager_over_triton']} | {pred:.3f} |"
        )
    lines += ["", f"Times: {rows[0]['timing'] if rows else '-'} (gpu_ms: CUDA-graph replays; wall_ms: eager calls)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "device_out"), help="folder for the .json and .md")
    ap.add_argument("--M", type=int, help="tokens per call (default 8192 on CUDA, 64 on CPU)")
    ap.add_argument("--rows", choices=["headline", "full"], default="headline", help="headline rows, or all")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: plumbing only (interpreter)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    M = args.M or (8192 if args.device == "cuda" else 64)
    shapes = TINY if args.device == "cpu" else HEADLINE + (FULL if args.rows == "full" else [])
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "M": M,
        "dtype": "bf16" if args.device == "cuda" else "fp32",
        "timing": "median ms, forward+backward (dx, dA, dB): gpu_ms do_bench_cudagraph, wall_ms do_bench",
    }
    rows: list[dict] = []
    json_path = out / "kernel_timing.json"
    for K, N, r, p in shapes:
        rows.append(time_row(M, K, N, r, p, args.device))
        _write_json(json_path, meta, rows)
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(meta, rows)
    (out / "kernel_timing.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
