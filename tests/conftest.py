"""Shared test set-up.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before triton is first
imported: this file is loaded before any test module, so it decides here.
"""

import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton fixes a kernel's mode (interpreted or compiled) when the kernel is defined: import them now, so that a test
# which later unsets TRITON_INTERPRET (to check the refusal without it) cannot leave them compiled for a missing GPU.
import lora_fast.kernels.lora_backward  # noqa: E402, F401
import lora_fast.kernels.lora_forward  # noqa: E402, F401  (the two import every other kernel module)
from tests import synthetic  # noqa: E402  (after the interpreter switch)
from tests.helpers import require_data  # noqa: E402

# Fixtures of the data tier: a test that asks for one of them needs the real files (tests.helpers.require_data).
DATA_TIER_FIXTURES = {"real_data_dir", "real_tokenizer_dir", "gpt2_tokenizer"}


def pytest_collection_modifyitems(items):
    """Mark the data tier's tests ``data`` (``pytest -m data`` runs the tier alone)."""
    for item in items:
        if DATA_TIER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.data)


@pytest.fixture(scope="session")
def real_data_dir():
    """The real Rotten Tomatoes splits (data tier)."""
    return require_data()[0]


@pytest.fixture(scope="session")
def real_tokenizer_dir():
    """The real GPT-2 BPE tokenizer's folder (data tier)."""
    return require_data()[1]


@pytest.fixture(scope="session")
def gpt2_tokenizer(real_tokenizer_dir):
    """The real GPT-2 BPE tokenizer (50,257 tokens; data tier), padding with its eos."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(real_tokenizer_dir))
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained in the session (``tests.synthetic``): for tests that need *a* tokenizer."""
    return synthetic.make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """The session's synthetic tokenizer, padding with its eos (as the study pads GPT-2)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Made-up labelled reviews as train/validation/test.jsonl (``tests.synthetic``): for tests that need *some*
    labelled text."""
    return synthetic.make_splits(tmp_path_factory.mktemp("data"))


class Corpus(NamedTuple):
    """Labelled reviews (train/validation/test.jsonl), a GPT-2-layout tokenizer's folder, and that tokenizer loaded."""

    data_dir: Path
    tokenizer_dir: Path
    tokenizer: object


@pytest.fixture(scope="session", params=["stand-in", pytest.param("real", marks=pytest.mark.data)])
def corpus(request) -> Corpus:
    """The stand-ins, then the real files (data tier): for tests of the study's text handling that should hold on any
    GPT-2-layout tokenizer and data set, and are kept on the real ones too."""
    names = ("data_dir", "tokenizer_dir", "tokenizer")
    if request.param == "real":
        names = ("real_data_dir", "real_tokenizer_dir", "gpt2_tokenizer")
    return Corpus(*(request.getfixturevalue(name) for name in names))
