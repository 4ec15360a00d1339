"""End-to-end runs of train_sentiment.py on a tiny random GPT-2 over the stand-in tokenizer and reviews; the first run
also on one over the real GPT-2 tokenizer with the real rotten_tomatoes data (data tier)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import train_sentiment
from lora_fast.study.causal_lm import label_logits
from lora_fast.study.data import load_splits, subset
from lora_fast.study.evaluate import label_accuracy
from lora_fast.study.prompts import INSTRUCTIONS, build_prompt, encode_prompt, label_token_ids
from lora_fast.study.tiny import make_tiny_gpt2
from tests.helpers import OFFLINE_ENV, ROOT, error_lines, run_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "gpt2", tokenizer_dir, n_layer=2, n_embd=32)


@pytest.fixture(scope="module")
def corpus_tiny(tmp_path_factory, corpus):
    """The same tiny GPT-2 over ``corpus``'s tokenizer."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "gpt2", corpus.tokenizer_dir, n_layer=2, n_embd=32)


def base_args(tiny, data, out, steps):
    return [
        "--model",
        str(tiny),
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--train-subset",
        "256",
        "--max-val",
        "32",
        "--max-test",
        "32",
        "--batch-size",
        "8",
        "--eval-every",
        "4",
        "--lr",
        "5e-3",
        "--eval-batch-size",
        "64",
        # fp32 on every CPU (auto is bf16 where the CPU has native bf16): these runs compare numbers across
        # backends, processes, resumes and PEFT; tests/study/test_precision.py runs bf16.
        "--dtype",
        "fp32",
    ]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _adapter(out, which="adapter_last"):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / which / "adapter_model.safetensors"))


def _assert_adapters_close(a, b, atol):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def test_end_to_end_writes_every_output_and_peft_agrees(corpus, corpus_tiny, tmp_path):
    tiny, out = corpus_tiny, tmp_path / "run"
    proc = run_script(base_args(tiny, corpus.data_dir, out, 24))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "val_loss.png",
        "checkpoint.pt",
        "adapter_best/adapter_model.safetensors",
        "adapter_last/adapter_config.json",
    ):
        assert (out / name).is_file(), name
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8, 12, 16, 20, 24]
    first, last = [r["train_loss"] for r in rows[:4]], [r["train_loss"] for r in rows[-4:]]
    assert sum(last) / 4 < sum(first) / 4 - 0.05, (first, last)
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in rows)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_test"] == 32 and summary["n_val"] == 32 and summary["n_train"] == 256 and summary["steps"] == 24
    # LoRA r=16 on c_attn (32 -> 96) and c_proj (32 -> 32) in 2 blocks: 2 · 16 · ((32 + 96) + (32 + 32)).
    assert summary["trainable_params"] == 2 * 16 * (128 + 64)
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert summary["best_step"] == min(val, key=val.get) and summary["best_val_loss"] == pytest.approx(
        min(val.values())
    )
    for which in ("zero_shot", "best", "last"):
        s = summary["test"][which]
        for key in ("label_acc", "gen_acc"):
            assert 0.0 <= s[key] <= 1.0 and (s[key] * 32) == pytest.approx(round(s[key] * 32))
    assert "label-logit acc" in proc.stdout

    # The adapter loads in HF PEFT and gives the same label-logit accuracy on the same 32 test examples.
    from peft import PeftModel
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tiny))
    test = subset(load_splits(corpus.data_dir)["test"], 32, 42)
    seqs = [encode_prompt(tok, build_prompt(r["text"], INSTRUCTIONS["default"]), 256) for r in test]
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(tiny)), str(out / "adapter_last"))
    ours = train_sentiment.Config(model=str(tiny), eval_only=True, adapter=str(out / "adapter_last"))
    model, _ = train_sentiment.prepare_model(ours, torch.device("cpu"), print)

    batch = {"input_ids": torch.tensor([seqs[0], seqs[0]]), "attention_mask": torch.ones(2, len(seqs[0]))}
    labels = label_token_ids(tok)
    torch.testing.assert_close(
        label_logits(model.eval(), **batch, label_ids=labels),
        peft_model.eval()(**batch).logits[:, -1, list(labels)],
        atol=1e-5,
        rtol=1e-5,
    )
    acc = label_accuracy(peft_model.base_model.model, seqs, [r["label"] for r in test], labels, tok.eos_token_id)
    assert acc["acc"] == pytest.approx(summary["test"]["last"]["label_acc"])


def test_triton_fused_and_reference_backends_give_the_same_loss_curve(tiny, data_dir, tmp_path):
    """The Triton kernels (under Triton's interpreter without a GPU) train the same LoRA as the reference backend
    without LoRA dropout (their dropout masks come from different generators); --fused (the Triton kernels on CUDA,
    the torch backend elsewhere) matches the reference with dropout on too: the same losses step by step."""
    args = ["--max-steps", "6", "--train-subset", "64", "--max-val", "8", "--max-test", "8", "--batch-size", "4"]
    args += ["--eval-every", "3", "--no-generation", "--no-zero-shot"]
    runs = {
        "triton": ["--backend", "triton", "--lora-dropout", "0"],
        "reference-no-dropout": ["--backend", "reference", "--lora-dropout", "0"],
        "fused": ["--fused"],
        "reference": ["--backend", "reference"],
    }
    curves = {}
    for name, flags in runs.items():
        out = tmp_path / name
        assert train_sentiment.main(base_args(tiny, data_dir, out, 6) + args + flags) == 0
        backend = json.loads((out / "config.json").read_text())["backend"]
        assert backend == ("auto" if name == "fused" else flags[1])  # --fused is --backend auto
        curves[name] = torch.tensor([r["train_loss"] for r in _metrics(out)])
    assert len(curves["triton"]) == 6 and curves["triton"][-1] < curves["triton"][0]
    torch.testing.assert_close(curves["triton"], curves["reference-no-dropout"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(curves["fused"], curves["reference"], atol=1e-5, rtol=1e-5)
    assert (curves["reference"] - curves["reference-no-dropout"]).abs().max() > 1e-4  # dropout was really on


def test_resume_after_interruption_matches_uninterrupted_run(tiny, data_dir, tmp_path):
    extra = ["--checkpoint-every", "3", "--lora-dropout", "0.1", "--no-generation", "--no-zero-shot"]
    assert train_sentiment.main(base_args(tiny, data_dir, tmp_path / "full", 9) + extra) == 0
    cut = tmp_path / "cut"
    assert train_sentiment.main(base_args(tiny, data_dir, cut, 9) + extra + ["--stop-after-step", "6"]) == 0
    assert not (cut / "adapter_last").exists() and [r["step"] for r in _metrics(cut)][-1] == 6
    assert train_sentiment.main(base_args(tiny, data_dir, cut, 9) + extra + ["--resume"]) == 0
    _assert_adapters_close(_adapter(tmp_path / "full"), _adapter(cut), atol=1e-6)
    _assert_adapters_close(_adapter(tmp_path / "full", "adapter_best"), _adapter(cut, "adapter_best"), atol=1e-6)
    full, resumed = _metrics(tmp_path / "full"), _metrics(cut)
    assert [r["step"] for r in resumed] == list(range(1, 10))
    assert [r["train_loss"] for r in resumed] == pytest.approx([r["train_loss"] for r in full], abs=1e-6)


def test_torchrun_two_processes_match_one_process(tiny, data_dir, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    args = ["--grad-accum", "2", "--batch-size", "4", "--lora-dropout", "0", "--no-generation", "--no-zero-shot"]
    assert train_sentiment.main(base_args(tiny, data_dir, tmp_path / "one", 6) + args) == 0
    proc = subprocess.run(
        [
            "torchrun",
            "--standalone",  # rendezvous on a free port: two test runs at once do not collide
            "--nproc_per_node",
            "2",
            str(ROOT / "train_sentiment.py"),
            *base_args(tiny, data_dir, tmp_path / "two", 6),
            *args,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV},
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_adapters_close(_adapter(tmp_path / "one"), _adapter(tmp_path / "two"), atol=1e-5)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["train_loss"] for r in two] == pytest.approx([r["train_loss"] for r in one], rel=1e-5)
    # Validation runs on the same steps in both, with the same losses (pytest 9.2's approx refuses None entries).
    val_one = {r["step"]: r["val_loss"] for r in one if r.get("val_loss") is not None}
    val_two = {r["step"]: r["val_loss"] for r in two if r.get("val_loss") is not None}
    assert val_one and val_two.keys() == val_one.keys()
    assert [val_two[k] for k in sorted(val_two)] == pytest.approx([val_one[k] for k in sorted(val_one)], rel=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/gpt2"], "--model /nonexistent/gpt2: no such folder"),
        (["--prompt", "sarcastic"], "invalid choice: 'sarcastic'"),
    ],
    ids=["bad-model", "unknown-prompt"],
)
def test_cli_errors_are_one_clear_line(tiny, data_dir, tmp_path, args, message):
    out = tmp_path / "run"
    common = [
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--max-val",
        "8",
        "--max-test",
        "8",
        "--no-generation",
        "--no-zero-shot",
        "--train-subset",
        "64",
        "--eval-every",
        "1",
        "--batch-size",
        "4",
    ]
    model = [] if "--model" in args else ["--model", str(tiny)]
    proc = run_script(common + model + args)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(error_lines(proc.stderr)) == 1 and not out.exists()
