"""Ctrl-C in a training run: stop cleanly and say how to go on.

While the training loop runs, :class:`StopRequest` turns the first Ctrl-C (SIGINT) into a request the loop reads after
the step in flight: the step finishes, a checkpoint is written, and the run stops with the command that continues it
(:func:`resume_command`). A second Ctrl-C raises ``KeyboardInterrupt`` at once (the step is dropped; the last
checkpoint stays). Outside the loop (loading, scoring) Ctrl-C raises as usual, and the script prints the same command.
A sweep's parent ignores Ctrl-C while a sub-run runs (:func:`sigint_ignored`): the sub-run, in the same terminal
process group, receives it and stops cleanly, and the parent then stops too.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

__all__ = ["INTERRUPTED_EXIT_CODE", "StopRequest", "resume_command", "sigint_ignored"]

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a process Ctrl-C stopped

# Flags that take no value, and those the continuing command sets itself.
_DROP_ALONE = {"--resume", "--no-resume", "--overwrite", "--no-overwrite"}
_DROP_WITH_VALUE = {"--out", "--stop-after-step"}


class StopRequest:
    """A SIGINT handler for the span of a ``with`` block (main thread only; elsewhere a no-op): ``requested`` turns
    true at the first Ctrl-C, and the second raises ``KeyboardInterrupt``."""

    def __init__(self, message: str = "Ctrl-C: finishing this step, then writing a checkpoint (Ctrl-C again stops"
                 " at once)"):  # fmt: skip
        self.requested, self.message, self._previous = False, message, None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{self.message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C in this process for the block (a child process started inside still receives it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def resume_command(script: str, argv: Sequence[str], out: str, resume_flag: bool = True, world: int = 1) -> str:
    """The command line that continues the run in ``out``: ``python script`` with the flags of ``argv`` except
    ``--out``, ``--overwrite``, ``--resume`` and ``--stop-after-step``, then ``--out out`` (and ``--resume`` when
    ``resume_flag``). Under ``torchrun`` (``world`` > 1) the launcher's own options are the user's to repeat."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _DROP_ALONE:
            continue
        if name in _DROP_WITH_VALUE:
            skip = "=" not in arg
            continue
        kept.append(arg)
    kept += ["--out", out] + (["--resume"] if resume_flag else [])
    launcher = "torchrun <the same torchrun options>" if world > 1 else "python"
    return f"{launcher} {shlex.join([script, *kept])}"
