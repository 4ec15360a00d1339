"""Sweeps (lora_fast.study.sweep): the study table's deltas, sub-run flags, and a methods sweep on a tiny random GPT-2
run through train_sentiment.py's CLI: one process per sub-run, interrupted and resumed, then skipped when finished."""

import dataclasses
import json

import pytest

import train_sentiment
from lora_fast.study.cli import config_argv
from lora_fast.study.sweep import SWEEPS, SweepError, run_sweep, sweep_markdown
from lora_fast.study.tiny import make_tiny_gpt2
from tests.helpers import run_script

METHOD_RUNS = ["zero-shot", "few-shot-k4", "bitfit", "bottleneck", "lora-r16", "lora-r128", "full"]


# ---------------------------------------------------------------- the study table


def _scores(gen, label):
    return {"label_acc": label} if gen is None else {"label_acc": label, "gen_acc": gen}


def test_study_markdown_puts_the_study_beside_ours_with_deltas():
    # (best, last) as (generation, label-logit); best and last differ so a table reading the wrong one fails.
    fabricated = {
        "lora-r16-a64": ((0.8500, 0.8000), (0.8600, 0.8700)),
        "lora-r128-a512": ((0.9000, 0.8696), (0.1, 0.1)),
        "lora-r196-a784": ((None, 0.8000), (0.1, 0.1)),  # a --no-generation run: no generation accuracy
        "full": ((0.8000, 0.8500), (0.8300, 0.8400)),
        "lora-r16-a256": ((0.1, 0.1), (0.8800, 0.9000)),
        "bitfit": ((0.6000, 0.6500), (0.1, 0.1)),
        "bottleneck": ((0.6100, 0.6600), (0.1, 0.1)),
        **{f"prompt-{p}": ((0.7000, 0.7500), (0.1, 0.1)) for p in ("simple1", "simple2", "similar", "complex")},
    }
    evaluated = {"zero-shot": (0.0500, 0.6000), "few-shot-k4": (0.3000, 0.7000)}  # --eval-only: one set of scores
    assert set(fabricated) | set(evaluated) == set(SWEEPS["study"]["runs"])
    cost = {"trainable_params": 1000, "trainable_pct": 0.5, "peak_memory_mb": 900.0, "wall_time_s": 60.0}
    summaries = {n: {"test": {"eval": _scores(*scores)}, **cost} for n, scores in evaluated.items()}
    summaries |= {
        n: {"test": {"best": _scores(*b), "last": _scores(*last)}, **cost} for n, (b, last) in fabricated.items()
    }
    md = sweep_markdown("study", summaries)
    rank, alpha, prompt, baselines, every = md.split("## ")[1:]
    # Deltas are ours - study, worked out by hand: 0.8500 - 0.8424 = +0.0076, 0.8000 - 0.8424 = -0.0424, ...
    assert "| lora-r16-a64 | 0.8424 | 0.8500 | +0.0076 | 0.8000 | -0.0424 |" in rank
    assert "| lora-r128-a512 | 0.8696 | 0.9000 | +0.0304 | 0.8696 | +0.0000 |" in rank
    assert "| lora-r196-a784 | 0.8574 | - | - | 0.8000 | -0.0574 |" in rank
    assert "| full | 0.8405 | 0.8000 | -0.0405 | 0.8500 | +0.0095 |" in rank
    # The alpha table scores the last checkpoint: 0.8600 - 0.8574 = +0.0026, 0.8700 - 0.8574 = +0.0126, ...
    assert "| lora-r16-a64 | 0.8574 | 0.8600 | +0.0026 | 0.8700 | +0.0126 |" in alpha
    assert "| lora-r16-a256 | 0.8771 | 0.8800 | +0.0029 | 0.9000 | +0.0229 |" in alpha
    assert "| full | - | 0.8300 | - | 0.8400 | - |" in alpha  # the study has no number here
    assert "| prompt-simple1 | - | 0.7000 | - | 0.7500 | - |" in prompt
    assert "| lora-r128-a512 | - | 0.9000 | - | 0.8696 | - |" in prompt
    # Zero-shot: 0.0500 - 0.105 = -0.0550, 0.6000 - 0.105 = +0.4950; the methods the study did not run have no number.
    assert "| zero-shot | 0.1050 | 0.0500 | -0.0550 | 0.6000 | +0.4950 |" in baselines
    assert "| few-shot-k4 | - | 0.3000 | - | 0.7000 | - |" in baselines
    assert "| bitfit | - | 0.6000 | - | 0.6500 | - |" in baselines
    # Every run with its cost and the flags that make it from the sweep's own (an --eval-only run trains nothing).
    assert "| zero-shot | 0.6000 | 0.0500 | 0.6000 | 0 | 0.000 | 900 | - | 60.0 | `--eval-only` |" in every
    assert "| bitfit | 0.6500 | 0.6000 | 0.1000 | 1,000 | 0.500 | 900 | - | 60.0 | " in every
    assert "`--no-zero-shot --method bitfit --lr 0.001` |" in every
    assert "`--no-zero-shot --r 16 --alpha 64.0` |" in every


def test_the_cpu_preset_sizes_the_study_sweep():
    cfg = train_sentiment.parse_config(["--sweep", "study", "--preset", "study-cpu", "--model", "m.gguf"])
    assert (cfg.model, cfg.method, cfg.r, cfg.alpha, cfg.lr, cfg.train_subset) == ("m.gguf", "lora", 128, 512.0,
                                                                                    2.5e-4, 5000)  # fmt: skip
    assert (cfg.batch_size, cfg.grad_accum, cfg.max_steps, cfg.eval_every, cfg.max_val) == (32, 1, 40, 10, 256)
    assert cfg.max_test is None and cfg.checkpoint_every == 20  # every test row is scored
    cfg = train_sentiment.parse_config(["--sweep", "study", "--preset", "study-cpu", "--max-steps", "10"])
    assert cfg.max_steps == 10 and cfg.model == "gpt2"
    study = train_sentiment.parse_config(["--sweep", "study"])
    assert (study.model, study.batch_size, study.grad_accum, study.max_steps, study.max_val) == (
        "gpt2-medium", 32, 4, 80, None)  # fmt: skip


# ---------------------------------------------------------------- sub-run flags and failures


@pytest.mark.parametrize("sweep", ["study", "methods"])
def test_sub_run_flags_give_back_the_sub_run_config(sweep):
    cfg = train_sentiment.parse_config(
        ["--sweep", sweep, "--max-val", "8", "--no-generation", "--instruction=-Answer:positive/negative", "--r", "4"]
    )
    for overrides in SWEEPS[sweep]["runs"].values():
        sub = dataclasses.replace(cfg, **{**overrides, "out": "runs/x/y", "sweep": None, "resume": True})
        assert train_sentiment.parse_config(config_argv(sub)) == sub


def test_sweep_refuses_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    local = ["--model", str(tmp_path), "--data-dir", str(tmp_path)]
    assert train_sentiment.main(["--sweep", "methods", "--out", str(tmp_path / "s"), *local]) == 1
    assert "not torchrun" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_a_failing_sub_run_stops_the_sweep(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nsys.exit(3)\n")
    cfg = train_sentiment.parse_config(["--sweep", "methods", "--out", str(tmp_path / "s")])
    with pytest.raises(SweepError, match="sub-run zero-shot failed \\(exit code 3\\)"):
        run_sweep(cfg, script)
    assert not (tmp_path / "s" / "methods.md").exists()


# ---------------------------------------------------------------- a methods sweep, end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "gpt2", tokenizer_dir, n_layer=2, n_embd=32)


def _sweep(tiny, data, out, *extra):
    args = ["--sweep", "methods", "--model", str(tiny), "--data-dir", str(data), "--out", str(out)]
    args += ["--max-steps", "2", "--train-subset", "32", "--max-val", "8", "--max-test", "8", "--eval-every", "1"]
    args += ["--batch-size", "4", "--gen-tokens", "2", *extra]
    proc = run_script(args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_methods_sweep_writes_the_table_resumes_and_skips_finished_runs(tiny, data_dir, tmp_path):
    out = tmp_path / "methods"

    # 1. Interrupted in bitfit, the first run that trains (the two evaluation-only runs finish).
    log = _sweep(tiny, data_dir, out, "--stop-after-step", "1")
    for name in ("zero-shot", "few-shot-k4", "bitfit"):  # each sub-run is its own train_sentiment.py process
        assert f"train_sentiment.py --model {tiny}" in log and f"--out {out / name} --resume" in log
    assert (out / "few-shot-k4" / "summary.json").is_file() and not (out / "bitfit" / "summary.json").exists()
    assert (out / "bitfit" / "checkpoint.pt").is_file() and not (out / "bottleneck").exists()
    assert "bitfit stopped before its end" in log and not (out / "methods.md").exists()

    # 2. Re-run: finished runs skipped, bitfit resumed from its step-1 checkpoint, the rest run.
    log = _sweep(tiny, data_dir, out)
    assert "zero-shot: finished already, skipped" in log and "few-shot-k4: finished already, skipped" in log
    assert f"resumed from {out / 'bitfit' / 'checkpoint.pt'} at step 1" in log
    assert [json.loads(ln)["step"] for ln in (out / "bitfit" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    summaries = {n: json.loads((out / n / "summary.json").read_text()) for n in METHOD_RUNS}
    assert summaries["few-shot-k4"]["shots"] == 4 and summaries["zero-shot"]["test"]["eval"]
    assert all(summaries[n]["steps"] == 2 for n in METHOD_RUNS[2:])
    assert all(s["peak_memory_kind"] == "cpu_max_rss" and s["peak_memory_mb"] > 0 for s in summaries.values())

    md = (out / "methods.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| method"))
    for column in ("label-logit acc", "generation acc", "trainable params", "trainable %", "peak memory", "tokens/s"):
        assert column in header
    rows = {ln.split(" | ")[0][2:]: ln.strip("| ").split(" | ") for ln in md.splitlines() if ln.startswith("| ")}
    assert list(rows)[2:] == METHOD_RUNS
    # Trainable parameters of width 32, 2 blocks: BitFit's biases 2 · (96 + 32 + 128 + 32 + 32 + 32) + 32 (ln_f);
    # adapters (D = 4) 2 · 2 · ((32·4 + 4) + (4·32 + 32)); LoRA 2 · r · ((32 + 96) + (32 + 32)); full FT all.
    expected = {"zero-shot": 0, "few-shot-k4": 0, "bitfit": 736, "bottleneck": 1168, "lora-r16": 6144}
    expected |= {"lora-r128": 49152, "full": summaries["full"]["total_params"]}
    for name, n in expected.items():
        cells = rows[name]
        assert cells[4] == f"{n:,}", (name, cells)
        assert 0 <= float(cells[1]) <= 1 and 0 <= float(cells[2]) <= 1 and float(cells[6]) > 0, cells
        assert (cells[7] == "-") == (name in ("zero-shot", "few-shot-k4")), cells  # tokens/s of training only
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 3. Everything finished: every sub-run skipped without starting a process, the table written again.
    mtimes = {n: (out / n / "summary.json").stat().st_mtime_ns for n in METHOD_RUNS}
    (out / "methods.md").unlink()
    log = _sweep(tiny, data_dir, out)
    assert all(f"{n}: finished already, skipped" in log for n in METHOD_RUNS) and "train_sentiment.py --" not in log
    assert {n: (out / n / "summary.json").stat().st_mtime_ns for n in METHOD_RUNS} == mtimes
    assert (out / "methods.md").read_text() == md
