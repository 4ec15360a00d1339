"""lora-fast benchmarks: the LoRA layer against its floor, and one training step of a causal LM five ways.

    python bench/run.py --quick                      # < 5 min on a 2-core CPU, < 3 on an H100
    python bench/run.py                              # results in bench/out/ (--json, --md, --plot elsewhere)
    python bench/run.py --model-only --model runs/smollm2-135m   # the model table on SmolLM2 (a folder or .gguf)
    python bench/run.py --model-only --model runs/smollm2-135m --data path/to/rotten_tomatoes --prompt complex
                                                     # data mode: the study's real batches, padded and packed
    python bench/run.py --dtype fp32                 # fp32 even where bf16 is native (default auto: see --help)
    python bench/run.py --model-only --model X.gguf --keep-quantized --rows lora_fast floor   # packed vs float

Layer table (bench/layer_bench.py): floor (frozen base layer alone), PEFT-style eager LoRA (lora-fast's
``reference``), HF PEFT's ``lora.Linear``, lora-fast ``torch`` and ``triton`` (CUDA), phase by phase, with the
FLOP count and memory beside the times. Model table (bench/model_step.py): ``full_ft``, ``peft``, ``peft_patched``
(``peft`` plus ``lora_fast.patch_peft(model)``), ``peft_label_logits``, ``lora_fast`` and ``floor`` (the frozen
model's forward and backward to its input embeddings: the work no LoRA method can skip), each in a fresh process so
its peak memory is its own; GPT-2 small with random weights, or ``--model``. The last lines check the targets
(lora_fast vs PEFT as commonly used, and vs PEFT with label-position logits) and the next goal (lora_fast vs the
floor).

``--dtype`` (the rule of ``train_sentiment.py``, ``lora_fast.study.precision``): ``auto`` runs bf16 where the device
multiplies bf16 natively (a CPU with AMX tiles or avx512_bf16, a CUDA device of capability 8.0+) and fp32 elsewhere;
every model row runs under that one autocast (fp32 weights), and on CPU the layer table adds bf16 rows (bf16
tensors, as on CUDA). The JSON records the dtype, why, and the device's bf16 capability (the CPU's flags), also per
row. Two runs, ``--dtype fp32`` and ``--dtype bf16``, compare with ``python -m bench.compare``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench` and `lora_fast` importable from the checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import environment, fmt_ratio, markdown_table  # noqa: E402
from bench.layer_bench import layer_summary, layer_tables, run_layer_bench  # noqa: E402
from bench.model_step import DATA_ROWS, OPTIONAL_ROWS, PACKED_ROWS, ROWS  # noqa: E402
from bench.packed import check_packed_targets, packed_table  # noqa: E402
from lora_fast.io import atomic_write_text, folder_problem  # noqa: E402
from lora_fast.study.errors import UsageError  # noqa: E402
from lora_fast.study.precision import choose_precision  # noqa: E402
from lora_fast.study.report import save_figure  # noqa: E402

# (name, measured, reference row, limit): lora_fast's ratio must be at or below the limit. The last is the next goal:
# lora_fast's overhead over the work no LoRA method can skip.
TARGETS = [
    ("time vs peft", "s_per_step", "peft", 0.6),
    ("peak memory vs peft", "peak_mem_mb", "peft", 0.75),
    ("time vs peft_label_logits", "s_per_step", "peft_label_logits", 0.9),
    ("time vs floor", "s_per_step", "floor", 1.15),
]


# ---------------------------------------------------------------- model rows, one process each


def run_model_rows(
    device: str,
    rows: list[str],
    warmup: int,
    steps: int,
    rounds: int,
    batch: int | None,
    seq: int | None,
    model: str | None = None,
    data_flags: list[str] = (),
    dtype: str = "fp32",
) -> list[dict]:
    """Each row in its own process, ``rounds`` times with the order reversed every other round (so slow drift of a
    shared machine's load hits the rows alike); step times are pooled, peak memory is the highest seen. A row named
    ``<row>+packed`` runs ``<row>`` with ``--keep-quantized``; ``data_flags`` go to every process."""
    results: dict[str, list[dict]] = {r: [] for r in rows}
    for k in range(rounds):
        for name in rows if k % 2 == 0 else rows[::-1]:
            row = name.removesuffix("+packed")
            cmd = [
                sys.executable,
                "-m",
                "bench.model_step",
                "--row",
                row,
                "--device",
                device,
                "--warmup",
                str(warmup),
                "--steps",
                str(steps),
                "--dtype",
                dtype,
            ]
            if batch:
                cmd += ["--batch", str(batch)]
            if seq:
                cmd += ["--seq", str(seq)]
            if model:
                cmd += ["--model", model]
            cmd += [*data_flags, *(["--keep-quantized"] if name != row else [])]
            print(f"  model step: {name} (round {k + 1}/{rounds})", flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                raise RuntimeError(f"model step {row!r} failed with exit code {proc.returncode}")
            results[name].append(json.loads(line[len("RESULT ") :]))
    return [_pool(runs) for runs in results.values()]


def _pool(runs: list[dict]) -> dict:
    import statistics

    out = dict(runs[0])
    if len(runs) > 1:
        medians = [r["s_per_step"] for r in runs]
        out["s_per_step"] = statistics.median(medians)
        out["s_p25"], out["s_p75"] = min(r["s_p25"] for r in runs), max(r["s_p75"] for r in runs)
        out["round_medians"] = medians
        out["steps_timed"] = sum(r["steps_timed"] for r in runs)
        out["peak_mem_mb"] = max(r["peak_mem_mb"] for r in runs)
        out["load_avg_1min"] = max(r["load_avg_1min"] for r in runs)
    out["tokens_per_s"] = out["real_tokens_per_step"] / out["s_per_step"]
    return out


def add_model_ratios(rows: list[dict]) -> None:
    by = {r["name"]: r for r in rows}
    for r in rows:
        for ref in ("peft", "full_ft", "floor"):
            b = by.get(ref)
            r[f"time_vs_{ref}"] = r["s_per_step"] / b["s_per_step"] if b else None
            r[f"mem_vs_{ref}"] = r["peak_mem_mb"] / b["peak_mem_mb"] if b else None


def model_table(rows: list[dict], device: str) -> str:
    mem = "peak RSS MiB" if device == "cpu" else "peak allocated MiB"
    table = [
        [
            r["name"],
            f"{r['s_per_step']:.3f}",
            f"{r['s_p25']:.3f}–{r['s_p75']:.3f}",
            f"{r['tokens_per_s']:.0f}",
            fmt_ratio(r["token_rows_per_step"] / r["padded_token_rows_per_step"]),
            f"{r['peak_mem_mb']:.0f}",
            f"{r['trainable_params']:,}",
            fmt_ratio(r["time_vs_peft"]),
            fmt_ratio(r["mem_vs_peft"]),
            fmt_ratio(r["time_vs_full_ft"]),
            fmt_ratio(r["mem_vs_full_ft"]),
            fmt_ratio(r["time_vs_floor"]),
            f"{r['load_avg_1min']:.1f}",
        ]
        for r in rows
    ]
    return markdown_table(
        [
            "row",
            "s/step (median)",
            "p25–p75 s",
            "tokens/s",
            "token rows vs padded",
            mem,
            "trainable params",
            "time vs peft",
            "mem vs peft",
            "time vs full_ft",
            "mem vs full_ft",
            "time vs floor",
            "load avg",
        ],
        table,
    )


def _model_name(cfg: dict) -> str:
    return "GPT-2 small" if cfg.get("model") is None else pathlib.Path(cfg["model"]).name


def _model_text(row: dict) -> str:
    if row["config"].get("model") is None:
        return (
            "GPT-2 small (124M, random weights), config dropout 0.1, gelu_new (lora_fast and floor: the same formula "
            "as one fused tanh GELU)"
        )
    return f"`{row['config']['model']}` ({row['model_type']}, {row['total_params']:,} parameters), its config's dropout"


def check_targets(rows: list[dict]) -> list[dict]:
    by = {r["name"]: r for r in rows}
    verdicts = []
    for name, key, ref, limit in TARGETS:
        if "lora_fast" not in by or ref not in by:
            continue
        ratio = by["lora_fast"][key] / by[ref][key]
        verdicts.append(
            {"target": f"lora_fast {name} <= {limit}", "ratio": ratio, "limit": limit, "met": ratio <= limit}
        )
    return verdicts


def packing_line(rows: list[dict]) -> str | None:
    """``lora_fast_packed`` against ``lora_fast`` (the same step on padded batches): time, tokens/s, token rows."""
    by = {r["name"]: r for r in rows}
    if not {"lora_fast", "lora_fast_packed"} <= set(by):
        return None
    packed, padded = by["lora_fast_packed"], by["lora_fast"]
    return (
        f"- lora_fast_packed vs lora_fast: time per step {fmt_ratio(packed['s_per_step'] / padded['s_per_step'])}, "
        f"tokens/s {fmt_ratio(packed['tokens_per_s'] / padded['tokens_per_s'])}, token rows "
        f"{fmt_ratio(packed['token_rows_per_step'] / padded['token_rows_per_step'])} ({packed['notes'][-1]})"
    )


# ---------------------------------------------------------------- plots


def write_plots(out_dir: pathlib.Path, layer: list[dict], model: list[dict], device: str) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if model:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        names = [r["name"] for r in model]
        for ax, key, label in (
            (axes[0], "s_per_step", "s / step (median)"),
            (axes[1], "peak_mem_mb", "peak RSS MiB" if device == "cpu" else "peak alloc MiB"),
        ):
            ax.bar(
                names,
                [r[key] for r in model],
                color=["#999", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd", "#8c564b"][: len(names)],
            )
            ax.set_ylabel(label)
            ax.tick_params(axis="x", rotation=20)
            ax.grid(axis="y", alpha=0.3)
        cfg = model[0]["config"]
        fig.suptitle(f"{_model_name(cfg)} training step, batch {cfg['batch']}×{cfg['seq']}, {device}")
        written.append(out_dir / "model_step.png")
        save_figure(fig, written[-1])
    fb = [r for r in layer if r["phase"] == "fwd+bwd" and r["variant"] != "floor"]
    if fb:
        keys = sorted({(r["dtype"], r["K"], r["N"], r["R"], r["dropout"]) for r in fb})
        variants = [v for v in ("peft_eager", "hf_peft", "torch", "triton") if any(r["variant"] == v for r in fb)]
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 4))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            vals = [
                next(
                    (
                        r["vs_floor"]
                        for r in fb
                        if r["variant"] == v and (r["dtype"], r["K"], r["N"], r["R"], r["dropout"]) == k
                    ),
                    0,
                )
                for k in keys
            ]
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=v)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{k[1]}→{k[2]}\nR={k[3]} p={k[4]}\n{k[0]}" for k in keys], fontsize=7)
        ax.set_ylabel("forward+backward time / floor")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"LoRA layer vs the frozen base layer (floor = 1), M={fb[0]['M']}, {device}")
        written.append(out_dir / "layer_vs_floor.png")
        save_figure(fig, written[-1])
    return written


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda when present)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="few shapes (r=16, one dtype), short timing, 3 timed model steps per row (every row)",
    )
    ap.add_argument("--layer-only", action="store_true", help="only the layer table")
    ap.add_argument("--model-only", action="store_true", help="only the model-step table")
    ap.add_argument(
        "--rows",
        nargs="+",
        choices=ROWS + OPTIONAL_ROWS,
        help="model-step rows (default: all but lora_fast_packed; --data: its rows)",
    )
    ap.add_argument("--data", help="data mode: a Rotten Tomatoes folder; the study's real batches (model_step.py)")
    ap.add_argument("--tokenizer", help="data mode: the tokenizer folder (default: the model's)")
    ap.add_argument("--prompt", default="default", help="data mode: the study's instruction (default, complex, ...)")
    ap.add_argument("--shots", type=int, default=0, help="data mode: solved examples in every prompt")
    ap.add_argument("--packing", default="auto", choices=("auto", "prefix", "flat", "off"), help="lora_fast_packed's")
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout of the LoRA rows")
    ap.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="bf16: every model row under bf16 autocast, and bf16 layer rows; auto (default): bf16 where the device "
        "multiplies it natively (a CPU with AMX or avx512_bf16, CUDA 8.0+), fp32 elsewhere",
    )
    ap.add_argument(
        "--model", help="model of the model-step table: a folder, hub name or .gguf file (default: GPT-2 small, random)"
    )
    ap.add_argument("--steps", type=int, help="timed model steps per process (default 3 quick / 6 on CPU, 20 CUDA)")
    ap.add_argument("--warmup", type=int, help="untimed model steps first (default 1 on CPU, 3 on CUDA)")
    ap.add_argument("--rounds", type=int, help="processes per model row, alternating order (default 1 quick, 2)")
    ap.add_argument("--batch", type=int, help="model-step batch (default 8 on CPU, 16 on CUDA)")
    ap.add_argument("--seq", type=int, help="model-step sequence length (default 128 on CPU, 512 on CUDA)")
    ap.add_argument(
        "--keep-quantized",
        action="store_true",
        help=f"a GGUF --model: also run {', '.join(PACKED_ROWS)} on its quantised weights kept packed (rows +packed)",
    )
    out = pathlib.Path(__file__).resolve().parent / "out"  # ignored by git, like runs/
    ap.add_argument(
        "--json",
        type=pathlib.Path,
        default=out / "results.json",
        help="write every row, stamped with device/versions/date, here (default: bench/out/results.json)",
    )
    ap.add_argument(
        "--md",
        type=pathlib.Path,
        default=out / "results.md",
        help="also write the markdown tables to this file (default: bench/out/results.md)",
    )
    ap.add_argument(
        "--plot",
        type=pathlib.Path,
        default=out / "plots",
        help="write PNG bar charts into this folder (default: bench/out/plots)",
    )
    args = ap.parse_args(argv)
    if args.layer_only and args.model_only:
        ap.error("--layer-only and --model-only exclude each other")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    try:
        precision = choose_precision(args.dtype, torch.device(args.device), fp16=False)
    except UsageError as exc:
        ap.error(str(exc))
    for flag, folder in (("--json", args.json and args.json.parent), ("--md", args.md and args.md.parent),
                         ("--plot", args.plot)):  # fmt: skip
        problem = folder and folder_problem(folder)
        if problem:  # refused now, not after the benchmark has run
            ap.error(f"{flag}: {problem}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        ap.error("the plots (--plot) need matplotlib: pip install -e '.[study]'")
    cpu = args.device == "cpu"
    steps = args.steps or (3 if args.quick else (6 if cpu else 20))
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    rounds = args.rounds or (1 if args.quick else 2)
    rows = args.rows or (list(DATA_ROWS) if args.data else [r for r in ROWS if r != "lora_fast_packed"])
    if args.data and set(rows) - set(DATA_ROWS):
        ap.error(f"--data: rows {sorted(set(rows) - set(DATA_ROWS))} have no data mode; choose from {DATA_ROWS}")
    data_flags = ["--packing", args.packing, "--lora-dropout", str(args.lora_dropout)]
    if args.data:
        data_flags += ["--data", args.data, "--prompt", args.prompt, "--shots", str(args.shots)]
        data_flags += ["--tokenizer", args.tokenizer] if args.tokenizer else []

    env = environment(args.device)
    command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = (
        f"device: {env['device']}; torch {env['versions']['torch']}, triton {env['versions']['triton']}, "
        f"transformers {env['versions']['transformers']}, peft {env['versions']['peft']}; {env['date']}\n"
        f"command: `{command}`" + (f"; load average at start {load[0]:.1f}" if load else "") + "\n"
        f"precision: {precision.dtype} ({precision.reason})"
    )
    print(header, flush=True)
    md = [header]

    layer = [] if args.model_only else run_layer_bench(args.device, args.quick, dtype=precision.dtype)
    if layer:
        mem = "CUDA peak rise over inputs" if args.device == "cuda" else "bytes saved for backward beyond the inputs"
        md.append(
            "## LoRA layer\n\nForward+backward, median ms and ratio to the floor (the frozen base layer alone); "
            f"MiB = {mem}. FLOPs: floor 2·M·K·N per pass; LoRA adds 2·M·R·(K+N) forward and 4·M·R·(K+N) backward."
            "\n\n" + layer_summary(layer)
        )
        print("\n" + md[-1], flush=True)
        md.append("### Per phase (forward, backward, forward+backward)\n\n" + layer_tables(layer, args.device))
        print("\n" + md[-1], flush=True)

    model: list[dict] = []
    verdicts: list[dict] = []
    if not args.layer_only:
        rows += [f"{r}+packed" for r in rows if args.keep_quantized and r in PACKED_ROWS]
        model = run_model_rows(
            args.device, rows, warmup, steps, rounds, args.batch, args.seq, args.model, data_flags, precision.dtype
        )
        add_model_ratios(model)
        cfg = model[0]["config"]
        shape = f"batch {cfg['batch']} × {cfg['seq']} tokens"
        if cfg.get("data"):
            shots = f", {cfg['shots']}-shot" if cfg["shots"] else ""
            shape = f"batch {cfg['batch']}, Rotten Tomatoes training batches, prompt {cfg['prompt']}{shots}"
        md.append(
            f"## {_model_name(cfg)} training step ({shape})\n\n"
            f"Same model in every row: {_model_text(model[0])}, SDPA attention, "
            f"{'fp32' if precision.amp_dtype is None else 'bf16 autocast (fp32 weights)'}; "
            f"LoRA r={cfg['r']}, alpha={cfg['alpha']:g}, LoRA dropout {cfg['lora_dropout']} on "
            f"{' + '.join(model[0]['targets'])}; AdamW, grad-norm clip {cfg['grad_clip']}; floor: the frozen model "
            f"through lora_fast's forward, backward to its input embeddings only. {warmup} warm-up + {steps} timed "
            f"steps per process, {rounds} process(es) per row. Peak memory: "
            + (
                "process RSS high-water of the timed steps (VmHWM reset after building the row; ru_maxrss where "
                f"that is not possible: {sorted({r['peak_mem_kind'] for r in model})}), each row in a fresh process."
                if cpu
                else "torch.cuda.max_memory_allocated, each row in a fresh process."
            )
            + f" load avg: the machine's 1-minute load average as the row finished ({os.cpu_count()} cores here; "
            "above that, other work competed for them). Tokens/s counts real tokens; token rows: the rows the linear "
            "layers compute per step over those of the batch padded (lora_fast_packed: packed, --packing "
            f"{args.packing}; its note says the mode)." + "\n\n" + model_table(model, args.device)
        )
        print("\n" + md[-1], flush=True)
        packed = packing_line(model)
        if packed:
            md.append("## Packing (ratios from this run)\n\n" + packed)
            print("\n" + md[-1], flush=True)
        verdicts = check_targets(model) + check_packed_targets(model)
        if args.keep_quantized:
            md.append("## Packed (--keep-quantized) vs float weights\n\n" + packed_table(model))
            print("\n" + md[-1], flush=True)
        if verdicts:
            lines = [f"- target {v['target']}: {'MET' if v['met'] else 'MISSED'} ({v['ratio']:.2f})" for v in verdicts]
            md.append("## Targets (ratios from this run)\n\n" + "\n".join(lines))
            print("\n" + md[-1], flush=True)

    result = {
        "device": env["device"],
        "device_type": args.device,
        "versions": env["versions"],
        "date": env["date"],
        "command": command,
        "load_average_at_start": load,
        "quick": args.quick,
        "precision": precision.record(),
        "layer": layer,
        "model_step": model,
        "targets": verdicts,
    }
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json.resolve()}")
    if args.md:
        atomic_write_text(args.md, "\n\n".join(md) + "\n")
        print(f"wrote {args.md.resolve()}")
    if args.plot:
        for path in write_plots(args.plot, layer, model, args.device):
            print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
