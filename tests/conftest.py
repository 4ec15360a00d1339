"""Shared test set-up.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before triton is first
imported: this file is loaded before any test module, so it decides here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton fixes a kernel's mode (interpreted or compiled) when the kernel is defined: import them now, so that a test
# which later unsets TRITON_INTERPRET (to check the refusal without it) cannot leave them compiled for a missing GPU.
import lora_fast.kernels.lora_backward  # noqa: E402, F401
import lora_fast.kernels.lora_forward  # noqa: E402, F401  (the two import every other kernel module)
from tests.helpers import TOKENIZER_DIR  # noqa: E402  (after the interpreter switch)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer (``helpers.TOKENIZER_DIR``, 50,257 tokens)."""
    if not TOKENIZER_DIR.is_dir():
        pytest.fail(f"the GPT-2 tokenizer folder is missing: {TOKENIZER_DIR}")
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(TOKENIZER_DIR))
    tok.pad_token = tok.eos_token
    return tok
