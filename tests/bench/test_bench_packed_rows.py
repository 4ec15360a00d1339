"""The packed-base rows of the model-step benchmark (``bench/model_step.py --keep-quantized``, ``--dtype``) on a tiny
Llama GGUF file: the packed rows compute the float rows' first loss (fp32 within 1e-5; bf16 autocast within 1e-2),
hold fewer weight bytes, and the rows that need float weights are refused by name."""

import pytest
import torch

from bench.model_step import PACKED_ROWS, StepConfig, run_row
from bench.packed import check_packed_targets, packed_table
from tests.gguf_files import write_tiny_llama

pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package (pip install gguf)")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer_dir):
    return write_tiny_llama(tmp_path_factory.mktemp("bench_gguf") / "tiny.gguf", 600, tokenizer_dir=tokenizer_dir)


@pytest.mark.parametrize(("dtype", "tol"), [("fp32", 1e-5), ("bf16", 1e-2)])
def test_packed_rows_compute_the_float_rows(tiny_gguf, dtype, tol):
    results = []
    for packed in (False, True):
        cfg = StepConfig(model=str(tiny_gguf), batch=2, seq=16, warmup=0, steps=1, keep_quantized=packed, dtype=dtype)
        results += [run_row(row, cfg) for row in PACKED_ROWS]
    by = {r["name"]: r for r in results}
    assert set(by) == {"lora_fast", "floor", "lora_fast+packed", "floor+packed"}
    for row in PACKED_ROWS:
        torch.testing.assert_close(by[f"{row}+packed"]["first_loss"], by[row]["first_loss"], rtol=tol, atol=tol)
        assert by[f"{row}+packed"]["weight_mb"] < 0.35 * by[row]["weight_mb"]  # one Q5_1 layer stays float
    assert by["lora_fast+packed"]["trainable_params"] == by["lora_fast"]["trainable_params"] > 0
    verdicts = check_packed_targets(results)
    assert [v["target"].split(" vs")[0] for v in verdicts] == [
        "lora_fast+packed weight bytes", "lora_fast+packed peak memory", "lora_fast+packed step time"
    ]  # fmt: skip
    assert verdicts[0]["ratio"] == by["lora_fast+packed"]["weight_mb"] / by["lora_fast"]["weight_mb"]
    assert "| lora_fast+packed |" in packed_table(results)


def test_rows_that_need_float_weights_are_refused(tiny_gguf):
    cfg = StepConfig(model=str(tiny_gguf), batch=2, seq=16, warmup=0, steps=1, keep_quantized=True)
    with pytest.raises(ValueError, match=r"row 'peft' needs float weights; on a packed base run \('lora_fast', 'fl"):
        run_row("peft", cfg)


def test_peft_bnb4_row_beside_the_packed_rows(tiny_gguf):
    """PEFT over bitsandbytes NF4 layers (optional row): it runs, quantises every block linear, and its first loss is
    near the float row's (NF4 rounds the weights, so within 10% here, not equal)."""
    pytest.importorskip("bitsandbytes", reason="the peft_bnb4 row needs bitsandbytes (pip install bitsandbytes)")
    cfg = StepConfig(model=str(tiny_gguf), batch=2, seq=16, warmup=0, steps=1)
    bnb4, dense = run_row("peft_bnb4", cfg), run_row("lora_fast", cfg)
    assert "14 nn.Linear as NF4 Linear4bit" in bnb4["notes"][-1] and bnb4["weight_mb"] < dense["weight_mb"]
    assert bnb4["trainable_params"] == dense["trainable_params"]
    torch.testing.assert_close(bnb4["first_loss"], dense["first_loss"], rtol=0.1, atol=0)
