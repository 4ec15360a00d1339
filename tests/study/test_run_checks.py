"""What a run refuses before it spends time, and what it keeps: flags that would train nothing, an --out no folder can
be made at, a package the end of the run needs, a model folder without its tokenizer, a resume that would mix two
configurations, a checkpoint the disk cannot take."""

import importlib.util
import json
import shutil

import pytest
import torch

import train_dpo
import train_sentiment
from lora_fast.study.causal_lm import load_causal_lm
from lora_fast.study.checkpoint import save_checkpoint
from lora_fast.study.errors import CheckpointError, ModelLoadError
from tests.helpers import error_lines, run_script


def _short(tiny, data_dir, out, *more):
    flags = ["--model", tiny, "--data-dir", data_dir, "--max-steps", 4, "--eval-every", 2, "--max-val", 8, "--max-test",
             8, "--no-generation", "--no-zero-shot", "--out", out, *more]  # fmt: skip
    return list(map(str, flags))


def test_alpha_zero_is_refused_by_both_scripts(tmp_path, capsys):
    local = ["--model", str(tmp_path), "--data-dir", str(tmp_path)]
    assert train_sentiment.main(["--alpha", "0", *local, "--out", str(tmp_path / "a")]) == 2
    assert "--alpha 0: must be non-zero (the scaling alpha / r would be 0" in capsys.readouterr().err
    assert train_dpo.main(["--alpha", "0", "--scorer", str(tmp_path), *local, "--out", str(tmp_path / "b")]) == 2
    assert "--alpha 0: must be non-zero" in capsys.readouterr().err
    cfg = train_sentiment.parse_config(["--alpha", "0", "--method", "full", *local])
    assert train_sentiment.check_config(cfg, 1, torch.device("cpu")) is None  # alpha means nothing to full FT


@pytest.mark.parametrize("script", ["train_sentiment.py", "train_dpo.py"])
def test_an_out_under_a_file_is_refused_before_anything_loads(tmp_path, script):
    (tmp_path / "file").write_text("x")
    scorer = tmp_path / "scorer"
    scorer.mkdir()
    (scorer / "adapter_config.json").write_text("{}")
    args = ["--model", tmp_path, "--data-dir", tmp_path, "--scorer", scorer] if script == "train_dpo.py" else [
        "--model", tmp_path, "--data-dir", tmp_path]  # fmt: skip
    proc = run_script([*args, "--out", tmp_path / "file" / "run"], script=script, timeout=120)
    (line,) = error_lines(proc.stderr)
    assert line == f"error: --out {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, so no folder can be " \
        "made under it; give a folder"  # fmt: skip


def test_the_gguf_conversion_refuses_an_out_under_a_file_before_reading(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_script([tmp_path / "file" / "model", "--gguf", tmp_path / "none.gguf"], script="lora_fast/study/gguf.py")
    assert proc.returncode == 1 and "none.gguf: no such file" in proc.stderr
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # not read: the output folder is refused first
    proc = run_script([tmp_path / "file" / "model", "--gguf", tmp_path / "m.gguf"], script="lora_fast/study/gguf.py")
    assert proc.stderr.strip().endswith(f"{tmp_path / 'file'} is a file, so no folder can be made under it: choose "
                                        "another output folder")  # fmt: skip


def test_a_missing_package_the_run_needs_at_its_end_is_named_before_it_starts(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    local = ["--model", str(tmp_path), "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]
    assert train_sentiment.main(local) == 2
    assert "this run needs what is not installed: matplotlib (val_loss.png at the end of the run" in (
        capsys.readouterr().err
    )
    scorer = tmp_path / "scorer"
    scorer.mkdir()
    (scorer / "adapter_config.json").write_text("{}")
    assert train_dpo.main([*local[:-1], str(tmp_path / "dpo"), "--scorer", str(scorer)]) == 2
    assert "matplotlib (reward_vs_kl.png" in capsys.readouterr().err


def test_a_model_folder_without_tokenizer_files_says_so(tiny_gpt2, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_gpt2.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, bare / f.name)
    with pytest.raises(ModelLoadError, match=f"--model {bare} has no tokenizer files .*: pass --tokenizer DIR"):
        load_causal_lm(str(bare))
    model, tokenizer = load_causal_lm(str(bare), tokenizer_path=str(tiny_gpt2))
    assert tokenizer.pad_token_id is not None


def test_a_resume_with_other_training_flags_is_refused_naming_each(tiny_gpt2, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_sentiment.main(_short(tiny_gpt2, data_dir, out, "--stop-after-step", 2)) == 0
    config = (out / "config.json").read_bytes()
    capsys.readouterr()
    assert train_sentiment.main(_short(tiny_gpt2, data_dir, out, "--resume", "--lr", "0.001", "--r", "8")) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "--lr 0.001 (the run has 0.00025); --r 8 (the run has 16)" in line and "--max-steps" in line
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2  # nothing was trained or written
    # Flags a resume may change (--max-steps): it goes on, and config.json stays the run's.
    assert train_sentiment.main(_short(tiny_gpt2, data_dir, out, "--resume", "--max-steps", 6)) == 0
    assert (out / "config.json").read_bytes() == config
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_the_checkpoint_keeps_the_run_config_and_refuses_another(tiny_gpt2, data_dir, tmp_path, capsys):
    """Without config.json (removed by hand), the checkpoint's own copy of the config still refuses a mixed resume."""
    out = tmp_path / "run"
    assert train_sentiment.main(_short(tiny_gpt2, data_dir, out, "--stop-after-step", 2)) == 0
    (out / "config.json").unlink()
    assert train_sentiment.main(_short(tiny_gpt2, data_dir, out, "--resume", "--alpha", "32")) == 1
    assert "--alpha 32.0 (the run has 64.0)" in capsys.readouterr().err


def test_a_checkpoint_the_disk_cannot_take_is_one_error_and_keeps_the_last(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, optimizer, step=1)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1088 vs 1024")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="could not be written .*is the disk full or the folder read-only"):
        save_checkpoint(path, model, optimizer, step=2)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
