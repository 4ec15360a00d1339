"""What a training run keeps on disk: nothing that holds a NaN or an inf, an error that names a checkpoint that really
is good (or says there is none), and resume state that loads without unpickling code."""

import json
import os
import random
import re

import pytest
import torch

import train_sentiment
from lora_fast import apply_lora
from lora_fast.io import atomic_torch_save
from lora_fast.study.checkpoint import load_checkpoint, nonfinite_entries, save_checkpoint
from lora_fast.study.errors import CheckpointError, NonFiniteError, StudyError
from lora_fast.study.report import read_metrics, trim_metrics
from lora_fast.study.training import make_optimizer, make_scheduler
from tests.helpers import error_lines, tiny_gpt2_config


def run_args(tiny, data, out, *flags):
    args = ["--model", tiny, "--data-dir", data, "--out", out, "--max-steps", 3, "--max-val", 8, "--max-test", 8]
    return list(map(str, [*args, "--no-generation", "--no-zero-shot", "--batch-size", 8, *flags]))


def the_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def steps_in(out):
    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- metrics.jsonl after a kill


RECORDS = [{"step": 1, "train_loss": 0.7}, {"step": 2, "train_loss": 0.6, "val_loss": 0.65}]


def test_a_metrics_line_cut_short_by_a_kill_is_skipped_with_a_warning_and_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps(r) + "\n" for r in RECORDS)
    for tail in ['{"step": 3, "train_lo', "\x00\x00\x00"]:  # a write cut mid-line; a block the crash left zeroed
        path.write_text(whole + tail)
        with pytest.warns(UserWarning, match=r"metrics\.jsonl:3: the last line is cut short"):
            assert read_metrics(path) == RECORDS
    with pytest.warns(UserWarning):
        trim_metrics(path, 2)  # --resume from step 2
    assert path.read_text() == whole


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"step": 1}\n{"step": 2, "train_lo\n{"step": 3}\n', "2: not JSON"),  # cut short, but not the last line
        ('{"step": 1}\n[1, 2]\n', "2: a JSON list, not an object"),
        ('{"step": 1}\n{"step": 2, "train_lo\n', "2: not JSON"),  # the last line, but whole: its newline was written
    ],
    ids=["middle", "not_an_object", "last_with_newline"],
)
def test_a_corrupt_metrics_line_is_refused_naming_file_and_line(tmp_path, text, problem):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(StudyError, match=rf"^{re.escape(str(path))}:{re.escape(problem)}.*the file is corrupt"):
        read_metrics(path)


# ---------------------------------------------------------------- a diverging run (item 5)


def test_a_nonfinite_gradient_is_not_applied_and_the_last_good_checkpoint_is_named(
    tiny_gpt2, data_dir, tmp_path, capsys
):
    # --lr 1e3 on the tiny model: the loss of step 2 is finite, its gradient norm is not.
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint.pt"
    assert train_sentiment.main(run_args(tiny_gpt2, data_dir, out, "--lr", "1e3", "--eval-every", 1)) == 1
    pattern = (
        r"error: step 2: the gradient norm is (nan|inf) \(the loss, [0-9.]+, is finite\); the update was not applied; "
        rf"stopped; the last good checkpoint is {re.escape(str(ckpt))} \(step 1\)"
    )
    assert re.fullmatch(pattern, the_error(capsys))
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 1 and not list(nonfinite_entries([state["trainable"], state["optimizer"]]))
    assert steps_in(out) == [1] and not (out / "summary.json").exists() and not (out / "adapter_last").exists()
    # Resuming from it really works: it replays step 2 (same data, same learning rate) and stops there again.
    assert train_sentiment.main(run_args(tiny_gpt2, data_dir, out, "--lr", "1e3", "--eval-every", 1, "--resume")) == 1
    assert re.fullmatch(pattern, the_error(capsys)) and steps_in(out) == [1]


def test_a_nonfinite_loss_before_the_first_checkpoint_says_none_was_written(tiny_gpt2, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_sentiment.main(run_args(tiny_gpt2, data_dir, out, "--lr", "1e6", "--eval-every", 10)) == 1
    assert the_error(capsys) == (
        "error: step 2: the loss is nan; the update was not applied; stopped; no checkpoint was written yet (the "
        "first is due at step 3)"
    )
    assert not (out / "checkpoint.pt").exists() and not (out / "adapter_best").exists()


@pytest.fixture()
def lora_model():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = apply_lora(GPT2LMHeadModel(tiny_gpt2_config()), ["attn.c_attn"], r=2, alpha=4)
    optimizer = make_optimizer(model, lr=1e-3)
    return model, optimizer, make_scheduler(optimizer)


def test_a_checkpoint_holding_nan_is_not_written_and_the_previous_one_stays(lora_model, tmp_path):
    model, optimizer, scheduler = lora_model
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, optimizer, scheduler, step=1)
    before = path.read_bytes()
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.lora_B[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"the checkpoint of step 2 would hold NaN or inf values \(trainable\."):
        save_checkpoint(path, model, optimizer, scheduler, step=2)
    assert path.read_bytes() == before


def test_a_checkpoint_holding_nan_is_refused_on_resume(lora_model, tmp_path):
    model, optimizer, scheduler = lora_model
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, optimizer, scheduler, step=1)
    state = torch.load(path, weights_only=True)
    next(iter(state["trainable"].values())).fill_(float("nan"))  # as an older version could write it
    atomic_torch_save(state, path)
    params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with pytest.raises(CheckpointError, match="holds NaN or inf values .*: it cannot be resumed"):
        load_checkpoint(path, model, optimizer, scheduler)
    assert all(
        torch.equal(a, b) for a, b in zip(params, [p for p in model.parameters() if p.requires_grad], strict=True)
    )


# ---------------------------------------------------------------- resume state without pickled code (item 17)


def test_a_checkpoint_is_tensors_and_plain_values_and_restores_every_rng(lora_model, tmp_path):
    model, optimizer, scheduler = lora_model
    path = tmp_path / "checkpoint.pt"
    random.seed(7)
    torch.manual_seed(7)
    save_checkpoint(path, model, optimizer, scheduler, step=3, extra={"best": {"val_loss": 1.5, "step": 2}})
    expected = (random.random(), torch.rand(3))
    torch.load(path, weights_only=True)  # loads with the safe unpickler
    random.seed(0)
    torch.manual_seed(0)
    assert load_checkpoint(path, model, optimizer, scheduler) == {
        "step": 3,
        "extra": {"best": {"val_loss": 1.5, "step": 2}},
    }
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


class _RunsCode:
    """Unpickled, this object is ``os.mkdir(path)``: what a crafted checkpoint.pt could run instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_crafted_pickle_is_refused_and_runs_nothing(lora_model, tiny_gpt2, data_dir, tmp_path, capsys):
    model, optimizer, scheduler = lora_model
    marker, path = tmp_path / "code-ran", tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, optimizer, scheduler, step=1)
    state = torch.load(path, weights_only=True)
    torch.save({**state, "extra": {"data_order": _RunsCode(marker)}}, path)
    with pytest.raises(CheckpointError, match="was refused: it holds Python objects other than tensors and plain"):
        load_checkpoint(path, model, optimizer, scheduler)
    assert not marker.exists()
    # Through the command line: one line, and nothing runs.
    out = tmp_path / "run"
    out.mkdir()
    os.replace(path, out / "checkpoint.pt")
    assert train_sentiment.main(run_args(tiny_gpt2, data_dir, out, "--resume")) == 1
    assert the_error(capsys).startswith(f"error: {out / 'checkpoint.pt'} was refused") and not marker.exists()
    torch.load(out / "checkpoint.pt", weights_only=False)  # the file really is dangerous: loaded the old way, it runs
    assert marker.is_dir()
