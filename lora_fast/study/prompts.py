"""Prompts for the sentiment task and their tokenisation.

The study's template is ``"Instruction: {instruction}\\nText: {text}\\nLabel: {label}"`` with the label words
`` positive`` / `` negative`` (GPT-2 ids 3967 / 4633, SmolLM2 ids 2731 / 3524: one token each, leading space
included; ``label_token_ids`` refuses a tokenizer where they are not). A prompt here ends at
``"Label:"``; the target is exactly one token, the label word, right after it. The instruction wordings below are
ours (the study's exact texts are not available); ``docs/TRAINING.md`` lists them.

Few-shot prompts put the instruction once, then ``k`` solved examples, then the query, separated by blank lines.

Every prompt is encoded as the model's tokenizer encodes text by default at its start (``text_prefix``): the
beginning-of-sequence token of Llama 3, Mistral, Gemma, Phi and others, once, before the instruction; nothing for
GPT-2 and SmolLM2, whose tokenizers add nothing. What a tokenizer appends by default (an end-of-sequence token, for
some) is never added: the prompt goes on with the label word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lora_fast.study.errors import UsageError

__all__ = [
    "EncodedSplit",
    "INSTRUCTIONS",
    "LABEL_WORDS",
    "IGNORE_INDEX",
    "build_prompt",
    "label_token_ids",
    "encode_prompt",
    "encode_example",
    "encode_split",
    "encode_text",
    "resolve_instruction",
    "text_prefix",
]

# Index = dataset label: 0 negative, 1 positive.
LABEL_WORDS = (" negative", " positive")
IGNORE_INDEX = -100

INSTRUCTIONS = {
    "default": "Determine the sentiment of the following movie review. Answer positive or negative.",
    "simple1": "Is this review positive or negative?",
    "simple2": "Classify the sentiment.",
    "similar": "Decide whether the following film review expresses a positive or a negative opinion.",
    "complex": (
        "You are an expert film critic. Read the sentence taken from a movie review below, weigh the reviewer's "
        "praise against any criticism, irony or sarcasm, and decide whether the overall opinion it expresses about "
        "the film is positive or negative. Answer with exactly one word: positive or negative."
    ),
    # Zero-shot chain of thought: a model may write its reasoning and end with the label word.
    "cot": (
        "Determine the sentiment of the following movie review. Think step by step about what the reviewer says, "
        "then give the final answer, positive or negative, after 'Label:'."
    ),
}


def resolve_instruction(prompt: str | None = None, instruction: str | None = None) -> str:
    """The instruction text: ``instruction`` verbatim when given, else ``INSTRUCTIONS[prompt]``."""
    if instruction:
        return instruction
    if prompt not in INSTRUCTIONS:
        raise ValueError(f"unknown prompt {prompt!r}; choose one of {sorted(INSTRUCTIONS)} or pass --instruction TEXT")
    return INSTRUCTIONS[prompt]


def _block(text: str, label: int | None = None) -> str:
    answer = "" if label is None else LABEL_WORDS[int(label)]
    return f"Text: {text}\nLabel:{answer}"


def build_prompt(text: str, instruction: str, shots: Sequence[tuple[str, int]] = ()) -> str:
    """``"Instruction: …\\nText: {text}\\nLabel:"``, with each ``(text, label)`` of ``shots`` solved before it."""
    blocks = [_block(t, y) for t, y in shots] + [_block(text)]
    return f"Instruction: {instruction}\n" + "\n\n".join(blocks)


def label_token_ids(tokenizer) -> tuple[int, int]:
    """``(negative_id, positive_id)``: the single token of each label word (4633 / 3967 with GPT-2's tokenizer, 3524 /
    2731 with SmolLM2's). Each word must be exactly one token, the same one right after ``"Label:"`` as alone (so the
    prompt and the word tokenised together give the prompt's ids plus that token), and the two must differ;
    otherwise a UsageError names the word and its tokens."""
    anchor = tokenizer.encode("Label:", add_special_tokens=False)
    ids = []
    for word in LABEL_WORDS:
        tok = tokenizer.encode(word, add_special_tokens=False)
        after = tokenizer.encode("Label:" + word, add_special_tokens=False)
        if len(tok) != 1 or after != anchor + tok:
            raise UsageError(
                f"label word {word!r} is {len(tok)} token(s) {tokenizer.convert_ids_to_tokens(tok)} with the "
                f"tokenizer of {_name(tokenizer)}, and 'Label:{word}' is {tokenizer.convert_ids_to_tokens(after)}: "
                f"the study needs each label word to be exactly one token, the same one after 'Label:'; use a "
                f"model whose tokenizer has it as one token"
            )
        ids.append(tok[0])
    if ids[0] == ids[1]:
        raise UsageError(f"the label words {LABEL_WORDS} are the same token {ids[0]} with {_name(tokenizer)}")
    return ids[0], ids[1]


def _name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)


def text_prefix(tokenizer) -> list[int]:
    """The ids ``tokenizer`` puts before any text by default (``tokenizer.encode(text)`` is these, then the text's own
    ids, then anything it appends): ``[bos_token_id]`` for Llama 3, Mistral, Gemma, Phi; ``[]`` for GPT-2 and SmolLM2.
    A UsageError when the default encoding does not contain the plain one (the prompt's ids would not be the
    model's)."""
    plain = list(tokenizer.encode("Label:", add_special_tokens=False))
    full = list(tokenizer.encode("Label:"))
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    raise UsageError(
        f"the tokenizer of {_name(tokenizer)} encodes 'Label:' as {full} by default and as {plain} without its special "
        f"tokens: the study cannot tell which ids it adds before a text"
    )


def encode_text(tokenizer, text: str, prefix: Sequence[int] | None = None) -> list[int]:
    """``text`` as the model reads the start of a sequence: ``prefix`` (``text_prefix``, computed when None), then the
    text's own ids."""
    prefix = text_prefix(tokenizer) if prefix is None else prefix
    return [*prefix, *tokenizer.encode(text, add_special_tokens=False)]


def encode_prompt(tokenizer, prompt: str, max_length: int, prefix: Sequence[int] | None = None) -> list[int]:
    """Token ids of ``prompt`` after the tokenizer's ``prefix`` (``text_prefix``), cut to ``max_length`` from the left
    of the text, so that the prefix (a BOS) and ``"Label:"`` always stay."""
    prefix = text_prefix(tokenizer) if prefix is None else list(prefix)
    if max_length <= len(prefix):
        raise UsageError(f"max_length {max_length} leaves no room for a prompt after the tokenizer's prefix {prefix}")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return [*prefix, *ids[-(max_length - len(prefix)) :]]


def encode_example(tokenizer, prompt: str, label: int, max_length: int = 1024) -> dict[str, list[int]]:
    """``input_ids`` = prompt + one label token; ``labels`` = IGNORE_INDEX everywhere but that token, for HF's
    shifted LM loss. The efficient step never feeds the label token: it predicts it from the last prompt position."""
    prompt_ids = encode_prompt(tokenizer, prompt, max_length - 1)
    target = label_token_ids(tokenizer)[int(label)]
    return {"input_ids": prompt_ids + [target], "labels": [IGNORE_INDEX] * len(prompt_ids) + [target]}


@dataclass
class EncodedSplit:
    """One split as the model sees it: per example the prompt text, its token ids (cut to the model's length), the
    dataset label (0 negative, 1 positive) and the label word's token id (the training target)."""

    prompts: list[str]
    sequences: list[list[int]]
    labels: list[int]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def encode_split(
    rows: Sequence[dict], tokenizer, instruction: str, max_length: int, shots: Sequence[tuple[str, int]] = ()
) -> EncodedSplit:
    """``rows`` (``{"text", "label"}``) as prompts with ``instruction`` and ``shots``, tokenised (``encode_prompt``)."""
    prompts = [build_prompt(r["text"], instruction, shots) for r in rows]
    labels = [int(r["label"]) for r in rows]
    label_ids, prefix = label_token_ids(tokenizer), text_prefix(tokenizer)
    return EncodedSplit(
        prompts=prompts,
        sequences=[encode_prompt(tokenizer, p, max_length, prefix) for p in prompts],
        labels=labels,
        targets=[label_ids[y] for y in labels],
    )
