"""The efficient step: last-token logits equal HF's, padding side does not matter, the loss is HF's masked LM loss,
the GELU swap keeps the values, accumulation equals one big batch, and the data order is a pure function."""

import copy

import pytest
import torch
from conftest import tiny_gpt2_config

from lora_fast import apply_lora
from lora_fast.prompts import INSTRUCTIONS, build_prompt, encode_example
from lora_fast.training import (
    LastTokenLM,
    NonFiniteLossError,
    collate,
    label_logits,
    make_optimizer,
    micro_batches,
    step_indices,
    train_step,
    use_fused_gelu,
)

TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "dull",
    "if you sometimes like to go to the movies to have fun , wasabi is a good place to start .",
]


@pytest.fixture(scope="module")
def model():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    apply_lora(m, ["attn.c_attn", "attn.c_proj"], r=4, alpha=8)
    for _, p in m.named_parameters():  # non-zero B, so LoRA takes part
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return m


def _examples(tok):
    return [encode_example(tok, build_prompt(t, INSTRUCTIONS["default"]), i % 2) for i, t in enumerate(TEXTS)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_logits_equal_hf_full_logits(model, gpt2_tokenizer, side):
    prompts = [ex["input_ids"][:-1] for ex in _examples(gpt2_tokenizer)]
    batch = collate(prompts, gpt2_tokenizer.pad_token_id, side)
    ours = label_logits(model, batch["input_ids"], batch["attention_mask"])
    assert ours.shape == (3, 50257)
    for i, ids in enumerate(prompts):  # each prompt alone, unpadded
        ref = model(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=1e-5)
    two = label_logits(model, batch["input_ids"], batch["attention_mask"], label_ids=(4633, 3967))
    torch.testing.assert_close(two, ours[:, [4633, 3967]])


def test_loss_equals_hf_masked_lm_loss(model, gpt2_tokenizer):
    exs = _examples(gpt2_tokenizer)
    batch = collate([ex["input_ids"][:-1] for ex in exs], gpt2_tokenizer.pad_token_id)
    head = LastTokenLM(model)
    logits = head(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["last_index"])
    ours = torch.nn.functional.cross_entropy(logits, torch.tensor([ex["input_ids"][-1] for ex in exs]))
    hf = torch.stack([model(torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss for ex in exs])
    torch.testing.assert_close(ours, hf.mean(), atol=1e-5, rtol=1e-5)


def test_fused_gelu_swap_keeps_outputs():
    from transformers import GPT2LMHeadModel
    from transformers.activations import NewGELUActivation

    torch.manual_seed(0)
    m = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    ids = torch.randint(0, 50257, (2, 9))
    ref = m(ids).logits
    assert use_fused_gelu(m) == 2
    assert not any(isinstance(x, NewGELUActivation) for x in m.modules())
    assert all(isinstance(b.mlp.act, torch.nn.GELU) and b.mlp.act.approximate == "tanh" for b in m.transformer.h)
    torch.testing.assert_close(m(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_accumulated_micro_batches_equal_one_batch(model, gpt2_tokenizer):
    exs = _examples(gpt2_tokenizer) * 2
    seqs, targets = [ex["input_ids"][:-1] for ex in exs], [ex["input_ids"][-1] for ex in exs]
    results = []
    for chunks in ([[0, 1, 2, 3, 4, 5]], [[0, 1], [2, 3], [4, 5]]):
        m = copy.deepcopy(model).train()
        # SGD, so the update is the gradient itself (Adam's first step is ~lr·sign(g), blind to its size).
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
        batches = [collate([seqs[i] for i in c], gpt2_tokenizer.pad_token_id) for c in chunks]
        labels = [torch.tensor([targets[i] for i in c]) for c in chunks]
        res = train_step(LastTokenLM(m), opt, batches, labels, grad_clip=1.0)
        results.append((res.loss, res.grad_norm, [p.detach().clone() for p in m.parameters() if p.requires_grad]))
    (l1, n1, p1), (l2, n2, p2) = results
    assert l1 == pytest.approx(l2, rel=1e-5) and n1 == pytest.approx(n2, rel=1e-4)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_non_finite_loss_stops_before_the_update(model, gpt2_tokenizer):
    m = copy.deepcopy(model).train()
    opt = make_optimizer(m, lr=1e-2)
    with torch.no_grad():
        m.transformer.h[0].attn.c_attn.lora_A.fill_(float("nan"))
    before = [p.detach().clone() for p in m.parameters() if p.requires_grad]
    batch = collate([[1, 2, 3]], gpt2_tokenizer.pad_token_id)
    with pytest.raises(NonFiniteLossError):
        train_step(LastTokenLM(m), opt, [batch], [torch.tensor([3967])])
    after = [p.detach() for p in m.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True) if not a.isnan().any())
    assert not opt.state  # the optimizer never stepped


def test_data_order_is_a_pure_function_of_seed_and_step():
    steps = [step_indices(10, 4, s, seed=1) for s in range(5)]
    assert steps == [step_indices(10, 4, s, seed=1) for s in range(5)]
    stream = sum(steps, [])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # epochs
    assert stream[:10] != stream[10:20] and steps != [step_indices(10, 4, s, seed=2) for s in range(5)]


def test_micro_batches_group_by_length_and_shard_over_ranks():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    idx = list(range(8))
    chunks = micro_batches(idx, lengths, 2, group_by_length=True)
    assert chunks == [[2, 6], [4, 0], [7, 3], [5, 1]]
    r0, r1 = (micro_batches(idx, lengths, 2, True, rank, 2) for rank in (0, 1))
    assert r0 + r1 != chunks and sorted(r0 + r1) == sorted(chunks)
    assert micro_batches(idx, lengths, 2, group_by_length=False) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError):
        micro_batches(idx, lengths, 3)
