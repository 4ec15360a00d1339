"""Sweeps of ``train_sentiment.py``: tables of sub-run configs, each sub-run in its own process.

``--sweep study`` repeats the study's three experiments (rank, alpha, prompt wording) beside the baselines (zero-shot,
few-shot k = 4) and the other methods (BitFit, bottleneck adapters), and ``--sweep methods`` compares zero-shot,
few-shot, BitFit, bottleneck adapters, LoRA at two ranks and full fine-tuning. ``--sweep study`` takes the study's
hyper-parameters (``--preset study``), or with ``--preset study-cpu`` the same sized for a ~135M model on a CPU.
Sub-run ``name`` is the sweep's config with that run's overrides, run as ``python train_sentiment.py <every field as
a flag> --out OUT/name --resume`` in a fresh process, so its peak memory (CUDA's max allocated, or the process's max
RSS on CPU) is its own and not the running maximum of one shared process. The parent loads no model and no data: on
Linux a child's max RSS starts at its parent's peak RSS when it was started, so a big parent would raise every
sub-run's.

Sweeps resume: a sub-run with a ``summary.json`` is skipped without starting a process, an interrupted one continues
from its checkpoint (``--resume``). At the end the parent reads every ``summary.json`` and writes the sweep's markdown
table (``sweep.md`` or ``methods.md``) and one ``val_loss.png`` with every sub-run's validation loss.

A sweep runs its sub-runs one after another, each in one process; it refuses to start under ``torchrun``. A sub-run
can use several GPUs when run alone under ``torchrun`` with the flags the sweep prints for it; the sweep then skips
it as finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lora_fast.io import atomic_write_text
from lora_fast.study.cli import config_argv, fields_argv
from lora_fast.study.distributed import launched_world_size
from lora_fast.study.errors import SweepError
from lora_fast.study.interrupt import INTERRUPTED_EXIT_CODE, resume_command, sigint_ignored
from lora_fast.study.report import plot_val_loss

__all__ = ["SWEEPS", "SweepError", "sweep_markdown", "run_sweep"]


# ---------------------------------------------------------------- the sweeps

# Each sweep: "runs" (name -> Config overrides), "tables" (title, checkpoint scored, [(run, study's accuracy or
# None)]), and the markdown file's name; the file ends with one table of every run (accuracies, cost, flags). The
# study's numbers are its generation metric; its prompt experiment only reported the range 0.44-0.88.
PROMPTS = ("simple1", "simple2", "similar", "complex")
# The training runs of the study sweep skip the zero-shot score (its own run, "zero-shot", has it). BitFit and the
# bottleneck adapters are not in the study: they train at 1e-3, within the range of their papers, since the study's
# 2.5e-4 barely moves a zero-initialised bias or adapter in a short run.
TRAIN = dict(zero_shot=False)
SWEEPS = {
    "study": {
        "runs": {
            "zero-shot": dict(eval_only=True, adapter=None),
            "few-shot-k4": dict(eval_only=True, adapter=None, shots=4),
            "lora-r16-a64": dict(TRAIN, r=16, alpha=64.0),
            "lora-r128-a512": dict(TRAIN, r=128, alpha=512.0),
            "lora-r196-a784": dict(TRAIN, r=196, alpha=784.0),
            "full": dict(TRAIN, method="full"),
            "lora-r16-a256": dict(TRAIN, r=16, alpha=256.0),
            "bitfit": dict(TRAIN, method="bitfit", lr=1e-3),
            "bottleneck": dict(TRAIN, method="bottleneck", lr=1e-3),
            **{f"prompt-{p}": dict(TRAIN, prompt=p) for p in PROMPTS},
        },
        "tables": [
            (
                "Rank (alpha = 4r), best-val checkpoint",
                "best",
                [("lora-r16-a64", 0.8424), ("lora-r128-a512", 0.8696), ("lora-r196-a784", 0.8574), ("full", 0.8405)],
            ),
            (
                "Alpha at r = 16, last checkpoint",
                "last",
                [("lora-r16-a64", 0.8574), ("lora-r16-a256", 0.8771), ("full", None)],
            ),
            (
                "Prompt wording (r = 128, alpha = 512), best-val checkpoint; study: 0.44-0.88 over its five prompts",
                "best",
                [("lora-r128-a512", None)] + [(f"prompt-{p}", None) for p in PROMPTS],
            ),
            (
                "Baselines and other methods, best-val checkpoint",
                "best",
                [("zero-shot", 0.105), ("few-shot-k4", None), ("bitfit", None), ("bottleneck", None)]
                + [("lora-r16-a64", 0.8424), ("lora-r128-a512", 0.8696), ("full", 0.8405)],
            ),
        ],
        "file": "sweep.md",
    },
    "methods": {
        "runs": {
            "zero-shot": dict(eval_only=True, adapter=None),
            "few-shot-k4": dict(eval_only=True, adapter=None, shots=4),
            "bitfit": dict(method="bitfit"),
            "bottleneck": dict(method="bottleneck"),
            "lora-r16": dict(method="lora", r=16, alpha=64.0),
            "lora-r128": dict(method="lora", r=128, alpha=512.0),
            "full": dict(method="full"),
        },
        "tables": [],
        "file": "methods.md",
    },
}


# ---------------------------------------------------------------- the markdown table


def _acc(summary: dict, which: str) -> dict:
    """Test scores of checkpoint ``which`` (an --eval-only run has one set, "eval", for every checkpoint)."""
    test = summary.get("test", {})
    return test.get(which) or test.get("eval") or {}


def _num(x, fmt=".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _flags(overrides: dict) -> str:
    """A sub-run's overrides as the flags that give them (beside the sweep's own)."""
    return shlex.join(fields_argv(overrides))


def sweep_markdown(name: str, summaries: dict[str, dict]) -> str:
    """The sweep's markdown: per study table, the study's accuracy beside ours in both metrics with ours - study;
    then one row per sub-run with accuracy, trainable parameters, peak memory, tokens/s, wall time and its flags."""
    spec = SWEEPS[name]
    lines = [f"# Sweep `{name}`", ""]
    first = next(iter(summaries.values()), {})
    if first:
        torch_version = first.get("versions", {}).get("torch", "?")
        lines += [f"Model `{first.get('model')}`, device {first.get('device')}, torch {torch_version}.", ""]
    for title, which, rows in spec["tables"]:
        lines += [
            f"## {title}",
            "",
            "| run | study (generation) | ours: generation | delta | ours: label logit | delta |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for run_name, ref in rows:
            acc = _acc(summaries[run_name], which)
            gen, logit = acc.get("gen_acc"), acc.get("label_acc")
            d_gen = None if ref is None or gen is None else gen - ref
            d_log = None if ref is None or logit is None else logit - ref
            lines.append(
                f"| {run_name} | {_num(ref)} | {_num(gen)} | {_num(d_gen, '+.4f')} | {_num(logit)} | "
                f"{_num(d_log, '+.4f')} |"
            )
        lines.append("")
    if spec["tables"]:
        lines += ["## Every run", ""]
    lines += [
        "| method | label-logit acc (best) | generation acc (best) | label-logit acc (last) | trainable "
        "params | trainable % | peak memory MB | tokens/s | wall s | flags |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run_name, s in summaries.items():
        best, last = _acc(s, "best"), _acc(s, "last")
        trainable = s["trainable_params"] if not s.get("test", {}).get("eval") else 0
        pct = s["trainable_pct"] if trainable else 0.0
        flags = _flags(spec["runs"].get(run_name, {}))
        lines.append(
            f"| {run_name} | {_num(best.get('label_acc'))} | {_num(best.get('gen_acc'))} | "
            f"{_num(last.get('label_acc'))} | {trainable:,} | {pct:.3f} | "
            f"{_num(s.get('peak_memory_mb'), '.0f')} | {_num(s.get('tokens_per_s'), '.0f')} | "
            f"{_num(s.get('wall_time_s'), '.1f')} | {f'`{flags}`' if flags else '-'} |"
        )
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- running it


def run_sweep(cfg, script: str | os.PathLike, argv: list[str] | None = None) -> int:
    """Run ``cfg.sweep``'s sub-runs under ``cfg.out`` (default ``runs/<timestamp>``), each as its own process of
    ``script`` (train_sentiment.py), then write the table and the combined plot. Returns the exit code: 0, also when
    a sub-run stopped early (``--stop-after-step``), or 130 when a Ctrl-C stopped one (the sweep's own ``argv`` then
    give the command that continues it); raises ``SweepError`` when one fails. Ctrl-C reaches the running sub-run,
    which stops cleanly after its step; this process ignores it meanwhile."""
    if launched_world_size() > 1:
        raise SweepError(
            "--sweep runs its sub-runs one after another in their own processes: start it with python, not torchrun "
            "(to use several GPUs, run each sub-run alone under torchrun with the flags the sweep prints)"
        )
    spec = SWEEPS[cfg.sweep]
    root = Path(cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    summaries = {}
    for name, overrides in spec["runs"].items():
        out = root / name
        summary_path = out / "summary.json"
        if summary_path.is_file():
            print(f"=== {cfg.sweep} sweep: {name}: finished already, skipped", flush=True)
        else:
            sub = dataclasses.replace(cfg, **{**overrides, "out": str(out), "sweep": None, "resume": True})
            cmd = [sys.executable, str(script), *config_argv(sub)]
            print(f"\n=== {cfg.sweep} sweep: {name} ({overrides})\n{shlex.join(cmd)}", flush=True)
            with sigint_ignored():
                code = subprocess.run(cmd).returncode
            if code == INTERRUPTED_EXIT_CODE:
                again = resume_command(sys.argv[0], argv or [], str(root.resolve()), resume_flag=False)
                print(f"=== {cfg.sweep} sweep interrupted in {name}; continue it with:\n  {again}", flush=True)
                return INTERRUPTED_EXIT_CODE
            if code != 0:
                raise SweepError(f"sub-run {name} failed (exit code {code}); re-running the sweep resumes it")
            if not summary_path.is_file():  # --stop-after-step: interrupted on purpose, resumable
                print(f"=== {cfg.sweep} sweep: {name} stopped before its end; re-run the sweep to resume", flush=True)
                return 0
        summaries[name] = json.loads(summary_path.read_text())
    atomic_write_text(root / spec["file"], sweep_markdown(cfg.sweep, summaries))
    plot_val_loss({n: root / n / "metrics.jsonl" for n in summaries}, root / "val_loss.png")
    print(f"\nwrote {(root / spec['file']).resolve()} and {(root / 'val_loss.png').resolve()}")
    return 0
