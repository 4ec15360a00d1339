"""The study's errors: each is printed by the scripts as one line (``error: ...``), exit code 1, no traceback."""

from __future__ import annotations

__all__ = ["StudyError", "UsageError", "DataError", "ModelLoadError", "SweepError", "NonFiniteLossError", "first_line"]


class StudyError(Exception):
    """An error the scripts report as one line."""


class UsageError(StudyError):
    """A bad flag or combination of flags; the message names the flag."""


class DataError(StudyError):
    """The data could not be found or read; the message says what to pass instead."""


class ModelLoadError(StudyError):
    """``--model`` (or another model flag) names nothing loadable; the message says what was tried."""


class SweepError(StudyError):
    """A sweep that cannot start, or a sub-run that failed."""


class NonFiniteLossError(StudyError, FloatingPointError):
    """The loss was NaN or inf; raised before the optimizer step, so the weights are the last good ones."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), or its class name when it has none: what a
    one-line error quotes from a library's multi-line exception."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
