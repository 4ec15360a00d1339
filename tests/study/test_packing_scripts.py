"""``train_sentiment.py --packing``: a short run packed (``auto`` with every dropout at 0: ``prefix`` in training and
evaluation) trains and scores as the padded run does (fp32, within 1e-5 relative), says what it chose and why, and
records its training, validation and scoring time apart; with LoRA dropout, ``auto`` trains ``flat``."""

import json

import pytest

import train_sentiment
from lora_fast.study.tiny import make_tiny_gpt2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "gpt2", tokenizer_dir, n_layer=2, n_embd=32)


def run(tiny, data_dir, out, *flags):
    args = ["--model", str(tiny), "--data-dir", str(data_dir), "--out", str(out), "--max-steps", "4",
            "--batch-size", "8", "--eval-every", "2", "--max-val", "16", "--max-test", "16", "--lr", "5e-3",
            "--eval-batch-size", "8", "--no-zero-shot", "--dtype", "fp32", *flags]  # fmt: skip
    assert train_sentiment.main(args) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, json.loads((out / "summary.json").read_text())


def test_a_packed_run_trains_and_scores_as_the_padded_one(tiny, data_dir, tmp_path, capsys):
    padded, padded_summary = run(tiny, data_dir, tmp_path / "off", "--packing", "off", "--lora-dropout", "0")
    capsys.readouterr()
    packed, summary = run(tiny, data_dir, tmp_path / "auto", "--lora-dropout", "0")  # --packing auto by default
    said = capsys.readouterr().out
    assert "--packing auto: training prefix (no dropout is active), evaluation prefix" in said
    for key in ("train_loss", "val_loss", "grad_norm"):  # val_loss on steps 2 and 4 only
        ours, ref = ({m["step"]: m[key] for m in run if key in m} for run in (packed, padded))
        assert ours.keys() == ref.keys() and ours == pytest.approx(ref, rel=1e-5), key
    assert [m["tokens_per_s"] > 0 for m in packed] == [True] * 4
    assert summary["test"] == padded_summary["test"]  # accuracies: counts of the same predictions
    assert min(summary[k] for k in ("train_steps_s", "validation_s", "scoring_s")) > 0


def test_auto_trains_flat_under_lora_dropout(tiny, data_dir, tmp_path, capsys):
    run(tiny, data_dir, tmp_path / "run", "--no-generation")
    said = capsys.readouterr().out
    assert "--packing auto: training flat (dropout is active (" in said and "evaluation prefix" in said
