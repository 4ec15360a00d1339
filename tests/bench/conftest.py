"""Fixtures of the benchmark tools' tests (bench/)."""

import pytest

from lora_fast.study.tiny import make_tiny_gpt2


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer_dir):
    """A saved random GPT-2 (2 layers, width 64, the stand-in tokenizer), as the study's tests have it."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "gpt2", tokenizer_dir)
