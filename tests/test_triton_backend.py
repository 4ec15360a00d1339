"""Model level: a tiny random GPT-2 with LoRA on the triton backend against the reference backend.

On CPU the kernels run under the interpreter (bf16 dot and cast quirks aside, see
tests/kernels/test_triton_kernels.py); dropout is 0 here because the two backends draw their masks differently
(torch's generator vs Philox), and the per-layer tests already check triton's dropout against the spec with its own
mask.
"""

import copy

import pytest
import torch
from transformers import GPT2LMHeadModel

from lora_fast import apply_lora
from lora_fast.kernels.utils import interpreting
from lora_fast.triton_backend import config
from tests.helpers import tiny_gpt2_config

pytestmark = pytest.mark.skipif(
    not interpreting(), reason="CPU tier: runs on CPU tensors under TRITON_INTERPRET=1 only"
)

TARGETS = ["c_attn", "attn.c_proj"]  # Conv1D, one of them square (768x768 in GPT-2 small)


@pytest.fixture(autouse=True)
def _ieee(monkeypatch):
    monkeypatch.setattr(config, "fp32_precision", "ieee")


def _models():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    models = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(1)  # the same lora_A draws for both models
        m = apply_lora(copy.deepcopy(base), TARGETS, r=4, alpha=8, dropout=0.0, backend=backend)
        for name, p in m.named_parameters():  # B starts at zero; make it non-zero so the LoRA path counts
            if "lora_B" in name:
                p.data.normal_(0, 0.2)
        models[backend] = m
    return models


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_logits_and_lora_grads_match_reference():
    models = _models()
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(3))
    out = {}
    for backend, m in models.items():
        loss = m(ids, labels=ids).loss
        loss.backward()
        out[backend] = (m(ids).logits.detach(), _lora_grads(m))
    ref_logits, ref_grads = out["reference"]
    logits, grads = out["triton"]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * 2 * len(TARGETS)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_adamw_loss_curves_match():
    """20 AdamW steps from the same start: the two backends' loss curves agree step by step."""
    models = _models()
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(4))
    curves = {}
    for backend, m in models.items():
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(20):
            loss = m(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[backend] = torch.tensor(losses)
    assert curves["reference"][-1] < curves["reference"][0] - 0.05  # it trains at all
    torch.testing.assert_close(curves["triton"], curves["reference"], rtol=1e-4, atol=1e-4)
