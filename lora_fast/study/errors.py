"""The study's errors: each is printed by the scripts as one line (``error: ...``) with a non-zero exit code (2 for a
bad flag, as argparse does; 1 otherwise), no traceback."""

from __future__ import annotations

__all__ = [
    "StudyError",
    "UsageError",
    "DataError",
    "ModelLoadError",
    "SweepError",
    "CheckpointError",
    "NonFiniteError",
    "first_line",
]


class StudyError(Exception):
    """An error the scripts report as one line."""

    exit_code = 1


class UsageError(StudyError):
    """A bad flag or combination of flags; the message names the flag."""

    exit_code = 2


class DataError(StudyError):
    """The data could not be found or read; the message says what to pass instead."""


class ModelLoadError(StudyError):
    """``--model`` (or another model flag) names nothing loadable; the message says what was tried."""


class SweepError(StudyError):
    """A sweep that cannot start, or a sub-run that failed."""


class CheckpointError(StudyError):
    """A resume checkpoint that cannot be read, does not fit the run, or holds more than tensors and plain types."""


class NonFiniteError(StudyError, FloatingPointError):
    """A loss, gradient norm, validation loss or weight was NaN or inf: raised before the optimizer step or the write
    that would have applied or kept it, so the weights and files are the last good ones."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), or its class name when it has none: what a
    one-line error quotes from a library's multi-line exception."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
