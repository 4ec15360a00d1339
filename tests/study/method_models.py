"""What the tests of BitFit, bottleneck adapters and their files share: GPT-2 models and state snapshots."""

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from tests.helpers import tiny_gpt2_config

GPT2_SMALL_TOTAL = 124_439_808  # wte 50257·768 + wpe 1024·768 + 12 blocks · 7,087,872 + ln_f 1536 (lm_head tied)


def gpt2_small() -> GPT2LMHeadModel:
    """GPT-2 small's architecture (GPT2Config() defaults) on the meta device: the right shapes, no memory."""
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config())


def tiny(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config()).eval()


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
