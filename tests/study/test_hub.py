"""The hub, checked once before anything loads: every flag that needs an unreachable hub is named in one error."""

import socket

import pytest

from lora_fast.study.errors import UsageError
from lora_fast.study.hub import check_hub_inputs, hub_reachable, looks_local
from tests.helpers import error_lines, run_script


def test_without_the_hub_both_flags_are_named_in_one_error_before_anything_loads(tmp_path):
    proc = run_script(["--out", tmp_path / "run"], timeout=120)  # defaults: --model gpt2, the hub's dataset
    assert proc.returncode != 0
    (line,) = error_lines(proc.stderr)
    assert "hub is unreachable (HF_HUB_OFFLINE=1)" in line and "--model" in line and "--data-dir" in line
    assert "'Offline use'" in line and "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_train_dpo_names_its_hub_inputs_too(tmp_path):
    scorer = tmp_path / "scorer"
    scorer.mkdir()
    (scorer / "adapter_config.json").write_text("{}")
    proc = run_script(["--scorer", scorer, "--out", tmp_path / "dpo"], script="train_dpo.py", timeout=120)
    (line,) = error_lines(proc.stderr)
    assert "hub is unreachable" in line and "--model (now the hub name 'gpt2'" in line and "--data-dir" in line


@pytest.mark.parametrize(
    "name, local",
    [
        ("gpt2", False),
        ("org/model", False),
        ("./model", True),
        ("/abs/model", True),
        ("a/b/c", True),
        ("x.gguf", True),
        ("~/model", True),
        ("runs/typo", True),
    ],  # fmt: skip
)
def test_which_names_are_paths(name, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # "runs/typo": its first part is a local folder, so a mistyped path, not a repository
    assert looks_local(name) is local


def test_an_unreachable_endpoint_is_found_quickly_and_a_listening_one_is_reachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_reachable(timeout=2) == (True, "")
    # closed now: nothing listens on the port
    ok, why = hub_reachable(timeout=2)
    assert not ok and f"127.0.0.1:{port}" in why


def test_local_inputs_need_no_hub(tmp_path):
    (tmp_path / "model").mkdir()
    check_hub_inputs([("--model", str(tmp_path / "model"), "model"), ("--tokenizer", None, "tokenizer")])
    with pytest.raises(UsageError, match="--tokenizer \\(now the hub name 'no-such-tokenizer'"):
        check_hub_inputs([("--model", str(tmp_path / "model"), "model"), ("--tokenizer", "no-such-tokenizer",
                                                                          "tokenizer")])  # fmt: skip
