"""Packed batches on SmolLM2-135M in fp64: the label logits and every LoRA gradient of ``flat`` and ``prefix`` equal
the padded batch's within 1e-10 relative (``RMSNorm64`` in place of HF's fp32 norm: see
``tests/study/test_packing.py``), on real reviews in the study's default prompt, whose instruction the rows share."""

import pytest
import torch
import torch.nn.functional as F

from lora_fast import apply_lora
from lora_fast.study.causal_lm import default_targets
from lora_fast.study.packing import pack_rows, pair_cost
from lora_fast.study.prompts import INSTRUCTIONS, encode_split
from lora_fast.study.training import collate
from tests.study.test_packing import EXACT, assert_same, full_precision_norms, logits_and_grads

pytestmark = pytest.mark.real

TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "the story is lame and the acting is worse .",
    "if you sometimes like to go to the movies to have fun , wasabi is a good place to start .",
    "dull",
]


def test_smollm2_packed_logits_and_lora_gradients_equal_padded(smollm2, smollm2_copy):
    tokenizer = smollm2[1]
    model = full_precision_norms(smollm2_copy).double()
    apply_lora(model, default_targets(model.config.model_type), r=4, alpha=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]
    split = encode_split(rows, tokenizer, INSTRUCTIONS["default"], 256)
    targets = torch.tensor(split.targets)
    ref_logits, ref_grads = logits_and_grads(model, collate(split.sequences, tokenizer.pad_token_id), targets)
    assert F.cross_entropy(ref_logits, targets) > 0
    for share in (False, True):
        batch = pack_rows(split.sequences, tokenizer.pad_token_id, share, pair_cost(model))
        logits, grads = logits_and_grads(model, batch, targets)
        assert_same(logits, ref_logits, what="logits")
        assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 4 * model.config.num_hidden_layers
        for name, grad in grads.items():
            assert_same(grad, ref_grads[name], EXACT, name)
