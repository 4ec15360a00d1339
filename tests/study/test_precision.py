"""``--dtype``: the rule (``lora_fast.study.precision``), bf16 autocast on a CPU in a training step (fp32 master
weights, optimizer state and loss), and what ``train_sentiment.py`` and ``train_dpo.py`` record and refuse.

The in-process runs set the device's answer (``bf16_support``) instead of reading this machine's flags, so they test
the same thing on every CPU. bf16 tolerance: a step's loss under autocast within 2e-2 of fp32's (bf16's unit roundoff
is 3.9e-3; the tiny model's few layers each round their activations once)."""

import json
import math

import pytest
import torch

import train_sentiment
from lora_fast import apply_lora
from lora_fast.precision import BF16Support
from lora_fast.study import precision as sp
from lora_fast.study.errors import CheckpointError, UsageError
from lora_fast.study.training import collate, make_optimizer, train_step
from tests.helpers import error_lines, tiny_gpt2_config

CPU = torch.device("cpu")
NATIVE = BF16Support(True, "this CPU has avx512_bf16: torch's bf16 matmuls run natively", "AVX512", False, True)
EMULATED = BF16Support(False, "this CPU has neither AMX tiles nor avx512_bf16: ...", "AVX2", False, False)


@pytest.fixture
def cpu_is(monkeypatch):
    """``cpu_is(NATIVE)`` / ``cpu_is(EMULATED)``: the CPU's bf16 answer the rule sees."""
    return lambda support: monkeypatch.setattr(sp, "bf16_support", lambda device: support)


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("support, dtype", [(NATIVE, "bf16"), (EMULATED, "fp32")])
def test_auto_on_a_cpu_is_bf16_only_where_it_is_native(cpu_is, support, dtype):
    cpu_is(support)
    chosen = sp.choose_precision("auto", CPU)
    assert chosen.dtype == dtype and chosen.amp_dtype == sp.AMP_DTYPES[dtype]
    assert chosen.reason == f"--dtype auto: {'bf16 autocast' if dtype == 'bf16' else 'fp32'}, as {support.reason}"
    assert chosen.record() == {"dtype": dtype, "reason": chosen.reason, "bf16": support.as_dict()}


@pytest.mark.parametrize("support", [NATIVE, EMULATED])
def test_fp32_and_bf16_are_forced(cpu_is, support):
    cpu_is(support)
    assert sp.choose_precision("fp32", CPU).dtype == "fp32"
    forced = sp.choose_precision("bf16", CPU)
    assert forced.dtype == "bf16"
    assert ("slower than fp32 here" in forced.reason) is (not support.native)  # forced where it is slow: said so


@pytest.mark.parametrize(
    "flag, fp16, message",
    [
        ("fp16", True, "--dtype fp16: fp16 autocast with its GradScaler runs on CUDA only; on cpu use bf16"),
        ("fp16", False, "--dtype fp16: expected one of auto, fp32, bf16"),
        ("half", True, "--dtype half: expected one of auto, fp32, bf16, fp16"),
    ],
)
def test_what_a_cpu_cannot_run_is_refused_by_name(flag, fp16, message):
    with pytest.raises(UsageError) as err:
        sp.choose_precision(flag, CPU, fp16=fp16)
    assert str(err.value) == message


def test_autocast_context_follows_the_choice(cpu_is):
    cpu_is(NATIVE)
    for flag, enabled in (("auto", True), ("fp32", False)):
        with sp.choose_precision(flag, CPU).autocast(CPU):
            assert torch.is_autocast_enabled("cpu") is enabled
            assert not enabled or torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_a_checkpoint_of_another_precision_is_refused(cpu_is):
    cpu_is(EMULATED)
    fp32 = sp.choose_precision("auto", CPU)
    sp.check_resumed_dtype({"dtype": "fp32", "data_order": {}}, fp32, CPU, "ckpt.pt")
    sp.check_resumed_dtype({}, fp32, CPU, "ckpt.pt")  # no checkpoint: a fresh start
    cpu_is(NATIVE)
    bf16 = sp.choose_precision("auto", CPU)
    with pytest.raises(
        CheckpointError, match=r"ckpt.pt was trained in fp32, and here --dtype gives bf16 .*--dtype fp32"
    ):
        sp.check_resumed_dtype({"dtype": "fp32", "data_order": {}}, bf16, CPU, "ckpt.pt")
    with pytest.raises(CheckpointError, match="trained in fp32"):  # before the entry: a CPU run was fp32
        sp.check_resumed_dtype({"data_order": {}}, bf16, CPU, "ckpt.pt")


# ---------------------------------------------------------------- a training step under CPU autocast


def test_a_bf16_step_keeps_fp32_masters_and_loss():
    """The LoRA weights, their gradients, AdamW's moments and the loss stay fp32 under bf16 autocast; the step's loss
    is fp32's within the bf16 tolerance, and not equal to it (autocast really ran)."""
    from transformers import GPT2LMHeadModel

    from lora_fast.study.causal_lm import LastTokenLM

    results = {}
    for amp in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(tiny_gpt2_config())
        apply_lora(model, ["attn.c_attn", "attn.c_proj"], r=4, alpha=8)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        optimizer = make_optimizer(model, 1e-3)
        batch = collate([[5, 9, 300, 7, 11], [40, 2, 8]], 0)
        result = train_step(LastTokenLM(model), optimizer, [batch], [torch.tensor([1, 2])], amp_dtype=amp)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in trainable)
        moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
        assert len(moments) == 2 * len(trainable) and all(m.dtype == torch.float32 for m in moments)
        results[amp] = result.loss
    assert results[torch.bfloat16] != results[None]
    assert results[torch.bfloat16] == pytest.approx(results[None], rel=2e-2)


# ---------------------------------------------------------------- the scripts


def _sentiment(tiny, data, out, *flags):
    args = ["--model", tiny, "--data-dir", data, "--out", out, "--max-steps", 4, "--eval-every", 2, "--max-val", 8,
            "--max-test", 8, "--train-subset", 32, "--batch-size", 4, "--eval-batch-size", 8, "--gen-tokens", 2,
            "--lora-dropout", 0.1, "--device", "cpu", *flags]  # fmt: skip
    return list(map(str, args))


@pytest.mark.slow
def test_train_sentiment_records_what_auto_chose_and_why(tiny_gpt2, data_dir, tmp_path, cpu_is):
    """On a CPU with native bf16, auto trains, validates and scores (both metrics) under bf16 autocast and says so
    in config.json and summary.json; the losses are fp32's within the bf16 tolerance; the weights it saves are fp32."""
    from safetensors.torch import load_file

    runs = {}
    for support, out in ((NATIVE, tmp_path / "bf16"), (EMULATED, tmp_path / "fp32")):
        cpu_is(support)
        assert train_sentiment.main(_sentiment(tiny_gpt2, data_dir, out)) == 0
        config, summary = (json.loads((out / name).read_text()) for name in ("config.json", "summary.json"))
        dtype = "bf16" if support.native else "fp32"
        assert config["dtype"] == "auto" and config["precision"] == summary["precision"]
        assert summary["precision"]["dtype"] == dtype and support.reason in summary["precision"]["reason"]
        assert summary["precision"]["bf16"] == support.as_dict()
        weights = load_file(str(out / "adapter_last" / "adapter_model.safetensors"))
        assert weights and all(t.dtype == torch.float32 for t in weights.values())
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[dtype] = metrics, summary
    (bf16, s_bf16), (fp32, _) = runs["bf16"], runs["fp32"]
    assert bf16[0]["train_loss"] != fp32[0]["train_loss"]  # autocast really ran
    assert bf16[0]["train_loss"] == pytest.approx(fp32[0]["train_loss"], rel=2e-2)
    assert bf16[1]["val_loss"] == pytest.approx(fp32[1]["val_loss"], rel=2e-2)
    for which in ("zero_shot", "last"):
        assert {"label_acc", "gen_acc"} <= s_bf16["test"][which].keys()


@pytest.mark.slow
def test_a_resume_in_another_precision_is_refused(tiny_gpt2, data_dir, tmp_path, capsys, cpu_is):
    cpu_is(NATIVE)
    out = tmp_path / "run"
    flags = ["--checkpoint-every", "2", "--no-generation", "--no-zero-shot"]
    assert train_sentiment.main(_sentiment(tiny_gpt2, data_dir, out, *flags, "--stop-after-step", "2")) == 0
    capsys.readouterr()
    assert train_sentiment.main(_sentiment(tiny_gpt2, data_dir, out, *flags, "--resume", "--dtype", "fp32")) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "was trained in bf16, and here --dtype gives fp32 (--dtype fp32); pass --dtype bf16" in line
    assert train_sentiment.main(_sentiment(tiny_gpt2, data_dir, out, *flags, "--resume")) == 0  # auto: bf16 again
    assert json.loads((out / "summary.json").read_text())["precision"]["dtype"] == "bf16"


def test_fp16_on_a_cpu_is_refused_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--model", str(tmp_path / "no-model"), "--out", str(out), "--dtype", "fp16", "--device", "cpu"]
    assert train_sentiment.main(args) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == "error: --dtype fp16: fp16 autocast with its GradScaler runs on CUDA only; on cpu use bf16"
    assert not out.exists()


@pytest.mark.slow
def test_train_dpo_runs_and_records_bf16(tmp_path, tiny_gpt2, data_dir, cpu_is):
    """train_dpo.py under bf16 autocast (sampling, scoring, reference log-probs, training, evaluation): the LoRA
    weights it saves stay fp32, and config.json and summary.json say which precision ran and why."""
    from safetensors.torch import load_file

    import train_dpo
    from lora_fast import lora_modules, save_adapter
    from lora_fast.study.causal_lm import load_causal_lm

    scorer, _ = load_causal_lm(str(tiny_gpt2), dropout=None)
    apply_lora(scorer, ["attn.c_attn"], r=4, alpha=8)
    for _, layer in lora_modules(scorer):
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    save_adapter(scorer, tmp_path / "scorer")
    cpu_is(NATIVE)
    out = tmp_path / "dpo"
    argv = ["--model", tiny_gpt2, "--scorer", tmp_path / "scorer", "--data-dir", data_dir, "--num-prompts", 4,
            "--samples-per-prompt", 3, "--num-eval-prompts", 2, "--eval-samples", 2, "--max-new-tokens", 4,
            "--steps", 2, "--batch-size", 2, "--device", "cpu", "--out", out]  # fmt: skip
    assert train_dpo.main(list(map(str, argv))) == 0
    config, summary = (json.loads((out / name).read_text()) for name in ("config.json", "summary.json"))
    assert config["dtype"] == "auto" and config["precision"] == summary["precision"]
    assert summary["precision"]["dtype"] == "bf16" and NATIVE.reason in summary["precision"]["reason"]
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    train = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in ln]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    # Policy == reference at step 1: log 2, up to the bf16 rounding of the two sides' log-probs (other batch shapes).
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-2)
