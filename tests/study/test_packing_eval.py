"""Packed evaluation: the validation loss, the label-logit accuracy and ``predict_split``'s one forward (label logits
and generation) under ``--packing`` give the padded batch's numbers and texts, on fp64 GPT-2 and Llama; under
``prefix`` the batch's common prompt prefix is embedded once, and generation continues from its keys and values.

Tolerance: label logits and the loss within 1e-10 relative (fp64; the layouts sum in different orders), generated
texts equal. Small random models with weights drawn wide, so that the text depends on the prompt and a wrong cache or
position changes it; the session's synthetic tokenizer and reviews.
"""

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from lora_fast.study.data import load_splits
from lora_fast.study.evaluate import label_accuracy, predict_split, score_split, val_loss
from lora_fast.study.packing import common_prefix
from lora_fast.study.prompts import INSTRUCTIONS, encode_split, label_token_ids
from tests.helpers import tiny_gpt2_config, tiny_llama_config

N, MAX_LENGTH, GEN_TOKENS, BATCH = 24, 96, 3, 8


def tiny(family: str, vocab: int):
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=vocab, initializer_range=0.2))
    else:
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=vocab, initializer_range=0.2))
    return model.double().eval()


@pytest.fixture(scope="module")
def split(tokenizer, data_dir):
    rows = load_splits(str(data_dir))["test"][:N]
    return encode_split(rows, tokenizer, INSTRUCTIONS["default"], MAX_LENGTH)


def relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ref.norm() > 0
    return float((ours - ref).norm() / ref.norm())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_predictions_are_the_padded_ones(family, tokenizer, split):
    model = tiny(family, len(tokenizer))
    kw = dict(batch_size=BATCH, gen_tokens=GEN_TOKENS, max_length=MAX_LENGTH)
    off = predict_split(model, tokenizer, split, **kw, packing="off")
    assert len(off.shared) == N and len(set(off.generated.values())) > N // 3  # the text depends on the prompt
    for mode in ("prefix", "flat", "auto"):
        ours = predict_split(model, tokenizer, split, **kw, packing=mode)
        assert ours.shared == off.shared and ours.generated == off.generated, mode
        for i, ref in off.label_logits.items():
            assert relative(ours.label_logits[i], ref) <= 1e-10, (mode, i)
    alone = predict_split(model, tokenizer, split, **kw, share=False, packing="prefix")  # the label pass packed
    for i, ref in off.label_logits.items():
        assert relative(alone.label_logits[i], ref) <= 1e-10, i
    assert alone.generated == off.generated
    assert score_split(model, tokenizer, split, **kw, packing="auto") == score_split(model, tokenizer, split, **kw)


@pytest.mark.parametrize("mode", ["flat", "prefix"])
def test_packed_validation_loss_and_label_accuracy(mode, tokenizer, split):
    model = tiny("llama", len(tokenizer))
    pad, labels = tokenizer.pad_token_id, label_token_ids(tokenizer)
    ref = val_loss(model, split.sequences, split.targets, pad, BATCH)
    assert abs(val_loss(model, split.sequences, split.targets, pad, BATCH, packing=mode) - ref) <= 1e-10 * ref
    acc = label_accuracy(model, split.sequences, split.labels, labels, pad, BATCH, packing=mode)
    assert acc == label_accuracy(model, split.sequences, split.labels, labels, pad, BATCH)


def test_the_common_prefix_is_embedded_once_and_generation_continues_from_it(tokenizer, split):
    """Counted at the token embedding: under ``prefix`` each batch embeds its common prefix as one row, then the
    rows' own tokens, then one column per new token; ``off`` embeds every prompt whole."""
    model = tiny("gpt2", len(tokenizer))
    shapes = []
    model.get_input_embeddings().register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape)))
    kw = dict(batch_size=N, gen_tokens=GEN_TOKENS, max_length=MAX_LENGTH)
    predict_split(model, tokenizer, split, **kw, packing="prefix")
    p = common_prefix(split.sequences)
    longest = max(map(len, split.sequences))
    assert p >= 10  # "Instruction: ...\nText:" at least
    assert shapes[:2] == [(1, p), (N, longest - p)] and shapes[2:] == [(N, 1)] * GEN_TOKENS
    shapes.clear()
    predict_split(model, tokenizer, split, **kw, packing="off")
    assert shapes[0] == (N, longest) and len(shapes) == 1 + GEN_TOKENS
