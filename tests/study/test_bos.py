"""Prompts are encoded as the model's tokenizer encodes text by default: a tokenizer that puts a BOS before every text
(Llama 3, Mistral, Gemma, Phi) gets it once at the start of every sequence the model sees (training, validation, both
scorings, few-shot, DPO), and a tokenizer that adds nothing (GPT-2, SmolLM2) gets the ids it always got.

The BOS tokenizer is the session's synthetic one with a ``<s>`` token that its post-processor puts before each text,
as Llama-family tokenizers do; the EOS tokenizer appends ``</s>`` instead (never added to a prompt)."""

import pytest
import torch
from tokenizers import processors
from transformers import AutoTokenizer

import train_sentiment
from lora_fast.study import dpo
from lora_fast.study.errors import UsageError
from lora_fast.study.evaluate import _generation_ids
from lora_fast.study.prompts import (
    INSTRUCTIONS,
    build_prompt,
    encode_example,
    encode_prompt,
    encode_split,
    label_token_ids,
    text_prefix,
)
from lora_fast.study.tiny import make_tiny_gpt2

ROWS = [{"text": "a gripping , funny film .", "label": 1}, {"text": "dull and far too long .", "label": 0}]


def _with_template(tokenizer_dir, folder, token: str, single: str):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": [token]})
    tid = tok.convert_tokens_to_ids(token)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B", special_tokens=[(token, tid)]
    )
    tok.save_pretrained(folder)
    out = AutoTokenizer.from_pretrained(str(folder))
    out.pad_token = out.eos_token
    return out, tid


@pytest.fixture(scope="module")
def bos(tokenizer_dir, tmp_path_factory):
    """``(tokenizer, bos id, folder)``: ``tokenizer.encode(text)`` is ``[bos] + the text's ids``."""
    folder = tmp_path_factory.mktemp("bos-tokenizer")
    tok, bos_id = _with_template(tokenizer_dir, folder, "<s>", "<s> $A")
    assert tok.encode("Label:") == [bos_id, *tok.encode("Label:", add_special_tokens=False)]
    return tok, bos_id, folder


def _starts_with_one_bos(ids, bos_id) -> bool:
    ids = list(ids)
    return ids[:1] == [bos_id] and bos_id not in ids[1:]


def test_the_prefix_is_what_the_tokenizer_adds_before_a_text(tokenizer, tokenizer_dir, bos, tmp_path):
    tok, bos_id, _ = bos
    assert text_prefix(tokenizer) == []  # GPT-2's kind: nothing
    assert text_prefix(tok) == [bos_id]
    eos_tok, eos_id = _with_template(tokenizer_dir, tmp_path / "eos", "</s>", "$A </s>")
    assert eos_tok.encode("Label:")[-1] == eos_id and text_prefix(eos_tok) == []  # an appended EOS is never used
    prompt = build_prompt("fine .", INSTRUCTIONS["default"])
    assert eos_id not in encode_prompt(eos_tok, prompt, 256)


def test_every_encoding_path_starts_with_exactly_one_bos(bos):
    tok, bos_id, _ = bos
    instruction, shots = INSTRUCTIONS["default"], [("great fun .", 1), ("a mess .", 0)]
    for few in ((), shots):  # few-shot: one BOS before the instruction, none between the blocks
        split = encode_split(ROWS, tok, instruction, 256, few)
        for prompt, seq in zip(split.prompts, split.sequences, strict=True):
            assert _starts_with_one_bos(seq, bos_id)
            assert seq[1:] == tok.encode(prompt, add_special_tokens=False)
    example = encode_example(tok, split.prompts[0], 1)
    assert _starts_with_one_bos(example["input_ids"], bos_id) and example["input_ids"][-1] == label_token_ids(tok)[1]
    for ids in _generation_ids(tok, split.prompts, 4, 256):  # the study's generation metric
        assert _starts_with_one_bos(ids, bos_id)
    texts = [r["text"] for r in ROWS] * 4
    for ids in dpo.make_prompts(texts, tok, 4, 2, 3):  # the DPO policy's prompts
        assert _starts_with_one_bos(ids, bos_id) and 3 <= len(ids) <= 4
        (text,) = dpo.sample_texts(tok, [(ids, [5, tok.eos_token_id])])
        assert bos_id not in tok.encode(text, add_special_tokens=False)


def test_truncation_keeps_the_bos_and_the_label_anchor(bos):
    tok, bos_id, _ = bos
    prompt = build_prompt("long " * 200 + ".", INSTRUCTIONS["complex"])
    anchor = tok.encode("\nLabel:", add_special_tokens=False)
    for max_length in (8, 40):
        ids = encode_prompt(tok, prompt, max_length)
        assert len(ids) == max_length and _starts_with_one_bos(ids, bos_id) and ids[-len(anchor) :] == anchor
    with pytest.raises(UsageError, match="no room"):
        encode_prompt(tok, prompt, 1)


def test_the_dpo_scorer_reads_one_bos_per_left_padded_row(bos):
    tok, bos_id, _ = bos
    seen = []

    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
            seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True))
            return type("Out", (), {"logits": torch.zeros(input_ids.shape[0], 1, len(tok))})()

    dpo.sentiment_scores(Scorer(), tok, ["fine .", "a much longer and duller text ."], lambda t: t, (1, 2))
    assert len(seen) == 2 and all(_starts_with_one_bos(ids, bos_id) for ids in seen)


def test_the_script_feeds_the_model_one_bos_per_sequence(bos, data_dir, tmp_path, monkeypatch):
    """train_sentiment.py end to end (padded batches, so each row is one sequence): every sequence the GPT-2 body
    reads in training, validation and both scorings starts with the BOS, once; generated tokens are not checked."""
    from transformers.models.gpt2 import modeling_gpt2

    tok, bos_id, folder = bos
    model_dir = make_tiny_gpt2(tmp_path / "tiny", folder, n_layer=1, n_embd=32)
    rows, forward = [], modeling_gpt2.GPT2Model.forward

    def recording(self, *args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and input_ids.shape[1] > 1:  # not a generation step over one new token
            mask = kwargs.get("attention_mask")
            mask = torch.ones_like(input_ids) if mask is None else mask
            rows.extend(row[m.bool()].tolist() for row, m in zip(input_ids, mask, strict=True))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_gpt2.GPT2Model, "forward", recording)
    args = ["--model", str(model_dir), "--data-dir", str(data_dir), "--out", str(tmp_path / "run"), "--max-steps", "2",
            "--train-subset", "16", "--max-val", "8", "--max-test", "8", "--batch-size", "4", "--eval-every", "2",
            "--packing", "off", "--dtype", "fp32", "--gen-tokens", "2"]  # fmt: skip
    assert train_sentiment.main(args) == 0
    assert len(rows) > 8
    bad = [r[:6] for r in rows if not (r[:1] == [bos_id] and bos_id not in r[1:])]
    assert not bad, f"{len(bad)} of {len(rows)} sequences do not start with exactly one BOS: {bad[:3]}"
