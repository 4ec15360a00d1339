"""Two model-step results of ``bench/run.py`` side by side, fp32 against bf16: each row's step time and peak memory
in both and their ratio, and the bf16 targets.

    python bench/run.py --model-only --dtype fp32 --json bench/out/fp32.json --md bench/out/fp32.md
    python bench/run.py --model-only --dtype bf16 --json bench/out/bf16.json --md bench/out/bf16.md
    python -m bench.compare bench/out/fp32.json bench/out/bf16.json     # prints the markdown table

The two runs must be of one device, one model and one batch (refused otherwise, naming what differs); their start
times are printed beside the table, since a shared machine's load changes by the hour.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable from the checkout
    sys.path.insert(0, str(ROOT))

from bench.common import fmt_ratio, markdown_table  # noqa: E402

__all__ = ["TARGETS", "compare", "main"]

# (name, the bf16 row, its reference, the reference's run, limit): the ratio of step times must be at or below it.
TARGETS = [
    ("lora_fast bf16 step vs its fp32 step", "lora_fast", "lora_fast", "fp32", 0.4),
    ("lora_fast bf16 step vs peft's bf16 step", "lora_fast", "peft", "bf16", 0.5),
]
SAME = ("model", "batch", "seq", "r", "alpha", "lora_dropout", "device")


def _load(path: pathlib.Path, dtype: str) -> dict:
    result = json.loads(path.read_text())
    ran = result.get("precision", {}).get("dtype")
    if ran != dtype:
        raise SystemExit(f"error: {path} ran in {ran}, expected a --dtype {dtype} run of bench/run.py")
    if not result.get("model_step"):
        raise SystemExit(f"error: {path} has no model-step rows (it was a --layer-only run)")
    return result


def compare(fp32: dict, bf16: dict) -> str:
    """The markdown: the runs' device and start times, one line per row present in both, and the targets."""
    c32, c16 = fp32["model_step"][0]["config"], bf16["model_step"][0]["config"]
    differ = [k for k in SAME if c32.get(k) != c16.get(k)] + (["device"] if fp32["device"] != bf16["device"] else [])
    if differ:
        raise SystemExit(f"error: the two runs differ in {', '.join(sorted(set(differ)))}: not comparable")
    rows32 = {r["name"]: r for r in fp32["model_step"]}
    rows16 = {r["name"]: r for r in bf16["model_step"]}
    table = []
    for name in [n for n in rows32 if n in rows16]:
        a, b = rows32[name], rows16[name]
        ratio = fmt_ratio(b["s_per_step"] / a["s_per_step"])
        times, mems = [f"{r['s_per_step']:.3f}" for r in (a, b)], [f"{r['peak_mem_mb']:.0f}" for r in (a, b)]
        table.append([name, *times, ratio, *mems])
    gap = datetime.datetime.fromisoformat(bf16["date"]) - datetime.datetime.fromisoformat(fp32["date"])
    support = bf16["precision"]["bf16"]
    lines = [
        f"device: {bf16['device']}; {support['reason']} (torch ISA {support.get('isa')}, AMX tiles "
        f"{support.get('amx_tile')}, avx512_bf16 {support.get('avx512_bf16')})",
        f"fp32 run started {fp32['date']}, bf16 run {bf16['date']} ({gap.total_seconds() / 60:+.0f} min)",
        "",
        markdown_table(["row", "fp32 s/step", "bf16 s/step", "bf16 / fp32", "fp32 peak MiB", "bf16 peak MiB"], table),
        "",
    ]
    runs = {"fp32": rows32, "bf16": rows16}
    for name, row, ref, ref_run, limit in TARGETS:
        if row in rows16 and ref in runs[ref_run]:
            ratio = rows16[row]["s_per_step"] / runs[ref_run][ref]["s_per_step"]
            lines.append(f"- target {name} <= {limit}: {'MET' if ratio <= limit else 'MISSED'} ({ratio:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32", type=pathlib.Path, help="results.json of bench/run.py --dtype fp32")
    ap.add_argument("bf16", type=pathlib.Path, help="results.json of bench/run.py --dtype bf16")
    args = ap.parse_args(argv)
    text = compare(_load(args.fp32, "fp32"), _load(args.bf16, "bf16"))
    print(text)
    return text


if __name__ == "__main__":
    main()
