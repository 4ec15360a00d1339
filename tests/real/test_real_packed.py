"""SmolLM2-135M-Instruct kept packed (``lora_fast.gguf``, ``--keep-quantized``): every quantised tensor of the real
file (Q4_1 projections, the Q8_0 embedding) dequantises bit for bit as the ``gguf`` package does, by torch and by the
Triton kernel (under the interpreter: one projection and 64 embedding rows); the packed model holds at most a quarter
of the fp32 model's weight bytes and computes its logits (fp32, within 1e-5 absolute + relative: the same GEMMs on
the same values); LoRA gradients equal the float model's within 1e-5."""

import numpy as np
import pytest
import torch

from lora_fast import apply_lora, lora_modules
from lora_fast.gguf import QTYPES, PackedWeight, dequantize_rows, load_gguf_model, weight_bytes
from lora_fast.study.causal_lm import LastTokenLM

pytestmark = pytest.mark.real
TOL = {"rtol": 1e-5, "atol": 1e-5}


def test_every_quantised_tensor_dequantises_as_gguf_does(smollm2_file):
    import gguf

    from lora_fast.gguf.triton_op import triton_dequantize

    reader = gguf.GGUFReader(str(smollm2_file))
    quantised = [t for t in reader.tensors if t.tensor_type.name in QTYPES]
    assert {t.tensor_type.name for t in quantised} == {"Q4_1", "Q8_0"} and len(quantised) == 211
    for t in quantised:
        ref = gguf.dequantize(t.data, t.tensor_type)
        ours = dequantize_rows(torch.from_numpy(np.array(t.data)), t.tensor_type.name).numpy()
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), t.name
    by_name = {t.name: t for t in quantised}
    for name, rows in (("blk.0.ffn_up.weight", None), ("token_embd.weight", 64)):
        t = by_name[name]
        data = torch.from_numpy(np.array(t.data[:rows]))
        w = PackedWeight(data, t.tensor_type.name, (data.shape[0], int(t.shape[0])))
        assert torch.equal(triton_dequantize(w, torch.float32).view(torch.int32), w.dequantize().view(torch.int32))


def test_packed_model_is_the_float_model(smollm2, smollm2_file):
    dense, tokenizer = smollm2
    packed = load_gguf_model(smollm2_file)
    assert weight_bytes(packed) <= 0.25 * weight_bytes(dense)
    batch = tokenizer(["a gorgeous , witty , seductive movie .", "lame"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(packed(**batch).logits, dense(**batch).logits, **TOL)


def test_lora_gradients_on_the_packed_model(smollm2_copy, smollm2_file, smollm2):
    tokenizer = smollm2[1]
    models = [load_gguf_model(smollm2_file), smollm2_copy]
    enc = tokenizer(["a gorgeous , witty , seductive movie . Label:"], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions, last = torch.arange(ids.shape[1])[None], torch.tensor([ids.shape[1] - 1])
    grads = []
    for model in models:
        torch.manual_seed(0)
        apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=8, alpha=16)
        for _, layer in lora_modules(model):
            torch.nn.init.normal_(layer.lora_B, std=0.02)
        LastTokenLM(model.train())(ids, mask, positions, last, [3524, 2731]).square().sum().backward()
        grads.append([p.grad for _, layer in lora_modules(model) for p in (layer.lora_A, layer.lora_B)])
    assert len(grads[0]) == 2 * 3 * 30
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, **TOL)
