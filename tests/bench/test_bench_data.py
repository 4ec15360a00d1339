"""The model-step benchmark's data mode (``bench/model_step.py --data``, ``bench/data_batches.py``) at tiny sizes: the
study's batches padded (``lora_fast``, ``floor``) and packed (``lora_fast_packed``) give the same first loss, count
the same real tokens, and the packed layout computes fewer token rows (fewer still under ``prefix``); the HF rows
refuse data mode; ``bench/run.py`` writes the table with its packing line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.model_step import DATA_ROWS, StepConfig, build_step, run_row
from lora_fast.study.tiny import make_tiny_gpt2
from tests.helpers import OFFLINE_ENV, ROOT, tiny_llama_config


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bench-data")
    make_tiny_gpt2(root / "gpt2", tokenizer_dir, n_layer=2, n_embd=32)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    return root


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_data_rows_share_the_first_loss_and_the_packed_one_computes_fewer_rows(folders, data_dir, family):
    cfg = StepConfig(model=str(folders / family), batch=6, warmup=0, steps=2, data=str(data_dir), prompt="complex")
    results = {row: run_row(row, cfg) for row in DATA_ROWS}
    prefix = run_row("lora_fast_packed", StepConfig(**{**cfg.__dict__, "packing": "prefix"}))
    padded = results["lora_fast"]
    for row, result in {**results, "prefix": prefix}.items():
        torch.testing.assert_close(result["first_loss"], padded["first_loss"], atol=1e-5, rtol=1e-5, msg=row)
        assert result["real_tokens_per_step"] == padded["real_tokens_per_step"] > 0, row
        assert result["padded_token_rows_per_step"] == padded["token_rows_per_step"], row
    assert "flat" in results["lora_fast_packed"]["notes"][-1]  # LoRA dropout 0.05: auto packs flat
    assert "prefix" in prefix["notes"][-1]
    assert prefix["token_rows_per_step"] < results["lora_fast_packed"]["token_rows_per_step"]
    assert results["lora_fast_packed"]["token_rows_per_step"] <= padded["token_rows_per_step"]


def test_random_batches_packed_give_the_same_first_loss(folders):
    cfg = StepConfig(model=str(folders / "gpt2"), batch=2, seq=16, warmup=0, steps=1)
    padded, packed = run_row("lora_fast", cfg), run_row("lora_fast_packed", cfg)
    torch.testing.assert_close(packed["first_loss"], padded["first_loss"], atol=1e-5, rtol=1e-5)


def test_rows_without_a_data_mode_refuse_it(folders, data_dir):
    with pytest.raises(ValueError, match="no data mode"):
        build_step("peft", StepConfig(model=str(folders / "gpt2"), data=str(data_dir)))


def test_run_writes_the_data_table(folders, data_dir, tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--model-only", "--model", str(folders / "gpt2"),
           "--data", str(data_dir), "--batch", "4", "--steps", "1", "--warmup", "0", "--rounds", "1",
           "--packing", "prefix", "--json", str(out), "--md", str(tmp_path / "results.md"),
           "--plot", str(tmp_path / "plots")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **OFFLINE_ENV})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["model_step"]}
    assert set(rows) == set(DATA_ROWS)
    md = (tmp_path / "results.md").read_text()
    assert "prompt default" in md and "lora_fast_packed vs lora_fast" in md and "prefix" in md
