"""The study's model-side checks: a LoRA target list on the command line must hit what it names."""

import warnings

import pytest
from transformers import GPT2LMHeadModel

from lora_fast import find_targets
from lora_fast.study.causal_lm import check_targets
from lora_fast.study.errors import UsageError
from tests.helpers import tiny_gpt2_config


def test_a_mistyped_target_is_an_error_in_the_scripts_and_a_warning_in_the_library():
    model = GPT2LMHeadModel(tiny_gpt2_config())
    targets = ["attn.c_atn", "attn.c_proj"]
    with pytest.raises(UsageError, match="--targets attn.c_atn attn.c_proj: target 'attn.c_atn' matches no module"):
        check_targets(model, targets)
    with pytest.warns(UserWarning, match="'attn.c_atn' matches no module"):
        assert len(find_targets(model, targets)) == 2  # PEFT's rule: the other target's modules, with a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_targets(model, ["attn.c_attn", "attn.c_proj"])  # a list that hits what it names passes, silently
