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


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    # Split on "\n" only: the texts hold U+0085, which str.splitlines() would treat as a line end.
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rows.append({"text": str(obj["text"]), "label": int(obj["label"])})
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: expected a JSON object with 'text' and 'label' ({e})") from None
    return rows


def _read_parquet(paths: list[Path]) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for path in paths:
        table = pq.read_table(path, columns=["text", "label"]).to_pydict()
        rows += [{"text": str(t), "label": int(y)} for t, y in zip(table["text"], table["label"], strict=False)]
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
        return {s: [{"text": str(r["text"]), "label": int(r["label"])} for r in ds[s]] for s in SPLITS}
    except Exception as e:  # offline, hub errors, missing splits: all mean "use a local copy"
        raise DataError(
            f"could not load {name!r} from the Hugging Face hub ({first_line(e, 200)}); pass --data-dir DIR "
            f"with train/validation/test .jsonl or .parquet files"
        ) from None


def load_splits(data_dir: str | os.PathLike | None = None, name: str = "rotten_tomatoes") -> dict[str, list[dict]]:
    """The local folder when ``data_dir`` is given, else the hub."""
    return load_local(data_dir) if data_dir else load_hub(name)


def subset(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """A shuffled copy of ``rows`` (``random.Random(seed)``), cut to ``n`` rows when ``n`` is given."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n] if n else rows
