"""What a training run reports besides its weights: ``metrics.jsonl`` (one JSON record per optimizer step), the
software versions stamped into ``summary.json``, the loss plot, and the summary table printed at the end.

A record is ``{"step", "train_loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb"}`` plus ``"val_loss"`` on
evaluation steps. ``plot_val_loss`` draws one run (train and validation loss) or several (validation loss each, as a
sweep's combined plot) from those files. A record is appended as one write of one line; a run killed in that write
leaves its last line cut short, which ``read_metrics`` skips with a warning (and ``trim_metrics``, on ``--resume``,
drops from the file); any other line that is not a JSON object is refused, naming the file and the line.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from lora_fast import count_parameters
from lora_fast.io import atomic_write_bytes, atomic_write_json, atomic_write_text, folder_problem, recover_directory
from lora_fast.study.errors import StudyError, UsageError

__all__ = [
    "start_run_folder",
    "versions",
    "parameter_summary",
    "read_metrics",
    "append_metrics",
    "trim_metrics",
    "plot_val_loss",
    "plot_reward_vs_kl",
    "timed",
    "format_scores",
    "print_summary",
]


def check_out(out: Path, run_files: Sequence[str], reuse: bool, reuse_flags: str) -> None:
    """Refuse an ``--out`` where a run cannot be written, before anything loads: a file; a path under a file (its
    nearest existing ancestor is not a folder) or under a folder this process cannot write; a folder that holds a
    run (any of ``run_files``) unless ``reuse`` (``reuse_flags`` names the flags that allow it)."""
    problem = folder_problem(out)
    if problem:
        raise UsageError(f"--out {out}: {problem}; give a folder")
    held = [name for name in run_files if (out / name).exists()]
    if held and not reuse:
        raise UsageError(f"--out {out} holds a run already ({', '.join(held)}): pass {reuse_flags}, or another --out")


def start_run_folder(out: Path, config: dict, run_files: Sequence[str], overwrite: bool) -> None:
    """Write ``config`` as ``out/config.json``; with ``overwrite`` the old run's ``run_files`` go first (other files
    stay; a folder of them a killed save left aside is put back, then goes too, so no later load finds the old run's
    weights)."""
    for name in run_files if overwrite else ():
        recover_directory(out / name)
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    atomic_write_json(out / "config.json", config)


# The distributions whose versions a run and a benchmark record (requirements/tested.txt has every one).
VERSIONED = ("torch", "triton", "transformers", "tokenizers", "safetensors", "huggingface_hub", "datasets", "peft",
             "accelerate", "gguf", "kernels", "numpy", "lora-fast")  # fmt: skip


def versions() -> dict[str, str | None]:
    """Python's version, each of ``VERSIONED`` (None where not installed), and the GPU's name when there is one."""
    import importlib.metadata as md

    v: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            v[name] = None
    v["torch"] = torch.__version__  # the build too (2.13.0+cpu)
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name()
    return v


def parameter_summary(model: nn.Module) -> dict:
    """``{"trainable_params", "total_params", "trainable_pct"}`` as PEFT counts them (tied weights once)."""
    trainable, total = count_parameters(model)
    return {"trainable_params": trainable, "total_params": total, "trainable_pct": 100 * trainable / total}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``, in order; none when the file does not exist. A last line without its
    newline that is not a record (a run killed while appending it) is skipped with a warning; any other line that is
    not a JSON object is a StudyError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            record, problem = None, f"not JSON ({exc})"
        else:
            problem = f"a JSON {type(record).__name__}, not an object"
        if isinstance(record, dict):
            records.append(record)
        elif lineno == len(lines):  # no newline after it: the write of this line never finished
            warnings.warn(f"{path}:{lineno}: the last line is cut short (a killed write); skipped", stacklevel=2)
        else:
            raise StudyError(f"{path}:{lineno}: {problem}; the file is corrupt (remove that line to go on)")
    return records


def append_metrics(path: str | os.PathLike, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep the records up to ``step``: a resumed run drops what the interrupted one wrote after its checkpoint (a
    run that starts afresh, ``step`` 0, keeps none)."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported at the first plot (a run that never plots, or a
    sweep's parent before its end, does not pay for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """``fig`` as a PNG at ``path``, written atomically (a reader never sees half an image), then closed."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_val_loss(runs: dict[str, Path], path: str | os.PathLike) -> None:
    """Validation (and, for a single run, training) loss against step, one line per run, as a PNG. ``runs`` maps a
    legend label to a ``metrics.jsonl``; missing files are left out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, metrics in runs.items():
        rows = read_metrics(metrics)
        if not rows:
            continue
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if len(runs) == 1:
            ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], alpha=0.4, label="train")
        if val:
            ax.plot(*zip(*val, strict=False), marker="o", markersize=3, label=name or "validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (label token, nats)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_reward_vs_kl(summary: dict, path: str | os.PathLike) -> None:
    """``train_dpo.py``'s plot: mean P(positive) of sampled generations against the sampled KL to the reference, the
    base model at KL 0 and one point per beta (with the KL's standard error)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.errorbar([0.0], [summary["before"]["reward"]], fmt="ks", label="base model")
    runs = sorted(summary["runs"], key=lambda r: r["beta"])
    kl, reward = [r["after"]["kl"] for r in runs], [r["after"]["reward"] for r in runs]
    ax.errorbar(kl, reward, xerr=[r["after"]["kl_se"] for r in runs], fmt="o-", label="DPO + LoRA")
    for r, x, y in zip(runs, kl, reward, strict=True):
        ax.annotate(f"β={r['beta']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("sequence-level KL(π || π_ref), sampled (nats)")
    ax.set_ylabel("mean P(positive) of generations")
    ax.set_title("Controlled sentiment: reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def timed(fn: Callable, clock: dict[str, float], key: str) -> Callable:
    """``fn``, adding the seconds each call takes to ``clock[key]``."""

    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[key] += time.perf_counter() - t0

    return run


def format_scores(scores: dict) -> str:
    """``evaluate.score_split``'s result as one line: ``label-logit acc 0.5000, generation acc 0.1050 (3 answers
    neither label word)``."""
    text = f"label-logit acc {scores['label_acc']:.4f}"
    if "gen_acc" in scores:
        text += f", generation acc {scores['gen_acc']:.4f} ({scores['gen_invalid']} answers neither label word)"
    return text


def print_summary(summary: dict) -> None:
    """The test accuracies of each scored checkpoint in both metrics, then parameters, speed, memory and time."""
    rows = [(name, s) for name, s in summary.get("test", {}).items() if s]
    print(f"\n{'checkpoint':<12} {'label-logit acc':>16} {'generation acc':>15}")
    for name, s in rows:
        gen = f"{s['gen_acc']:.4f}" if "gen_acc" in s else "-"
        print(f"{name:<12} {s['label_acc']:>16.4f} {gen:>15}")
    extra = f"tokens/s {summary['tokens_per_s']:.0f}, " if summary.get("tokens_per_s") else ""
    print(
        f"trainable params {summary['trainable_params']:,} ({summary['trainable_pct']:.3f}%), {extra}"
        f"peak memory {summary['peak_memory_mb']:.0f} MB ({summary['peak_memory_kind']}), "
        f"wall {summary['wall_time_s']:.1f} s, device {summary['device']}"
    )
