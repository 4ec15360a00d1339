"""The rotten_tomatoes sentiment data: from the Hugging Face hub by name, or from a local folder.

A local folder holds one file per split, ``train``/``validation``/``test``, as JSON lines (``{"text", "label"}`` per
line) or parquet (``<split>.parquet``, or the hub's ``data/<split>-*.parquet``). The JSON-lines reader is ours: on
the real splits it takes 30-110 ms where ``datasets.load_dataset("json")`` takes 370 ms and writes a cache. Labels:
1 = positive, 0 = negative, HF's ids. Every split comes back as a list of ``{"text": str, "label": int}`` in file
order; in rotten_tomatoes all positive rows come first, so shuffle to train.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from lora_fast.study.errors import DataError, first_line

__all__ = ["DataError", "SPLITS", "load_splits", "load_local", "load_hub", "subset"]

SPLITS = ("train", "validation", "test")


LABELS = (0, 1)  # negative, positive: the index into prompts.LABEL_WORDS


def _row(text, label, where: str) -> dict:
    """``{"text", "label"}`` after checking them: a str text and an int label in ``LABELS`` (a bool, a float such
    as 0.7 or 1.0, a -1 or a 2 is refused: each would otherwise train as some label); a DataError names ``where``."""
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__} {str(text)[:40]!r}")
    if type(label) is not int or label not in LABELS:
        raise DataError(f"{where}: 'label' must be 0 (negative) or 1 (positive), got {type(label).__name__} {label!r}")
    return {"text": text, "label": label}


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file, each checked (``_row``); a line that is not UTF-8 or not an object with
    'text' and 'label' is a DataError naming the file and the line."""
    rows = []
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    # Split on "\n" only: the texts hold U+0085, which str.splitlines() would treat as a line end.
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not a JSON object ({e})") from None
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            raise DataError(f"{where}: expected a JSON object with 'text' and 'label'")
        rows.append(_row(obj["text"], obj["label"], where))
    return rows


def _read_parquet(paths: list[Path]) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for path in paths:
        try:
            table = pq.read_table(path, columns=["text", "label"]).to_pydict()
        except Exception as e:  # pyarrow's errors: a missing column, a corrupt or unreadable file
            raise DataError(
                f"{path}: not a parquet file with 'text' and 'label' columns ({first_line(e, 200)})"
            ) from None
        pairs = zip(table["text"], table["label"], strict=True)
        rows += [_row(t, y, f"{path}: row {i}") for i, (t, y) in enumerate(pairs)]
    return rows


def _split_files(directory: Path, split: str) -> tuple[str, list[Path]] | None:
    if (directory / f"{split}.jsonl").is_file():
        return "jsonl", [directory / f"{split}.jsonl"]
    if (directory / f"{split}.parquet").is_file():
        return "parquet", [directory / f"{split}.parquet"]
    shards = sorted((directory / "data").glob(f"{split}-*.parquet"))
    return ("parquet", shards) if shards else None


def load_local(directory: str | os.PathLike) -> dict[str, list[dict]]:
    """Every split from ``directory`` (JSON lines or parquet, see the module docstring)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--data-dir {directory}: no such folder")
    splits = {}
    for split in SPLITS:
        found = _split_files(directory, split)
        if found is None:
            raise DataError(f"--data-dir {directory}: no {split}.jsonl, {split}.parquet or data/{split}-*.parquet")
        kind, paths = found
        splits[split] = _read_jsonl(paths[0]) if kind == "jsonl" else _read_parquet(paths)
        if not splits[split]:
            raise DataError(f"--data-dir {directory}: the {split} split is empty")
    return splits


def load_hub(name: str = "rotten_tomatoes") -> dict[str, list[dict]]:
    """Every split of the hub dataset ``name`` via ``datasets``; a failure (offline, unknown name) is a DataError."""
    try:
        import datasets

        ds = datasets.load_dataset(name)
        rows = {s: list(ds[s]) for s in SPLITS}
    except Exception as e:  # offline, hub errors, missing splits: all mean "use a local copy"
        raise DataError(
            f"could not load {name!r} from the Hugging Face hub ({first_line(e, 200)}); pass --data-dir DIR "
            f"with train/validation/test .jsonl or .parquet files"
        ) from None
    return {
        s: [_row(r.get("text"), r.get("label"), f"{name} {s}: row {i}") for i, r in enumerate(rs)]
        for s, rs in rows.items()
    }


def load_splits(data_dir: str | os.PathLike | None = None, name: str = "rotten_tomatoes") -> dict[str, list[dict]]:
    """The local folder when ``data_dir`` is given, else the hub."""
    return load_local(data_dir) if data_dir else load_hub(name)


def subset(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """A shuffled copy of ``rows`` (``random.Random(seed)``), cut to ``n`` rows when ``n`` is given."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n] if n else rows
