"""Shared test set-up.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before triton is first
imported: this file is loaded before any test module, so it decides here.
"""

import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_DIR = SHARED / "data" / "gpt2-tokenizer"
DATA_DIR = SHARED / "data" / "rotten_tomatoes"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tier: no CUDA device on this machine")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer from ../shared/data/gpt2-tokenizer (50,257 tokens)."""
    if not TOKENIZER_DIR.is_dir():
        pytest.fail(f"the GPT-2 tokenizer folder is missing: {TOKENIZER_DIR}")
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(TOKENIZER_DIR))
    tok.pad_token = tok.eos_token
    return tok


def tiny_gpt2_config(**overrides):
    """A small random GPT-2 config with the real vocabulary (50,257 tokens)."""
    from transformers import GPT2Config

    kw = dict(
        vocab_size=50257,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    kw.update(overrides)
    return GPT2Config(**kw)
