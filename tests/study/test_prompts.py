"""The prompt builder and its tokenisation, with the stand-in tokenizer and with the real GPT-2 one (data tier)."""

import pytest

from lora_fast.study.errors import UsageError
from lora_fast.study.prompts import (
    IGNORE_INDEX,
    INSTRUCTIONS,
    build_prompt,
    encode_example,
    encode_prompt,
    label_token_ids,
    resolve_instruction,
)

TEXT = "the rock is destined to be the 21st century's new \" conan \" and that he's going to make a splash"


def test_label_words_are_single_known_tokens(gpt2_tokenizer):
    assert label_token_ids(gpt2_tokenizer) == (4633, 3967)


@pytest.mark.parametrize("name", sorted(INSTRUCTIONS))
@pytest.mark.parametrize("label", [0, 1])
def test_exactly_one_label_token_after_label_colon(corpus, name, label):
    tok = corpus.tokenizer
    prompt = build_prompt(TEXT, INSTRUCTIONS[name])
    assert prompt.startswith(f"Instruction: {INSTRUCTIONS[name]}\nText: {TEXT}\n") and prompt.endswith("\nLabel:")
    ex = encode_example(tok, prompt, label)
    target = label_token_ids(tok)[label]
    # The label token is the last one and the only unmasked one; everything before it is the prompt, unchanged.
    assert ex["input_ids"][-1] == target
    assert [t for t in ex["labels"] if t != IGNORE_INDEX] == [target]
    assert ex["labels"][:-1] == [IGNORE_INDEX] * (len(ex["input_ids"]) - 1)
    assert tok.decode(ex["input_ids"][:-1]) == prompt
    # Tokenising prompt and label word together gives the same ids: training sees the text the study's template makes.
    assert tok.encode(prompt + (" negative", " positive")[label]) == ex["input_ids"]


def test_few_shot_prompt_holds_solved_examples_then_query():
    prompt = build_prompt("query text", "Classify.", shots=[("great fun", 1), ("dull", 0)])
    assert prompt == (
        "Instruction: Classify.\nText: great fun\nLabel: positive\n\nText: dull\nLabel: negative\n\n"
        "Text: query text\nLabel:"
    )
    assert prompt.count("Instruction:") == 1


def test_truncation_keeps_the_end_of_the_prompt(corpus):
    tok = corpus.tokenizer
    prompt = build_prompt("word " * 300, INSTRUCTIONS["default"])
    ids = encode_prompt(tok, prompt, 64)
    assert len(ids) == 64 and tok.decode(ids).endswith("\nLabel:")
    ex = encode_example(tok, prompt, 1, max_length=64)
    assert len(ex["input_ids"]) == 64 and ex["input_ids"][-1] == label_token_ids(tok)[1]


def test_instruction_resolution():
    assert resolve_instruction("simple1") == INSTRUCTIONS["simple1"]
    assert resolve_instruction("default", "My own words.") == "My own words."
    assert "cot" in INSTRUCTIONS and len(set(INSTRUCTIONS.values())) == len(INSTRUCTIONS)
    with pytest.raises(ValueError, match="unknown prompt 'nope'"):
        resolve_instruction("nope")


class GreedyTokenizer:
    """Longest-match tokenisation over a fixed vocabulary (every single character included): a stand-in whose label
    words can be made one token, several, or one token that merges differently after "Label:"."""

    name_or_path = "greedy"

    def __init__(self, words):
        chars = sorted({c for w in [*words, "Label: positive negative"] for c in w})
        self.vocab = [*words, *chars]

    def encode(self, text, add_special_tokens=False):
        ids = []
        while text:
            best = max((w for w in self.vocab if text.startswith(w)), key=len)
            ids.append(self.vocab.index(best))
            text = text[len(best) :]
        return ids

    def convert_ids_to_tokens(self, ids):
        return [self.vocab[i] for i in ids]


def test_label_words_must_be_one_token_also_after_label_colon():
    assert label_token_ids(GreedyTokenizer(["Label", " positive", " negative"])) == (2, 1)
    with pytest.raises(UsageError, match=r"label word ' negative' is 2 token\(s\) \[' neg', 'ative'\].*'greedy'"):
        label_token_ids(GreedyTokenizer(["Label", " positive", " neg", "ative"]))
    # One token alone, but ":" and " positive" merge after "Label:": training would not see the text the prompt makes.
    merged = r"label word ' positive' is 1 token\(s\).*'Label: positive' is \['Label', ': positive'\]"
    with pytest.raises(UsageError, match=merged):
        label_token_ids(GreedyTokenizer(["Label", " positive", " negative", ": positive"]))
