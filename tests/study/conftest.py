"""Fixtures of the study's tests."""

import pytest
import torch

from lora_fast.study.tiny import make_tiny_gpt2


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer_dir):
    """A saved random GPT-2 (2 layers, width 64, the stand-in tokenizer): ``--model`` for short runs of the scripts."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "gpt2", tokenizer_dir)


@pytest.fixture
def ids():
    """Token ids of two sequences of nine, from the real vocabulary's range (GPT-2's 50,257)."""
    return torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(1))
