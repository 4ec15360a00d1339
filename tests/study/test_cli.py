"""The scripts' command lines as a user meets them: every flag checked before anything loads, every error of ours one
line on stderr with a non-zero exit, the device flag parsed here, no run folder overwritten silently, none created by
a mistake, files that follow the umask, a readable start, evaluation progress, and the help texts."""

import io
import json
import os
import shutil
import sys

import pytest
import torch

import train_dpo
import train_sentiment
from lora_fast.study import distributed
from lora_fast.study.cli import dataclass_parser
from lora_fast.study.errors import UsageError
from lora_fast.study.precision import choose_precision
from lora_fast.study.training import make_scheduler
from tests.helpers import error_lines, requires_cuda, run_script

SHORT = ["--max-steps", 2, "--max-val", 8, "--max-test", 8, "--no-generation"]
SHORT += ["--no-zero-shot", "--batch-size", 4, "--eval-batch-size", 8, "--eval-every", 1]


@pytest.fixture(scope="session")
def short_run(data_dir):
    """``short_run(tiny, out, *flags)``: the arguments of a two-step run of ``tiny`` on the stand-in reviews."""
    return lambda tiny, out, *flags: ["--model", tiny, "--data-dir", data_dir, *SHORT, "--out", out, *flags]


def one_error(stderr: str) -> str:
    """The error line of a failed run: exactly one, and no traceback anywhere."""
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------- flags checked before anything loads (12, 15)


def test_a_bad_flag_is_one_line_before_anything_loads_and_leaves_no_folder(short_run, tiny_gpt2, tmp_path):
    proc = run_script(short_run(tiny_gpt2, tmp_path / "run", "--batch-size", 0))
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --batch-size 0: must be at least 1", proc.stderr
    assert not (tmp_path / "run").exists()  # no stub folder with only config.json


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--r", "0"], "--r 0: must be at least 1"),
        (["--eval-every", "0"], "--eval-every 0: must be at least 1"),
        (["--max-test", "-3"], "--max-test -3: must be at least 1"),
        (["--train-subset", "0"], "--train-subset 0: must be at least 1"),
        (["--lora-dropout", "1.5"], "--lora-dropout 1.5: must be a finite number in [0, 1)"),
        (["--lr", "0"], "--lr 0.0: must be a finite number in (0, inf)"),
        (["--alpha", "nan"], "--alpha nan: must be a finite number"),
        (["--betas", "0.9", "1"], "--betas 0.9 1.0: each must be a finite number in [0, 1)"),
        (["--adapter", "/nonexistent/adapter"], "--adapter /nonexistent/adapter: no such folder"),
        (["--resume", "--overwrite"], "--overwrite starts a run afresh; --resume resumes one"),
        (["--device", "gpu"], "--device 'gpu': expected auto, cpu, cuda or cuda:N"),
        (["--stop-after-step", "5"], "--stop-after-step 5: past --max-steps 2"),
        (["--generation", "--max-length", "3", "--gen-tokens", "3"], "--max-length 3: must be more than --gen-tok"),
        (["--r", "two"], "argument --r: invalid int value: 'two'"),
    ],
)
def test_bad_flags_are_refused_by_name_before_loading(tmp_path, capsys, monkeypatch, flags, message):
    # A --model that would fail to load and a --data-dir that does not exist: the flag is refused before either.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--model", tmp_path / "no-model", *SHORT, "--data-dir", tmp_path / "no-data", "--out", tmp_path / "o"]
    try:
        code = train_sentiment.main([*map(str, argv), *flags])
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [err.strip()] and message in err, err
    assert not (tmp_path / "o").exists()


def test_max_length_is_cut_to_the_models_positions_for_training_and_both_metrics(
    tokenizer_dir, data_dir, tmp_path, capsys
):
    from types import SimpleNamespace

    from lora_fast.study.tiny import make_tiny_gpt2

    cfg = train_sentiment.parse_config(["--max-length", "256", "--gen-tokens", "3"])
    for config, expected in [({"n_positions": 128}, 128), ({"max_position_embeddings": 64}, 64), ({}, 256)]:
        assert train_sentiment.prompt_length(cfg, SimpleNamespace(config=SimpleNamespace(**config))) == expected
    short = SimpleNamespace(config=SimpleNamespace(n_positions=3))
    with pytest.raises(UsageError, match="--gen-tokens 3: the model has 3 positions, which leaves no room"):
        train_sentiment.prompt_length(cfg, short)
    local = ["--model", str(tmp_path), "--data-dir", str(tmp_path)]  # no hub names: check_config asks no hub
    no_generation = train_sentiment.parse_config(
        ["--max-length", "256", "--gen-tokens", "3", "--no-generation", *local]
    )
    assert train_sentiment.prompt_length(no_generation, short) == 3
    assert train_sentiment.check_config(no_generation, 1, torch.device("cpu")) is None  # no metric to leave room for

    # A 32-position GPT-2 scored with --max-length 256 on reviews longer than 32 tokens: the generation metric's
    # prompts are cut to 32 - 3 as well, not to 256 - 3 (past the position table).
    model = make_tiny_gpt2(tmp_path / "short", tokenizer_dir, n_positions=32)
    argv = ["--model", model, "--data-dir", data_dir, "--eval-only", "--generation", "--no-zero-shot", "--max-test", 4,
            "--eval-batch-size", 4, "--out", tmp_path / "run"]  # fmt: skip
    assert train_sentiment.main(list(map(str, argv))) == 0, capsys.readouterr().err[-2000:]
    test = json.loads((tmp_path / "run" / "summary.json").read_text())["test"]["eval"]
    assert set(test) == {"label_acc", "gen_acc", "gen_invalid"}


@pytest.mark.parametrize("method", [None, "lora", "bitfit", "full"])
def test_eval_only_freezes_the_model_so_the_summary_counts_nothing_trainable(tiny_gpt2, tmp_path, method):
    from lora_fast.study.methods import METHODS
    from lora_fast.study.report import parameter_summary

    flags = ["--model", str(tiny_gpt2), "--eval-only"]
    if method is not None:  # an adapter of the method, saved from a model prepared for training
        cfg = train_sentiment.parse_config([*flags[:2], "--method", method, "--r", "4"])
        model, tokenizer = train_sentiment.prepare_model(cfg, torch.device("cpu"), log=lambda *args: None)
        METHODS[method].save(model, tokenizer, tmp_path / "adapter")
        flags += ["--method", method, "--adapter", str(tmp_path / "adapter")]
    model, _ = train_sentiment.prepare_model(train_sentiment.parse_config(flags), torch.device("cpu"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert parameter_summary(model)["trainable_params"] == 0 and parameter_summary(model)["trainable_pct"] == 0


def test_backend_triton_on_cpu_without_the_interpreter_is_refused(short_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = short_run(tmp_path / "no-model", tmp_path / "run", "--backend", "triton")
    assert train_sentiment.main(list(map(str, argv))) == 2
    assert "--backend triton on cpu: the Triton kernels need a CUDA device" in one_error(capsys.readouterr().err)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is a choice: then the check passes
    assert (
        train_sentiment.check_config(
            train_sentiment.parse_config(
                ["--backend", "triton", "--model", str(tmp_path), "--data-dir", str(tmp_path)]
            ),
            1,
            torch.device("cpu"),
        )
        is None
    )


def test_targets_matching_nothing_is_one_line_right_after_loading(short_run, tiny_gpt2, tmp_path):
    proc = run_script(short_run(tiny_gpt2, tmp_path / "run", "--targets", "attn.q_proj", "--zero-shot"))
    line = one_error(proc.stderr)
    assert proc.returncode == 2 and line.startswith("error: --targets attn.q_proj: target 'attn.q_proj' matches no")
    assert "close candidates" in line and "attn.c_proj" in line
    assert not (tmp_path / "run").exists()  # refused before the zero-shot evaluation and before the folder


def test_corrupt_adapter_is_one_line(short_run, tiny_gpt2, finished_run, tmp_path, capsys):
    bad = tmp_path / "adapter"
    shutil.copytree(finished_run / "adapter_last", bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code = train_sentiment.main(list(map(str, short_run(tiny_gpt2, tmp_path / "run", "--eval-only", "--adapter", bad))))
    line = one_error(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"error: --adapter {bad}: {weights} cannot be read"), line


# ---------------------------------------------------------------- --device (13)


def test_device_cuda_without_cuda_says_so(short_run, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (test_device_cuda_trains_in_one_process covers CUDA machines)")
    proc = run_script(short_run(tmp_path / "no-model", tmp_path / "run", "--device", "cuda:0"))
    assert proc.returncode == 2 and "error: --device cuda:0: no CUDA device" in one_error(proc.stderr)


@requires_cuda
def test_device_cuda_trains_in_one_process(short_run, tiny_gpt2, tmp_path):
    proc = run_script(short_run(tiny_gpt2, tmp_path / "run", "--device", "cuda"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["device"] == "cuda:0"


@pytest.mark.parametrize(
    ("spec", "world", "local", "expected"),
    [
        ("cpu", 1, 0, "cpu"),
        ("auto", 1, 0, "cuda:0"),
        ("cuda", 1, 0, "cuda:0"),  # a bare cuda has an index: torch.cuda.set_device needs one
        ("cuda:1", 1, 0, "cuda:1"),
        ("cuda", 2, 1, "cuda:1"),  # torchrun: cuda:LOCAL_RANK
        ("auto", 2, 1, "cuda:1"),
        ("cuda:2", 1, 0, "--device cuda:2: cuda:2 does not exist, this machine has 2 CUDA device(s)"),
        ("cuda:0", 2, 1, "--device cuda:0 under torchrun: each process takes cuda:LOCAL_RANK"),
        ("cuda:x", 1, 0, "--device 'cuda:x': expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_device_resolution_on_a_two_gpu_machine(monkeypatch, spec, world, local, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local))
    if expected.startswith("--"):
        with pytest.raises(UsageError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
            distributed.resolve_device(spec)
    else:
        assert distributed.resolve_device(spec) == torch.device(expected)


def test_setup_gives_torch_cuda_set_device_an_indexed_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.setup(distributed.resolve_device("cuda")) == (0, 1, torch.device("cuda:0"))
    assert calls == [torch.device("cuda:0")] and calls[0].index == 0


def test_no_cuda_is_said_plainly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(UsageError, match=rf"^--device {spec}: no CUDA device on this machine"):
            distributed.resolve_device(spec)


# ---------------------------------------------------------------- a finished run folder (14, 15, 16)


@pytest.fixture(scope="module")
def finished_run(short_run, tiny_gpt2, tmp_path_factory):
    """A finished two-step run (with its zero-shot score), written under umask 027 by a fresh process."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run_script(short_run(tiny_gpt2, out, "--zero-shot"), umask=0o027)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def test_a_run_prints_its_folder_and_a_readable_zero_shot_line(finished_run):
    lines = (finished_run / "stdout.txt").read_text().splitlines()
    assert lines[0] == f"run folder: {finished_run}"
    zero_shot = json.loads((finished_run / "summary.json").read_text())["test"]["zero_shot"]
    assert f"zero-shot test: label-logit acc {zero_shot['label_acc']:.4f}" in lines


def test_run_files_follow_the_umask(finished_run):
    # umask 027: files 0640 and folders 0750 (tempfile's private 0600/0700 would hide a run from its group).
    for path in [finished_run, *finished_run.rglob("*")]:
        if path.name != "stdout.txt":
            mode = path.stat().st_mode & 0o777
            assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))


def test_rerun_into_a_finished_out_is_refused_and_changes_nothing(short_run, tiny_gpt2, finished_run):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    proc = run_script(short_run(tiny_gpt2, finished_run))
    line = one_error(proc.stderr)
    assert proc.returncode == 2 and line.startswith(f"error: --out {finished_run} holds a run already (config.json")
    assert "--resume" in line and "--overwrite" in line
    assert {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()} == before


def test_overwrite_starts_afresh_and_keeps_other_files(short_run, tiny_gpt2, finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "metrics.jsonl").write_text('{"step": 99, "train_loss": 1.0}\n')
    (out / "adapter_last" / "README.md").write_text("old")
    assert train_sentiment.main(list(map(str, short_run(tiny_gpt2, out, "--max-steps", 1, "--overwrite")))) == 0
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert not (out / "adapter_last" / "README.md").exists()  # adapter_last/ is the run's own: replaced whole
    assert (out / "stdout.txt").is_file()  # not a run file: left alone


def test_an_adapter_folder_left_aside_by_a_killed_save_is_accepted(tmp_path):
    (tmp_path / ".adapter_best.a1b2c3d4.old" / "adapter_best").mkdir(parents=True)
    cfg = train_sentiment.parse_config(
        ["--adapter", str(tmp_path / "adapter_best"), "--model", str(tmp_path), "--data-dir", str(tmp_path)]
    )
    assert train_sentiment.check_config(cfg, 1, torch.device("cpu")) is None  # not "no such folder": it is back
    assert (tmp_path / "adapter_best").is_dir()


def test_overwrite_also_removes_a_run_folder_a_killed_save_left_aside(tmp_path):
    out = tmp_path / "run"
    (out / ".adapter_best.a1b2c3d4.old" / "adapter_best").mkdir(parents=True)  # the old run's best weights
    (out / "config.json").write_text("{}")
    cfg = train_sentiment.parse_config(["--overwrite", "--out", str(out)])
    train_sentiment.open_run_folder(cfg, out, choose_precision("fp32", torch.device("cpu")), log=lambda *args: None)
    # No loader of the new run can put the old run's weights back as its own adapter_best/.
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_resume_without_a_checkpoint_says_so_and_starts_afresh(short_run, tiny_gpt2, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_sentiment.main(list(map(str, short_run(tiny_gpt2, out, "--max-steps", 1, "--resume")))) == 0
    assert f"--resume: no checkpoint in {out}, so step 0" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_adapter_without_eval_only_is_the_starting_point(short_run, tiny_gpt2, finished_run, tmp_path, capsys):
    from safetensors.torch import load_file

    start = finished_run / "adapter_last"
    out = tmp_path / "run"
    # One step at a learning rate too small to move any weight: the adapter trained is the one given.
    argv = short_run(tiny_gpt2, out, "--adapter", start, "--max-steps", 1, "--lr", "1e-30", "--lora-dropout", 0)
    assert train_sentiment.main(list(map(str, argv))) == 0
    assert f"--adapter {start}: training starts from its weights" in capsys.readouterr().out
    given, trained = (
        load_file(str(start / "adapter_model.safetensors")),
        load_file(str(out / "adapter_last" / "adapter_model.safetensors")),
    )
    assert given.keys() == trained.keys() and all(torch.equal(given[k], trained[k]) for k in given)
    assert any(k.endswith("lora_B.weight") and given[k].abs().sum() > 0 for k in given)  # not a fresh LoRA (B = 0)
    # An adapter that does not fit the flags is refused by name.
    code = train_sentiment.main(list(map(str, short_run(tiny_gpt2, tmp_path / "r8", "--adapter", start, "--r", 8))))
    assert code == 1 and "but the adapter has r=16" in one_error(capsys.readouterr().err)


# ---------------------------------------------------------------- progress, help texts, bench outputs (16)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_evaluation_shows_a_progress_bar_on_a_terminal_and_lines_elsewhere(monkeypatch, tokenizer):
    from transformers import GPT2LMHeadModel

    from lora_fast.study.evaluate import label_accuracy, val_loss
    from lora_fast.study.prompts import label_token_ids
    from tests.helpers import tiny_gpt2_config

    model = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=len(tokenizer)))
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    for tty in (True, False):
        stderr = _Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", stderr)
        val_loss(model, seqs, [3, 4, 5], tokenizer.pad_token_id, batch_size=1)
        label_accuracy(model, seqs, [0, 1, 0], label_token_ids(tokenizer), tokenizer.pad_token_id, batch_size=2)
        text = stderr.getvalue()
        assert "validation loss: " in text and "label-logit accuracy: " in text, text
        if tty:  # tqdm's bar: one line rewritten
            assert "\r" in text and "|" in text, text
        else:  # a log: whole lines, the last of each pass at 100%
            assert "\r" not in text and "validation loss: 3/3 batches (100%)" in text, text


@pytest.mark.parametrize(
    ("argv", "backend"),
    [
        ([], "torch"),
        (["--fused"], "auto"),
        (["--no-fused"], "torch"),
        (["--fused", "--backend", "reference"], "reference"),
        (["--backend", "triton", "--fused"], "triton"),
        (["--backend", "reference"], "reference"),
    ],
)
def test_fused_is_backend_auto_and_backend_wins(argv, backend):
    cfg = train_sentiment.parse_config(argv)
    assert cfg.backend == backend and not hasattr(cfg, "fused")


@pytest.mark.parametrize("script", [train_sentiment, train_dpo], ids=["train_sentiment", "train_dpo"])
def test_help_names_each_default_once(script):
    cls = script.Config if script is train_sentiment else script.DPOConfig
    parser = dataclass_parser(cls, script.__doc__)
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings and a.help}
    assert "--model" in helps and "--out" in helps
    for flag, text in helps.items():
        assert text.count("(default") <= 1, (flag, text)
    # The printed help, flag by flag (argparse wraps the texts): one default at most, and a required flag has none.
    text = " ".join(parser.format_help().split())
    blocks = text.split(" --")[1:]
    assert len(blocks) >= len(helps) and all(b.count("(default") <= 1 for b in blocks)
    if script is train_dpo:
        assert "required, no default" in helps["--scorer"] and "(default: None)" not in helps["--scorer"]


def test_warmup_is_linear_from_zero_then_constant():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, lrs = make_scheduler(optimizer, 4), []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 0).get_last_lr() == [1.0]


def test_atomic_writes_follow_the_umask_and_leave_it_as_it_was(tmp_path):
    from lora_fast.io import atomic_directory, atomic_write_text

    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "b.txt").write_text("y")
        assert os.umask(0o002) == 0o002  # reading the umask put it back
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o775


def test_the_umask_is_read_without_setting_it_where_proc_reports_it(tmp_path, monkeypatch):
    import lora_fast.io as io

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nUmask:\t0077\nState:\tR (running)\n")
    calls = []
    real_umask = os.umask
    monkeypatch.setattr(io.os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
    monkeypatch.setattr(io, "_PROC_STATUS", str(status))
    old = real_umask(0o027)
    try:
        assert io._umask() == 0o077 and calls == []  # the status line, not the set-and-restore
        io.atomic_write_text(tmp_path / "a.txt", "x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o600  # 0o666 & ~0o077
        monkeypatch.setattr(io, "_PROC_STATUS", str(tmp_path / "no-such-file"))
        assert io._umask() == 0o027 and calls == [0o022, 0o027]  # elsewhere: set, then put straight back
        if os.path.isfile("/proc/self/status"):
            monkeypatch.setattr(io, "_PROC_STATUS", "/proc/self/status")
            calls.clear()
            assert io._umask() == 0o027 and calls == []
    finally:
        real_umask(old)


def test_former_names_still_work_and_say_the_new_ones(capsys, tmp_path):
    cfg = train_sentiment.parse_config(["--method", "adapter", "--dropout", "0.1", "--adapter-dim", "8"])
    assert (cfg.method, cfg.model_dropout, cfg.bottleneck_dim) == ("bottleneck", 0.1, 8)
    err = capsys.readouterr().err
    for old, new in (("--method adapter", "--method bottleneck"), ("--dropout", "--model-dropout"),
                     ("--adapter-dim", "--bottleneck-dim")):  # fmt: skip
        assert f"note: {old} is now {new}" in err
    assert "--dropout" not in train_sentiment.dataclass_parser(train_sentiment.Config).format_help()
    # A run folder written under the former names resumes under the new ones.
    (tmp_path / "config.json").write_text(json.dumps({"method": "adapter", "dropout": 0.1, "adapter_dim": 8}))
    assert train_sentiment.run_config(tmp_path) == {"method": "bottleneck", "model_dropout": 0.1, "bottleneck_dim": 8}
