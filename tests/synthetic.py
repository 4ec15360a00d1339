"""A tokenizer and a labelled data set made in the test session, for tests that need *a* tokenizer and *some* movie
reviews but not the real GPT-2 BPE or the real Rotten Tomatoes splits (those are the data tier: ``tests.helpers``).

``make_tokenizer(folder)`` trains a byte-level BPE tokenizer in the GPT-2 layout (ByteLevel pre-tokenizer, no
prefix space, ``<|endoftext|>`` as bos/eos/unk) on the sentences below and the study's prompts, so the label
words `` positive`` / `` negative`` are one token each, and saves it as a ``GPT2TokenizerFast`` folder.
``make_splits(folder)`` writes ``train``/``validation``/``test.jsonl`` of made-up reviews whose label follows from
their words; most are one short sentence, some run on for several clauses (prompts of 29 to about 90 tokens, as real
reviews vary). Both are deterministic and take well under a second.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ("gorgeous", "witty", "moving", "brilliant", "charming", "tender", "funny", "smart", "rich", "warm")
NEGATIVE = ("dull", "tedious", "clumsy", "shallow", "bland", "messy", "stale", "silly", "lifeless", "grating")
SUBJECTS = ("the film", "this movie", "the script", "the cast", "the story", "its direction", "the ending", "it")
VERBS = ("is", "feels", "seems", "remains", "turns out")
ADVERBS = ("", "very ", "rather ", "quite ", "utterly ", "often ")
ASPECTS = ("the pacing", "the score", "the dialogue", "every scene", "the acting", "the camera work")
# Clauses added to a review: mostly none, sometimes many, so that a few prompts are long enough to be cut.
CLAUSES = (0, 0, 0, 0, 1, 1, 2, 3, 6, 9)
SIZES = {"train": 256, "validation": 64, "test": 64}
EOS = "<|endoftext|>"


def review(rng: random.Random, label: int) -> str:
    """One made-up review sentence whose adjectives all carry ``label``'s sentiment (1 positive, 0 negative)."""
    words = POSITIVE if label else NEGATIVE
    first, second = rng.sample(words, 2)
    parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(ADVERBS) + first, "and", second]
    for _ in range(rng.choice(CLAUSES)):
        parts += [",", rng.choice(("and", "while")), rng.choice(ASPECTS), rng.choice(VERBS), rng.choice(words)]
    return " ".join(parts) + rng.choice((" .", " !", " , really ."))


def make_rows(n: int, seed: int) -> list[dict]:
    """``n`` rows ``{"text", "label"}``, labels alternating, so every split holds both classes."""
    rng = random.Random(seed)
    return [{"text": review(rng, i % 2), "label": i % 2} for i in range(n)]


def make_splits(folder: str | Path, seed: int = 0) -> Path:
    """Write ``train``/``validation``/``test.jsonl`` (``SIZES`` rows each) into ``folder`` and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate(SIZES.items()):
        rows = make_rows(n, seed + i)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def _corpus() -> list[str]:
    """The tokenizer's training text: reviews, the study's prompts around them, and the label words often enough
    that BPE merges each into one token (after a space, as they follow ``"Label:"``)."""
    from lora_fast.study.prompts import INSTRUCTIONS, build_prompt

    rng = random.Random(1)
    lines = []
    for i in range(600):
        label = i % 2
        text = review(rng, label)
        instruction = INSTRUCTIONS[rng.choice(sorted(INSTRUCTIONS))]
        lines.append(build_prompt(text, instruction) + (" negative", " positive")[label])
    return lines


def make_tokenizer(folder: str | Path, vocab_size: int = 600) -> Path:
    """Train the byte-level BPE tokenizer (see the module docstring) and save it to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    for word in (" positive", " negative"):
        ids = tokenizer.encode(word)
        assert len(ids) == 1, f"the synthetic tokenizer splits {word!r} into {ids}"
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    return folder
