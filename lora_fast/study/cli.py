"""A config dataclass as a command line: each field one flag with its help text, the way back from a config to the
flags that rebuild it (sweeps start every sub-run from those), the range checks of its numbers, and the scripts'
one-line errors. ``train_sentiment.py`` and ``train_dpo.py`` both build their parsers, check their numbers and report
their errors here.

A field may have a shorthand flag for one of its values: ``backend`` has ``--fused`` for ``--backend auto``. The
config holds the field only; the field's own flag, when given too, wins."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
import typing
from collections.abc import Callable

from lora_fast import AdapterError
from lora_fast.study.errors import StudyError, UsageError

__all__ = [
    "NONZERO",
    "opt",
    "dataclass_parser",
    "parse_flags",
    "config_argv",
    "fields_argv",
    "flag_differences",
    "flag_name",
    "check_numbers",
    "report_errors",
    "require_modules",
]

_SCALARS = {"int": int, "float": float, "str": str}


def opt(default, help: str, shorthand: tuple[str, object, str] | None = None, alias: str | None = None, **kw):
    """A config field with its --help text (and argparse extras such as ``choices`` or ``nargs``); ``shorthand`` is
    ``(name, value, help)``: a flag ``--name`` (and ``--no-name``) that stands for ``--field value``; ``alias`` is the
    field's former name, still taken as its flag (with a note naming the new one)."""
    if shorthand is not None:
        kw["shorthand"] = shorthand
    if alias is not None:
        kw["alias"] = alias
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _scalar_type(annotation) -> type:
    """The argparse ``type`` for a field annotated ``int``, ``float | None``, ``"str | None"`` and the like."""
    if isinstance(annotation, str):  # postponed annotations: the source text
        return _SCALARS.get(annotation.split("|")[0].strip(), str)
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return args[0] if args[0] in (int, float, str) else str


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...``, exit code 2) instead of the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def dataclass_parser(cls, description: str | None = None) -> argparse.ArgumentParser:
    """``--field-name`` for every field of ``cls``; booleans as ``--x/--no-x``. Defaults are suppressed, so the
    parsed namespace holds only the flags given (presets can then sit between the defaults and the flags)."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        flag = flag_name(f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = meta.pop("help")
        if "default" not in help_text:  # a help text that explains its default keeps its own words
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        shorthand = meta.pop("shorthand", None)
        alias = meta.pop("alias", None)
        kind = meta.pop("type", None) or _scalar_type(f.type)
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text, **meta)
        if alias is not None:  # the former name: hidden from --help, read into its own slot (parse_flags maps it)
            parser.add_argument(
                flag_name(alias), dest=f"alias.{f.name}", type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
        if shorthand is not None:
            name, _, short_help = shorthand
            parser.add_argument(
                f"--{name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=short_help
            )
    return parser


def parse_flags(parser: argparse.ArgumentParser, cls, argv: list[str] | None = None) -> dict:
    """The fields of ``cls`` given on the command line (``dataclass_parser``'s ``parser``), shorthands resolved."""
    given = vars(parser.parse_args(argv))
    for f in dataclasses.fields(cls):
        shorthand = f.metadata.get("shorthand")
        if shorthand is not None and given.pop(shorthand[0], False):
            given.setdefault(f.name, shorthand[1])
        if f"alias.{f.name}" in given:
            value = given.pop(f"alias.{f.name}")
            print(f"note: {flag_name(f.metadata['alias'])} is now {flag_name(f.name)}", file=sys.stderr, flush=True)
            given.setdefault(f.name, value)
    return given


def config_argv(cfg) -> list[str]:
    """Command-line flags that give back ``cfg`` field for field (``fields_argv`` of every field)."""
    return fields_argv({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def fields_argv(fields: dict) -> list[str]:
    """The flags that give ``fields`` (config field -> value): every value that is not None, booleans as ``--x`` /
    ``--no-x``, lists as separate words, scalars as ``--x value`` (``--x=value`` where the value starts with '-', so
    that it stays a value)."""
    argv = []
    for name, value in fields.items():
        flag = flag_name(name)
        if value is None:
            continue  # every field that can be None defaults to None
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif str(value).startswith("-"):
            argv.append(f"{flag}={value}")
        else:
            argv += [flag, str(value)]
    return argv


def flag_differences(run: dict, now: dict, may_change: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``"--flag <now> (the run has <run>)"`` for each field of two configs (``dataclasses.asdict``) that differs,
    fields in ``may_change`` and fields only one side has aside."""
    return [
        f"{flag_name(k)} {_words(now[k])} (the run has {_words(run[k])})"
        for k in sorted(set(run) & set(now) - set(may_change))
        if run[k] != now[k]
    ]


def flag_name(field: str) -> str:
    """The command-line flag of a config field: ``max_length`` -> ``--max-length``."""
    return "--" + field.replace("_", "-")


# Real flags that must not be 0, and why.
NONZERO = {"alpha": "the scaling alpha / r would be 0, so LoRA would train nothing"}


def check_numbers(
    cfg, least: dict[str, int], intervals: dict[str, tuple[float, bool, float]], nonzero: dict[str, str] | None = None
) -> None:
    """Refuse, with a UsageError naming the flag, what it must be and what it is, a field of ``cfg`` below its least
    value in ``least`` (integers), outside its interval in ``intervals`` (reals: ``(low, whether low itself is
    allowed, high (never allowed))``; NaN and inf never are), or 0 where ``nonzero`` names it (with the reason). A list
    field is checked element by element; a None (where a field allows one: "all", "off" or "not given") passes."""
    for name, why in (nonzero or {}).items():
        if getattr(cfg, name) == 0:
            raise UsageError(f"{flag_name(name)} 0: must be non-zero ({why})")
    for name, bound in least.items():
        value = getattr(cfg, name)
        if value is not None and any(v < bound for v in _elements(value)):
            raise UsageError(f"{flag_name(name)} {_words(value)}: {_each(value)}must be at least {bound}")
    for name, (low, closed, high) in intervals.items():
        value = getattr(cfg, name)
        ok = value is None or all(
            math.isfinite(v) and (low < v or (closed and v == low)) and v < high for v in _elements(value)
        )
        if not ok:
            where = f" in {'[('[not closed]}{low:g}, {high:g})" if low > -math.inf else ""
            raise UsageError(f"{flag_name(name)} {_words(value)}: {_each(value)}must be a finite number{where}")


def _elements(value) -> list:
    return value if isinstance(value, list) else [value]


def _each(value) -> str:
    return "each " if isinstance(value, list) else ""


def _words(value) -> str:
    """A flag's value as it would be typed: a list as its words."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def require_modules(plot: str | None = None, hub_dataset: str | None = None, gguf: bool = False) -> None:
    """Refuse a run that will need an optional package later before anything loads, in one UsageError listing every
    one missing: matplotlib for the ``plot`` it draws at its end, datasets to read ``hub_dataset`` from the hub, gguf
    to read a GGUF model."""
    study = "pip install -e '.[study]'"
    needed = {"matplotlib": f"{plot} at the end of the run: {study}"} if plot else {}
    if hub_dataset:
        needed["datasets"] = f"the hub's {hub_dataset} without --data-dir: {study}"
    if gguf:
        needed["gguf"] = "a GGUF model: pip install gguf"
    missing = [f"{module} ({why})" for module, why in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(f"this run needs what is not installed: {'; '.join(missing)}")


def report_errors(body: Callable[[], int]) -> int:
    """``body()``'s exit code, or, when it raises an error of ours, that error as one line on stderr (``error: ...``)
    and its exit code. Ours: the study's ``StudyError`` (flags, data, model loading, checkpoints, divergence) and the
    library's ``AdapterError`` (a refused adapter file). Any other exception is a bug and keeps its traceback."""
    try:
        return body()
    except (StudyError, AdapterError) as exc:
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr, flush=True)
        return getattr(exc, "exit_code", 1)
