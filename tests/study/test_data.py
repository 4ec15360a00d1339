"""Loading rotten_tomatoes from the local copy (jsonl; data tier), any labelled splits from parquet, and the errors
without either."""

import json

import pytest

from lora_fast.study.data import DataError, load_hub, load_local, load_splits, subset
from tests.helpers import run_script


def test_local_jsonl_splits_match_the_readme(real_data_dir):
    splits = load_splits(real_data_dir)
    assert {k: len(v) for k, v in splits.items()} == {"train": 8530, "validation": 1066, "test": 1066}
    for rows in splits.values():
        n = len(rows) // 2
        assert [r["label"] for r in rows] == [1] * n + [0] * n  # HF's order: positives first
    # A text holding U+0085 stays one row (splitting on it would break rows and the counts above).
    assert any("\x85" in r["text"] for r in splits["train"])


def test_parquet_folder_gives_the_same_rows(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = load_local(corpus.data_dir)
    (tmp_path / "data").mkdir()
    for split, data in rows.items():
        table = pa.table({"text": [r["text"] for r in data], "label": [r["label"] for r in data]})
        if split == "train":  # the hub's sharded layout
            half = len(data) // 2
            pq.write_table(table.slice(0, half), tmp_path / "data" / "train-00000-of-00002.parquet")
            pq.write_table(table.slice(half), tmp_path / "data" / "train-00001-of-00002.parquet")
        else:
            pq.write_table(table, tmp_path / f"{split}.parquet")
    assert load_local(tmp_path) == rows


def test_subset_is_seeded_and_sized():
    rows = [{"text": str(i), "label": i % 2} for i in range(100)]
    a, b, c = subset(rows, 10, 42), subset(rows, 10, 42), subset(rows, 10, 43)
    assert a == b and a != c and len(a) == 10 and len({r["text"] for r in a}) == 10
    assert sorted(subset(rows, None, 0), key=lambda r: int(r["text"])) == rows


def test_missing_local_split_is_named(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "a", "label": 1}) + "\n")
    with pytest.raises(DataError, match="no validation.jsonl"):
        load_local(tmp_path)


def test_hub_unreachable_names_the_data_dir_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="--data-dir"):
        load_hub("rotten_tomatoes_not_cached_here")


@pytest.mark.parametrize("data_args", [["--data-dir", "/nonexistent/rt"], []], ids=["bad-dir", "no-hub-no-dir"])
def test_cli_without_data_exits_with_a_clear_message(tmp_path, data_args):
    proc = run_script(
        [
            "--model",
            "/nonexistent/model",
            "--out",
            str(tmp_path / "run"),
            *data_args,
            "--dataset",
            "rotten_tomatoes_not_cached_here",
        ]
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "--data-dir" in proc.stderr
