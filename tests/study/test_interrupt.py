"""Ctrl-C in a training run: the step in flight finishes, a checkpoint is written, the command that continues the run
is printed, and that command ends where an uninterrupted run ends."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train_sentiment
from lora_fast.study.interrupt import INTERRUPTED_EXIT_CODE, resume_command
from tests.helpers import OFFLINE_ENV, ROOT


def _args(tiny, data_dir, out, steps=6):
    return ["--model", str(tiny), "--data-dir", str(data_dir), "--max-steps", str(steps), "--eval-every", "3",
            "--max-val", "8", "--max-test", "8", "--no-generation", "--no-zero-shot", "--out", str(out)]  # fmt: skip


def _ctrl_c_after_step(monkeypatch, at: int, times: int = 1):
    """train_step as usual, then ``times`` SIGINTs to this process after step ``at``: what a user's Ctrl-C does."""
    real, calls = train_sentiment.train_step, []

    def step(*args, **kwargs):
        res = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == at:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # let the handler run before the next signal
        return res

    monkeypatch.setattr(train_sentiment, "train_step", step)


def _weights(out):
    return load_file(str(out / "adapter_last" / "adapter_model.safetensors"))


def test_ctrl_c_finishes_the_step_checkpoints_and_the_printed_command_ends_as_an_uninterrupted_run(
    tiny_gpt2, data_dir, tmp_path, monkeypatch, capsys
):
    assert train_sentiment.main(_args(tiny_gpt2, data_dir, tmp_path / "whole")) == 0
    out = tmp_path / "cut"
    _ctrl_c_after_step(monkeypatch, at=2)
    assert train_sentiment.main(_args(tiny_gpt2, data_dir, out)) == INTERRUPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert "interrupted after step 2; checkpoint" in err and (out / "checkpoint.pt").is_file()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    command = shlex.split(err.strip().splitlines()[-1])
    assert command[:2] == ["python", sys.argv[0]] and command[-3:] == ["--out", str(out.resolve()), "--resume"]
    monkeypatch.undo()
    assert train_sentiment.main(command[2:]) == 0
    whole, cut = _weights(tmp_path / "whole"), _weights(out)
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_a_second_ctrl_c_stops_at_once_and_names_the_last_checkpoint(
    tiny_gpt2, data_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    _ctrl_c_after_step(monkeypatch, at=4, times=2)  # after step 4: the checkpoint of step 3 is the last one
    assert train_sentiment.main(_args(tiny_gpt2, data_dir, out)) == INTERRUPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert f"the last checkpoint is {(out / 'checkpoint.pt').resolve()}" in err and "Traceback" not in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert err.strip().splitlines()[-1].endswith(f"--out {out.resolve()} --resume")


@pytest.mark.slow
def test_ctrl_c_on_the_command_line(tiny_gpt2, data_dir, tmp_path):
    """The real thing: SIGINT to a running script, then the command it prints, which finishes the run and says where
    its results are (absolute paths)."""
    out = tmp_path / "run"
    args = _args(tiny_gpt2, data_dir, out, steps=60)
    args[args.index("--eval-every") + 1] = "1"  # a validation pass every step: slow enough to interrupt
    env = {**os.environ, **OFFLINE_ENV, "LORA_FAST_PROGRESS_EVERY": "0"}
    proc = subprocess.Popen([sys.executable, "train_sentiment.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, err[-2000:]
    command = shlex.split(err.strip().splitlines()[-1])
    assert command[-3:] == ["--out", str(out.resolve()), "--resume"] and "--max-steps" in command
    done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"results: {(out / 'summary.json').resolve()}, {(out / 'val_loss.png').resolve()}" in done.stdout


def test_resume_command_keeps_the_flags_and_replaces_out_resume_and_overwrite():
    argv = ["--r", "8", "--out=old", "--overwrite", "--stop-after-step", "3", "--resume", "--lr", "1e-3"]
    assert resume_command("train_sentiment.py", argv, "/abs/run") == (
        "python train_sentiment.py --r 8 --lr 1e-3 --out /abs/run --resume"
    )
    assert resume_command("t.py", ["--prompt", "a b"], "/x", resume_flag=False, world=2) == (
        "torchrun <the same torchrun options> t.py --prompt 'a b' --out /x"
    )
