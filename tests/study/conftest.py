"""Fixtures of the study's tests."""

import pytest

from lora_fast.study.tiny import make_tiny_gpt2
from tests.helpers import TOKENIZER_DIR


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A saved random GPT-2 (2 layers, width 64, the real tokenizer): ``--model`` for short runs of the scripts."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "gpt2", TOKENIZER_DIR)
