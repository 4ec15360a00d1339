"""Shared pieces of the benchmarks: the timer, the environment stamp, markdown tables.

Timing (STYLE.md, "Benchmarks"): warm-up, then many repetitions and the median with its spread.
- CPU: ``torch.utils.benchmark.Timer.blocked_autorange``; each block's mean per-run time is one sample, and the
  spread is the interquartile range (p25–p75) of those samples.
- CUDA: ``triton.testing.do_bench`` (every call's time): median and p20–p80.
Callers that compare variants interleave them in rounds and pool the samples, so a shared machine's load drifting
during the run hits every variant alike. Times are in milliseconds.
"""

from __future__ import annotations

import datetime
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Timing", "sample_times", "summarize", "time_fn", "environment", "markdown_table", "fmt_ms", "fmt_ratio"]


@dataclass
class Timing:
    """Median and spread of one measured callable, in milliseconds."""

    median_ms: float
    lo_ms: float  # p25 on CPU, p20 on CUDA
    hi_ms: float  # p75 on CPU, p80 on CUDA
    samples: int


def sample_times(fn: Callable[[], object], device: str, min_run_time: float = 0.5, warmup: int = 1) -> list[float]:
    """Per-call times of ``fn`` in ms, after ``warmup`` calls, over at least ``min_run_time`` seconds of repetitions.

    On CPU each sample is one block of ``torch.utils.benchmark``'s ``blocked_autorange`` (mean per call within the
    block); on CUDA each sample is one call timed with events by ``triton.testing.do_bench`` (L2 flushed between).
    """
    for _ in range(warmup):
        fn()
    if device == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=5, rep=max(20.0, 1e3 * min_run_time), return_mode="all"))
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return [1e3 * t for t in m.times]


def summarize(samples: Sequence[float], device: str) -> Timing:
    """Median with p25–p75 (CPU) or p20–p80 (CUDA, as ``do_bench``'s usual quantiles)."""
    q = torch.tensor(sorted(samples), dtype=torch.float64)
    lo, hi = (0.2, 0.8) if device == "cuda" else (0.25, 0.75)
    return Timing(torch.quantile(q, 0.5).item(), torch.quantile(q, lo).item(), torch.quantile(q, hi).item(), len(q))


def time_fn(fn: Callable[[], object], device: str, min_run_time: float = 0.5, warmup: int = 1) -> Timing:
    """:func:`sample_times` summarized by :func:`summarize`."""
    return summarize(sample_times(fn, device, min_run_time, warmup), device)


def environment(device: str) -> dict:
    """Device name and library versions, stamped into every result file."""
    from lora_fast.study.report import versions as library_versions

    versions = library_versions()
    versions["git_commit"] = _git_commit()
    if device == "cuda":
        name = torch.cuda.get_device_name()
        versions["cuda"] = torch.version.cuda
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        try:
            with open("/proc/cpuinfo") as f:
                model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
            if model:
                name = f"{model}, {torch.get_num_threads()} threads"
        except OSError:
            pass
    return {
        "device": name,
        "device_type": device,
        "versions": versions,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _git_commit() -> str | None:
    """The checkout's commit (``+dirty`` when lora_fast/ or kernels/ differ from it), so results name the code."""
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        diff = subprocess.run(
            ["git", "status", "--porcelain", "--", "lora_fast", "kernels"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if diff.stdout.strip() else "")


def fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers are expected preformatted as strings."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
