"""The model-step benchmark's rows (bench/model_step.py) on small GPT-2 and Llama folders: every row computes the same
first loss (the same model and batch; LoRA starts as the base model), the floor trains nothing and its backward
reaches the input embeddings, each row uses its model type's LoRA targets, and --dtype bf16 puts every row under
bf16 autocast."""

import pytest
import torch

from bench.layer_bench import cases
from bench.model_step import ROWS, StepConfig, build_step, run_row
from lora_fast.precision import bf16_support
from lora_fast.study.tiny import make_tiny_gpt2
from tests.helpers import tiny_llama_config


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer_dir):
    from transformers import GPT2TokenizerFast, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bench")
    make_tiny_gpt2(root / "gpt2", tokenizer_dir, n_layer=2, n_embd=32)
    tokenizer = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    llama = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), tie_word_embeddings=True))
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return root


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_row_computes_the_same_first_loss(folders, family):
    cfg = StepConfig(model=str(folders / family), batch=2, seq=16, warmup=0, steps=1)
    results = {row: run_row(row, cfg) for row in ROWS}
    floor = results["floor"]
    assert floor["trainable_params"] == 0 and results["full_ft"]["trainable_params"] == floor["total_params"]
    targets = {"gpt2": ["attn.c_attn", "attn.c_proj"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}[family]
    for row, result in results.items():
        assert result["targets"] == targets and result["peak_mem_mb"] > 0, row
        torch.testing.assert_close(result["first_loss"], floor["first_loss"], atol=1e-5, rtol=1e-5, msg=row)
    assert results["lora_fast"]["trainable_params"] == results["peft"]["trainable_params"] > 0


def test_the_floor_ends_its_backward_at_the_input_embeddings(folders):
    step, model, notes = build_step("floor", StepConfig(model=str(folders / "llama"), batch=2, seq=16))
    step()  # asserts that the embedding output got its gradient
    assert all(p.grad is None for p in model.parameters())  # nothing else is computed
    assert "gradient of the input embeddings only" in notes[-1]


def test_every_row_runs_under_the_one_autocast(folders):
    """bench/run.py --dtype bf16: each row's step runs under bf16 autocast (its first loss moves from fp32's by bf16
    rounding, at most 2e-2 relative, and not zero), and each result names the dtype and the device's bf16 flags."""
    results = {}
    for dtype in ("fp32", "bf16"):
        cfg = StepConfig(model=str(folders / "gpt2"), batch=2, seq=16, warmup=0, steps=1, dtype=dtype)
        results[dtype] = {row: run_row(row, cfg) for row in ROWS}
    for row in ROWS:
        bf16, fp32 = results["bf16"][row], results["fp32"][row]
        assert bf16["dtype"] == "bf16" and bf16["config"]["dtype"] == "bf16" and fp32["dtype"] == "fp32"
        assert bf16["bf16_support"] == bf16_support("cpu").as_dict() and "avx512_bf16" in bf16["bf16_support"]
        assert bf16["first_loss"] != fp32["first_loss"], row
        assert bf16["first_loss"] == pytest.approx(fp32["first_loss"], rel=2e-2), row
    with pytest.raises(ValueError, match="StepConfig.dtype 'fp16': expected one of"):
        build_step("floor", StepConfig(model=str(folders / "gpt2"), dtype="fp16"))


@pytest.mark.parametrize(
    "quick, dtype, want",
    [(True, "fp32", {"float32"}), (True, "bf16", {"bfloat16"}), (False, "fp32", {"float32"}),
     (False, "bf16", {"bfloat16", "float32"})],
)  # fmt: skip
def test_the_cpu_layer_table_gains_bf16_rows(quick, dtype, want):
    assert {str(case.dtype).removeprefix("torch.") for case in cases("cpu", quick, dtype)} == want
