"""Every data row is checked when it is read: an int label in the label set and a str text, in UTF-8. Anything else is
one line naming the file and the line, before a model loads, in both scripts."""

import json

import pytest

from lora_fast.study.data import DataError, load_local
from tests.helpers import error_lines, run_script

GOOD = {"text": "a fine film", "label": 1}


def _folder(tmp_path, bad_line: bytes, split: str = "validation"):
    """A data folder whose ``split`` has ``bad_line`` as its third line."""
    for name in ("train", "validation", "test"):
        lines = [json.dumps(GOOD).encode(), json.dumps({"text": "dull", "label": 0}).encode()]
        if name == split:
            lines.append(bad_line)
        (tmp_path / f"{name}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return tmp_path


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "x", "label": -1}, "'label' must be 0 (negative) or 1 (positive), got int -1"),
        ({"text": "x", "label": 2}, "got int 2"),
        ({"text": "x", "label": 0.7}, "got float 0.7"),
        ({"text": "x", "label": 1.0}, "got float 1.0"),
        ({"text": "x", "label": True}, "got bool True"),
        ({"text": "x", "label": "1"}, "got str '1'"),
        ({"text": None, "label": 1}, "'text' must be a string, got NoneType"),
        ({"text": 5, "label": 1}, "'text' must be a string, got int"),
        ({"label": 1}, "expected a JSON object with 'text' and 'label'"),
        ([1, 2], "expected a JSON object with 'text' and 'label'"),
    ],
)
def test_a_bad_row_names_its_file_and_line(tmp_path, row, message):
    folder = _folder(tmp_path, json.dumps(row).encode())
    with pytest.raises(DataError) as err:
        load_local(folder)
    assert str(err.value).startswith(f"{folder / 'validation.jsonl'}:3: ") and message in str(err.value)


def test_a_byte_that_is_not_utf8_names_its_file_line_and_column(tmp_path):
    folder = _folder(tmp_path, b'{"text": "caf\xe9", "label": 1}', split="test")
    with pytest.raises(DataError, match=r"test\.jsonl:3: not UTF-8 text \(byte 0xe9 at column 14\)"):
        load_local(folder)


def test_parquet_rows_are_checked_too(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet needs pyarrow (the study extra installs it)")
    import pyarrow.parquet as pq

    for name in ("train", "validation", "test"):
        labels = [1, 0, -1] if name == "train" else [1, 0, 1]
        pq.write_table(pa.table({"text": ["a", "b", "c"], "label": labels}), tmp_path / f"{name}.parquet")
    with pytest.raises(DataError, match=r"train\.parquet: row 2: 'label' must be 0 \(negative\) or 1"):
        load_local(tmp_path)


@pytest.mark.parametrize("script", ["train_sentiment.py", "train_dpo.py"])
def test_the_scripts_stop_on_a_bad_row_before_any_model_loads(tmp_path, script):
    (tmp_path / "data").mkdir()
    folder = _folder(tmp_path / "data", b'{"text": "x", "label": -1}', split="train")
    scorer = tmp_path / "scorer"
    scorer.mkdir()
    (scorer / "adapter_config.json").write_text("{}")
    # A model folder that cannot load: the data error must come first.
    (tmp_path / "model").mkdir()
    args = ["--model", tmp_path / "model", "--data-dir", folder, "--out", tmp_path / "run"]
    proc = run_script(args + (["--scorer", scorer] if script == "train_dpo.py" else []), script=script, timeout=120)
    (line,) = error_lines(proc.stderr)
    assert line.startswith(f"error: {folder / 'train.jsonl'}:3: 'label' must be 0 (negative) or 1 (positive)"), line
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
