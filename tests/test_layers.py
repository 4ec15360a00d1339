"""``LoRALinear`` (``lora_fast.layers``): merge and unmerge exact to the bit, and bad arguments refused by name before
a model changes."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_fast
from lora_fast import LoRALinear, apply_lora
from tests.helpers import model_snapshot, unchanged_since
from tests.peft_models import logits_on_ids, randomise_lora, small_gpt2

# ---------------------------------------------------------------- merge / unmerge exactness


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_the_weights_bit_for_bit(dtype):
    model = apply_lora(small_gpt2().to(dtype), ["c_attn", "c_proj"], r=4, alpha=8)
    randomise_lora(model)
    before = {n: layer.base.weight.clone() for n, layer in lora_fast.lora_modules(model)}
    base = logits_on_ids(model)
    for _ in range(3):
        lora_fast.merge_lora(model)
        assert not torch.equal(model.transformer.h[0].attn.c_attn.base.weight, before["transformer.h.0.attn.c_attn"])
        with lora_fast.disable_lora(model):
            assert all(torch.equal(layer.base.weight, before[n]) for n, layer in lora_fast.lora_modules(model))
        lora_fast.unmerge_lora(model)
    assert all(torch.equal(layer.base.weight, before[n]) for n, layer in lora_fast.lora_modules(model))
    assert all(layer.premerge_weight is None for _, layer in lora_fast.lora_modules(model))  # no copy once unmerged
    assert torch.equal(logits_on_ids(model), base)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_fp64_merge_stays_fp64(conv1d):
    # The update is computed in the weight's own precision: an fp64 layer merged through fp32 would move by ~1e-8.
    torch.manual_seed(0)
    base = Conv1D(48, 64) if conv1d else nn.Linear(64, 48)
    layer = LoRALinear(base.double(), r=8, alpha=16).eval()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    x = torch.randn(5, 64, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)
    assert layer.delta_weight().dtype == torch.float64


# ---------------------------------------------------------------- bad arguments, partial targets


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": True}, "rank r must be an integer >= 1, got True"),
        ({"r": 2.0}, "rank r must be an integer"),
        ({"alpha": math.nan}, r"alpha must be a finite non-zero real number .*, got nan"),
        ({"alpha": math.inf}, r"alpha must be a finite non-zero real number .*, got inf"),
        ({"alpha": "8"}, r"alpha must be a finite non-zero real number .*, got '8'"),
        ({"alpha": 0}, r"alpha must be a finite non-zero real number \(alpha 0 makes the scaling 0.*got 0"),
        ({"dropout": 1.5}, r"LoRA dropout must be in \[0, 1\), got 1.5"),
        ({"dropout": math.nan}, r"LoRA dropout must be in \[0, 1\), got nan"),
        ({"dropout": "0.1"}, r"LoRA dropout must be a real number \(int or float, not bool\), got str '0.1'"),
        ({"dropout": True}, r"LoRA dropout must be a real number \(int or float, not bool\), got bool True"),
        ({"dropout": 1e-6}, r"LoRA dropout = 1e-06 rounds to 0 at the dropout mask's resolution"),
        ({"use_rslora": 1}, "use_rslora must be a bool"),
    ],
)
def test_bad_lora_arguments_are_refused_by_name(kwargs, message):
    args = {"r": 4, "alpha": 8, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):  # TypeError: a number that is no number
        LoRALinear(nn.Linear(8, 8), **args)
    model = small_gpt2()
    snap = model_snapshot(model)
    with pytest.raises((ValueError, TypeError), match=message):
        apply_lora(model, ["c_attn"], **args)
    assert unchanged_since(model, snap)
