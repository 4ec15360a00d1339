"""Scoring a split with one forward over each prompt (``predict_split``, ``score_split``) gives the predictions of the
two passes that ``label_accuracy`` and ``generation_accuracy`` run: the same label-token logits (fp32, to rounding),
the same generated text, so the same accuracies and invalid counts, with either padding side. Examples whose prompt
ids are not the start of their generation ids (a prompt cut from the left, whose generation input is cut shorter; a
tokenizer that merges the prompt's last token with the appended space) and generation settings outside the allow-list
take the two passes. Tiny random models (GPT-2 and Llama) with the stand-in tokenizer on stand-in reviews, and with the
real GPT-2 tokenizer on real test reviews (data tier); their weights are drawn wide (``initializer_range``) so that the
generated text depends on the prompt, and a wrong cache or position shows up as different text.
"""

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from lora_fast.study.data import load_splits, subset
from lora_fast.study.evaluate import generation_accuracy, label_accuracy, predict_split, score_split
from lora_fast.study.prompts import INSTRUCTIONS, encode_split, label_token_ids
from tests.helpers import tiny_gpt2_config, tiny_llama_config

N, MAX_LENGTH, GEN_TOKENS, BATCH = 30, 64, 3, 8
FORCED = 3  # the example whose prompt ids are made not to split

MODELS = {
    "gpt2": lambda vocab: GPT2LMHeadModel(tiny_gpt2_config(vocab_size=vocab, initializer_range=0.2)),
    "llama": lambda vocab: LlamaForCausalLM(tiny_llama_config(vocab_size=vocab, initializer_range=0.2)),
}


def tiny(family: str, tokenizer):
    """A tiny random model of ``family`` over ``tokenizer``'s vocabulary."""
    torch.manual_seed(0)
    return MODELS[family](len(tokenizer)).eval()


def reviews(corpus, n: int = N, max_length: int = MAX_LENGTH):
    """``n`` test reviews of ``corpus`` as prompts cut to ``max_length`` tokens."""
    rows = subset(load_splits(corpus.data_dir)["test"], n, 0)
    return encode_split(rows, corpus.tokenizer, INSTRUCTIONS["default"], max_length)


def todays_scores(model, tokenizer, split, **kw) -> dict:
    """``score_split``'s dict from the two passes' public functions."""
    side, max_length = kw.get("padding_side", "right"), kw.get("max_length", MAX_LENGTH)
    label = label_accuracy(model, split.sequences, split.labels, label_token_ids(tokenizer), tokenizer.pad_token_id,
                           BATCH, padding_side=side)  # fmt: skip
    gen = generation_accuracy(model, tokenizer, split.prompts, split.labels, BATCH, max_new_tokens=GEN_TOKENS,
                              max_length=max_length)  # fmt: skip
    return {"label_acc": label["acc"], "gen_acc": gen["acc"], "gen_invalid": gen["invalid"]}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_forward_gives_the_two_passes_predictions(family, side, corpus):
    tok = corpus.tokenizer
    model, split = tiny(family, tok), reviews(corpus)
    # As a tokenizer that merges the prompt's last token with the appended space would give (SmolLM2's does for a
    # prompt ending in whitespace; GPT-2's never does): prompt ids that are not the start of ``prompt + " "``'s.
    split.sequences[FORCED] = split.sequences[FORCED][:-1] + tok.encode(";")
    cut = {i for i, p in enumerate(split.prompts) if len(tok.encode(p + " ")) > MAX_LENGTH - GEN_TOKENS}
    assert 0 < len(cut) < N // 2 and FORCED not in cut

    kw = dict(batch_size=BATCH, padding_side=side, gen_tokens=GEN_TOKENS, max_length=MAX_LENGTH)
    one = predict_split(model, tok, split, **kw)
    two = predict_split(model, tok, split, share=False, **kw)
    assert two.shared == set() and one.shared == set(range(N)) - cut - {FORCED}
    assert one.label_logits.keys() == two.label_logits.keys() == set(range(N))
    for i in range(N):
        torch.testing.assert_close(one.label_logits[i], two.label_logits[i], atol=1e-5, rtol=1e-5)
        assert int(one.label_logits[i].argmax()) == int(two.label_logits[i].argmax()), i
    assert one.generated == two.generated
    assert len(set(one.generated.values())) > N // 2  # the text depends on the prompt
    assert score_split(model, tok, split, **kw) == todays_scores(model, tok, split, **kw)


def test_each_prompt_runs_one_forward(corpus):
    """Counted at the token embedding: one forward over each batch's prompts, then one column per new token (the
    space, then the first two generated tokens). Two passes would embed each prompt twice."""
    tok = corpus.tokenizer
    model, split = tiny("gpt2", tok), reviews(corpus, n=12, max_length=120)
    widths = []
    model.get_input_embeddings().register_forward_hook(lambda _m, args, _out: widths.append(args[0].shape[1]))
    scores = score_split(model, tok, split, batch_size=5, gen_tokens=GEN_TOKENS, max_length=120)
    assert [w > 1 for w in widths] == ([True] + [False] * GEN_TOKENS) * 3  # batches of 5, 5 and 2
    widths.clear()
    assert score_split(model, tok, split, batch_size=5, generation=False) == {"label_acc": scores["label_acc"]}
    assert len(widths) == 3  # --no-generation: label-logit accuracy's one pass


@pytest.mark.parametrize("setting", [{"num_beams": 2}, {"repetition_penalty": 1.3}])
def test_generation_settings_outside_the_allow_list_take_two_passes(setting, corpus):
    tok = corpus.tokenizer
    model = tiny("gpt2", tok)
    for key, value in setting.items():
        setattr(model.generation_config, key, value)
    split = reviews(corpus, n=6)
    assert predict_split(model, tok, split, batch_size=3, max_length=MAX_LENGTH).shared == set()
    assert score_split(model, tok, split, batch_size=BATCH, max_length=MAX_LENGTH) == todays_scores(model, tok, split)
