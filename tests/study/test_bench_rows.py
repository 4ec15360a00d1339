"""The model-step benchmark's rows (bench/model_step.py) on small GPT-2 and Llama folders: every row computes the same
first loss (the same model and batch; LoRA starts as the base model), the floor trains nothing and its backward
reaches the input embeddings, and each row uses its model type's LoRA targets."""

import pytest
import torch

from bench.model_step import ROWS, StepConfig, build_step, run_row
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
