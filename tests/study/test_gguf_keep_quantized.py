"""``--keep-quantized``: a GGUF file's quantised weights kept packed (``lora_fast.gguf.load_gguf_model``) on a tiny
Llama written as llama.cpp writes one (``tests.gguf_files``: every packed format, a Q5_1 layer kept float, the head
tied to the Q8_0 embedding or a Q6_K head of its own), and the same as a Qwen2 (float q/k/v biases).

The packed model computes the float model transformers' GGUF loader builds: logits and LoRA gradients equal in fp64
(``torch.equal``); an adapter trained on the packed base by ``train_sentiment.py --keep-quantized`` loads on the float
model, ours and PEFT's, with the same logits (fp32, within 1e-5); such a run resumes from its checkpoint to the
uninterrupted run's adapter; ``merge_and_unload`` gives a float model with the same logits (within 1e-3 absolute
+ 1e-4 relative: the merged weight is rounded once more, on logits of magnitude ~10).
"""

import json

import pytest
import torch

import train_sentiment
from lora_fast import apply_lora, load_adapter, lora_modules, merge_and_unload
from lora_fast.gguf import PackedEmbedding, PackedLinear, packed_modules, weight_bytes
from lora_fast.study.causal_lm import LastTokenLM, load_causal_lm
from lora_fast.study.prompts import label_token_ids
from tests.gguf_files import write_tiny_llama

pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package (pip install gguf)")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", params=["llama-tied", "llama-untied", "qwen2-tied"])
def tiny_gguf(request, tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    arch, tied = request.param.split("-")
    return write_tiny_llama(path, vocab, tied=tied == "tied", arch=arch)


def _batch(tokenizer):
    enc = tokenizer(["a gorgeous witty film", "dull"], return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return enc["input_ids"], mask, positions, mask.sum(1) - 1


def test_packed_model_is_the_float_model_fp64(tiny_gguf, tokenizer_dir, capsys):
    packed, tokenizer = load_causal_lm(str(tiny_gguf), str(tokenizer_dir), keep_quantized=True)
    assert "blk.1.ffn_down.weight (model.layers.1.mlp.down_proj.weight, Q5_1) is dequantised" in capsys.readouterr().out
    dense, _ = load_causal_lm(str(tiny_gguf), str(tokenizer_dir))
    kinds = {type(m).__name__ + ":" + m.qtype for _, m in packed_modules(packed)}
    assert {"PackedEmbedding:Q8_0", "PackedLinear:Q4_0", "PackedLinear:Q4_1", "PackedLinear:Q5_0",
            "PackedLinear:Q8_0", "PackedLinear:Q4_K", "PackedLinear:Q6_K"} <= kinds  # fmt: skip
    assert type(packed.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert isinstance(packed.lm_head, PackedLinear) and isinstance(packed.model.embed_tokens, PackedEmbedding)
    assert (packed.lm_head.tied_to is packed.model.embed_tokens) == packed.config.tie_word_embeddings
    q_proj = packed.model.layers[0].self_attn.q_proj
    assert (q_proj.bias is not None) == (packed.config.model_type == "qwen2")  # Qwen2's F32 biases beside the blocks
    assert weight_bytes(packed) < 0.3 * weight_bytes(dense)
    packed, dense = packed.double(), dense.double()
    ids, mask, positions, last = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(
            packed(input_ids=ids, attention_mask=mask).logits, dense(input_ids=ids, attention_mask=mask).logits
        )
    labels = label_token_ids(tokenizer)
    for model in (packed, dense):
        torch.manual_seed(0)
        apply_lora(model, TARGETS, r=4, alpha=8, dropout=0.1)
        for _, layer in lora_modules(model):
            torch.nn.init.normal_(layer.lora_B, std=0.05)
        model.train()
    outs = []
    for model in (packed, dense):
        torch.manual_seed(1)
        y = LastTokenLM(model)(ids, mask, positions, last, labels)
        y.square().sum().backward()
        outs.append([y.detach()] + [p.grad for _, layer in lora_modules(model) for p in (layer.lora_A, layer.lora_B)])
    assert len(outs[0]) == 1 + 2 * 2 * len(TARGETS)  # y, then dA and dB of every target in both layers
    for got, want in zip(*outs, strict=True):
        assert torch.equal(got, want)


def _args(model, tokenizer_dir, data_dir, out, steps, *extra):
    return ["--model", str(model), "--tokenizer", str(tokenizer_dir), "--data-dir", str(data_dir), "--out", str(out),
            "--max-steps", str(steps), "--train-subset", "32", "--max-val", "8", "--max-test", "8", "--batch-size",
            "4", "--eval-every", "2", "--lr", "5e-3", "--no-generation", "--no-zero-shot", "--checkpoint-every", "2",
            "--lora-dropout", "0.1", "--targets", *TARGETS, *extra]  # fmt: skip


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_trained_on_packed_base_resumes_and_loads_on_the_float_model(tiny_gguf, tokenizer_dir, data_dir, tmp_path):
    from peft import PeftModel

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train_sentiment.main(_args(tiny_gguf, tokenizer_dir, data_dir, full, 4, "--keep-quantized")) == 0
    assert json.loads((full / "config.json").read_text())["keep_quantized"] is True
    args = _args(tiny_gguf, tokenizer_dir, data_dir, cut, 4, "--keep-quantized")
    assert train_sentiment.main([*args, "--stop-after-step", "2"]) == 0
    assert train_sentiment.main([*args, "--resume"]) == 0
    a, b = _adapter(full / "adapter_last"), _adapter(cut / "adapter_last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it trained

    packed, tokenizer = load_causal_lm(str(tiny_gguf), str(tokenizer_dir), keep_quantized=True)
    ids, mask, _, _ = _batch(tokenizer)
    logits = {}
    for name in ("packed", "ours", "peft"):
        model = packed if name == "packed" else load_causal_lm(str(tiny_gguf), str(tokenizer_dir))[0]
        if name == "peft":
            model = PeftModel.from_pretrained(model, str(full / "adapter_last"))
        else:
            load_adapter(model, full / "adapter_last")
        with torch.no_grad():
            logits[name] = model.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits["ours"], logits["packed"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["peft"], logits["packed"], rtol=1e-5, atol=1e-5)
    merged = merge_and_unload(packed)
    assert not packed_modules(merged) and all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids, attention_mask=mask).logits, logits["packed"], rtol=1e-4, atol=1e-3
        )


def test_keep_quantized_refusals(tiny_gguf, tokenizer_dir, data_dir, tmp_path, capsys):
    args = _args(tiny_gguf, tokenizer_dir, data_dir, tmp_path / "a", 1, "--keep-quantized", "--method", "full")
    assert train_sentiment.main(args) == 2
    assert "--keep-quantized keeps a GGUF file's weights packed and frozen; --method full" in capsys.readouterr().err
    assert train_sentiment.main(_args(tmp_path, tokenizer_dir, data_dir, tmp_path / "b", 1, "--keep-quantized")) == 2
    assert f"--model {tmp_path} is no GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_torchrun_two_processes_on_a_packed_base_match_one(tiny_gguf, tokenizer_dir, data_dir, tmp_path):
    """DDP over a packed model (its packed buffers not broadcast: every process loaded them from the file) gives the
    one-process run's adapter (within 1e-5: the gradient is averaged in another order)."""
    import os
    import shutil
    import subprocess

    from tests.helpers import OFFLINE_ENV, ROOT

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    extra = ["--keep-quantized", "--grad-accum", "2", "--lora-dropout", "0"]
    assert train_sentiment.main(_args(tiny_gguf, tokenizer_dir, data_dir, tmp_path / "one", 2) + extra) == 0
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", str(ROOT / "train_sentiment.py"),
         *_args(tiny_gguf, tokenizer_dir, data_dir, tmp_path / "two", 2), *extra],
        capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV}, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _adapter(tmp_path / "one" / "adapter_last"), _adapter(tmp_path / "two" / "adapter_last")
    assert one.keys() == two.keys() and one
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
