"""Progress of the study's long phases, on a terminal and in a log alike.

On a terminal a phase is a tqdm bar. Elsewhere (output piped to ``tee`` or a file, a batch job) tqdm's bar would be
one line rewritten with carriage returns, or nothing at all, and a phase of minutes would look like a hang; there
:func:`progress` prints a line when it starts and then one every ``LORA_FAST_PROGRESS_EVERY`` seconds (default 30)
and at the end, each with what is done, the rate and the time left. :func:`phase` does the same for a step that has no
count (loading a model): one line when it starts, one with its time when it ends. Only the main process reports.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

__all__ = ["Progress", "phase", "progress"]


def _every() -> float:
    return float(os.environ.get("LORA_FAST_PROGRESS_EVERY", "30"))


def _clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """What a bar shows, as lines: ``desc: done/total unit (pct), elapsed, rate, left ~ETA [, postfix]``. Use it as
    tqdm: iterate over it, or call :meth:`update`; :meth:`set_postfix` adds the latest figures to the next line."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, unit: str, initial: int = 0):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.start_n, self.postfix = initial, initial, ""
        self.start = self.last = time.monotonic()
        self._line()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= _every() or (self.total is not None and self.n >= self.total):
            self.last = now
            self._line()

    def set_postfix(self, **figures) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in figures.items())

    def close(self) -> None:
        pass

    def _line(self) -> None:
        elapsed = time.monotonic() - self.start
        done = self.n - self.start_n
        units = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")
        parts = [f"{self.n}/{self.total} {units}" if self.total else f"{self.n} {units}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{_clock(elapsed)} elapsed")
        if done and elapsed > 0:
            parts.append(f"{done / elapsed:.3g} {self.unit}/s")
            if self.total:
                parts.append(f"~{_clock(elapsed / done * (self.total - self.n))} left")
        if self.postfix:
            parts.append(self.postfix)
        print(f"{self.desc}: {', '.join(parts)}", file=sys.stderr, flush=True)


class _Silent(Progress):
    """A non-main process: the same interface, no output."""

    def _line(self) -> None:
        pass


def progress(
    iterable: Iterable | None = None,
    desc: str = "",
    total: int | None = None,
    unit: str = "it",
    main: bool = True,
    initial: int = 0,
    leave: bool = True,
):
    """A tqdm bar on a terminal, :class:`Progress` lines elsewhere, nothing on a process other than the main one."""
    if not main:
        return _Silent(iterable, desc, total, unit, initial)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
    return Progress(iterable, desc, total, unit, initial)


@contextlib.contextmanager
def phase(desc: str, main: bool = True) -> Iterator[None]:
    """``desc ...`` when a step starts and ``desc: done in 12.3 s`` when it ends (main process only)."""
    start = time.monotonic()
    if main:
        print(f"{desc} ...", file=sys.stderr, flush=True)
    yield
    if main:
        print(f"{desc}: done in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
