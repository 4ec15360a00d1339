"""``train_sentiment.py``'s LoRA step on one process, under DDP and under FSDP2 on N processes: time per step and
resident memory per process, for the same global batch.

    python -m bench.parallel_step --model runs/smollm2-135m --nproc 2      # the three rows, a table, a JSON file

Each row is its own run (``torchrun --standalone --nproc_per_node N`` for ``ddp`` and ``fsdp``): the model loads (on
the CPU; under fsdp each process then keeps its shards), gets LoRA (r=16, alpha=32, dropout 0.05, the model type's
default targets; ``auto`` backend), ``LastTokenLM`` and AdamW, then runs ``--warmup`` untimed and ``--steps`` timed
optimizer steps of ``train_step``. A step is ``--global-batch`` sequences of ``--seq`` random tokens, each process
taking its share in ``--micro`` micro-batches (gradient accumulation; FSDP reduces once per step). Reported per
process: the median seconds per step (every process waits for the others in the step's collectives, so they agree),
the resident-set high-water over the timed steps (Linux ``VmHWM``, reset after set-up, as ``bench/model_step.py``
does: loading the model does not count), the resident set after set-up, the whole run's ``ru_maxrss`` (loading
included) and the weights each process holds. After set-up each process calls glibc's ``malloc_trim(0)``, so memory
freed by sharding goes back to the system and the high-water measures what the steps hold.

The ratios are each row's over the one-process row: time per step (FSDP's all-gathers and reduce-scatters over gloo
on a CPU are the overhead to state), and the largest process's memory.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("one", "ddp", "fsdp")


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _trim() -> None:
    """Give freed heap memory back to the system (glibc); elsewhere nothing."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_mib("VmHWM") is not None


def worker(args: argparse.Namespace) -> dict:
    """One process of a row: set up, time the steps, return this process's measurements."""
    from bench.model_step import StepConfig, build_model
    from lora_fast import apply_lora
    from lora_fast.study import distributed
    from lora_fast.study.causal_lm import LastTokenLM, use_fused_gelu
    from lora_fast.study.training import collate, make_optimizer, train_step

    parallel = "fsdp" if args.row == "fsdp" else "ddp"
    device = distributed.resolve_device(args.device)
    rank, world, device = distributed.setup(device)
    cfg = StepConfig(device=distributed.load_device(parallel, device).type, model=args.model, seed=0)
    model, targets, _ = build_model(cfg)
    use_fused_gelu(model)
    torch.manual_seed(0)
    apply_lora(model, targets, r=16, alpha=32.0, dropout=0.05, backend="auto")
    amp = torch.bfloat16 if device.type == "cuda" else None
    model = distributed.place(model, parallel, device, amp)
    module = distributed.wrap(LastTokenLM(model), device)
    optimizer = make_optimizer(model, lr=1e-4)
    held = distributed.memory_summary(model)
    if args.global_batch % (world * args.micro):
        raise SystemExit(f"--global-batch {args.global_batch} does not split into {world} x {args.micro} micro-batches")
    rows = args.global_batch // (world * args.micro)
    gen = torch.Generator().manual_seed(rank + 1)
    vocab = model.config.vocab_size
    batches = [collate(torch.randint(0, vocab, (rows, args.seq), generator=gen).tolist(), 0, "right", device)
               for _ in range(args.micro)]  # fmt: skip
    targets_ = [torch.randint(0, vocab, (rows,), generator=gen).to(device) for _ in range(args.micro)]
    _trim()
    rss_setup = _status_mib("VmRSS")
    steps_only = device.type == "cpu" and _reset_high_water()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(module, optimizer, batches, targets_, amp_dtype=amp, grad_clip=1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    else:
        peak, kind = (_status_mib("VmHWM"), "cpu_vmhwm_steps") if steps_only else (None, "none")
    mine = {
        "rank": rank,
        "s_per_step": statistics.median(times),
        "step_times": times,
        "peak_steps_mib": peak,
        "peak_kind": kind,
        "rss_after_setup_mib": rss_setup,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **held,
    }
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, mine)
    return {"row": args.row, "world": world, "model_type": model.config.model_type, "processes": everyone,
            "global_batch": args.global_batch, "seq": args.seq, "micro": args.micro,
            "load_avg_1min": os.getloadavg()[0]}  # fmt: skip


def run_row(row: str, args: argparse.Namespace) -> dict:
    """One row in fresh processes: ``python`` for ``one``, ``torchrun`` for ``ddp``/``fsdp``."""
    flags = ["--row", row, "--worker", "--global-batch", args.global_batch, "--seq", args.seq, "--micro", args.micro,
             "--warmup", args.warmup, "--steps", args.steps, "--device", args.device]  # fmt: skip
    flags += ["--model", args.model] if args.model else []
    launch = [sys.executable, "-m", "bench.parallel_step"]
    if row != "one":
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                  "-m", "bench.parallel_step"]  # fmt: skip
    proc = subprocess.run([*launch, *map(str, flags)], cwd=ROOT, capture_output=True, text=True)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise SystemExit(f"row {row} failed:\n{proc.stderr[-3000:]}")
    return results[0]


def table(results: list[dict]) -> str:
    from bench.common import markdown_table

    base = results[0]
    base_time = base["processes"][0]["s_per_step"]
    base_mem = max(p["peak_steps_mib"] or 0 for p in base["processes"])
    lines = []
    for r in results:
        procs = r["processes"]
        t = procs[0]["s_per_step"]
        mem = max(p["peak_steps_mib"] or 0 for p in procs)
        lines.append([
            f"{r['row']} ×{r['world']}", f"{t:.3f}", f"{t / base_time:.2f}×",
            " / ".join(f"{p['peak_steps_mib']:.0f}" for p in procs), f"{mem / base_mem:.2f}×" if base_mem else "–",
            " / ".join(f"{p['rss_after_setup_mib']:.0f}" for p in procs),
            " / ".join(f"{p['ru_maxrss_mib']:.0f}" for p in procs),
            " / ".join(f"{p['weights_mb_this_process']:.0f}" for p in procs),
        ])  # fmt: skip
    headers = ["row", "s/step (median)", "time vs one", "peak RSS of the steps, MiB (per process)", "largest vs one",
               "RSS after set-up, MiB", "ru_maxrss (with loading), MiB", "weights held, MiB"]  # fmt: skip
    return markdown_table(headers, lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model folder, hub name or .gguf file (default: GPT-2 small, random weights)")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the ddp and fsdp rows")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="which rows (one is the baseline)")
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, over all processes")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--micro", type=int, default=1, help="micro-batches per process per step")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", help="write the results here as JSON (and the table beside it as .md)")
    ap.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        from lora_fast.study.distributed import cleanup

        result = worker(args)  # the model and DDP are gone once it returns: only then the process group goes
        cleanup()
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    if "one" not in args.rows:
        ap.error("--rows must include one: the other rows are compared with it")
    from bench.common import environment
    from lora_fast.io import atomic_write_text

    results = [run_row(row, args) for row in ("one", *[r for r in ROWS[1:] if r in args.rows])]
    text = table(results)
    print(text)
    if args.out:
        env = environment(args.device)
        atomic_write_text(args.out, json.dumps({**env, "config": vars(args), "rows": results}, indent=1) + "\n")
        atomic_write_text(Path(args.out).with_suffix(".md"), f"{env['device']}, {env['date']}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
