"""Packed DPO batches: each pair's prompt is computed once for its chosen and rejected answers (and answers that
start alike share those tokens too), and in fp64 the sequence log-probs, the reference's, the DPO loss, its LoRA
gradients and one ``dpo_step`` equal the padded batch's within 1e-10 relative, on GPT-2 and Llama (Llama with
``RMSNorm64``: see ``test_packing``'s docstring)."""

import copy

import pytest
import torch

from lora_fast import apply_lora
from lora_fast.study.causal_lm import default_targets
from lora_fast.study.dpo import dpo_loss, dpo_step, pack, reference_logprobs, sequence_logprobs
from lora_fast.study.packing import Packing, resolve_packing
from tests.study.test_packing import EXACT, assert_same, make_model

PAD = 0


def pairs(seed: int = 0, vocab: int = 90):
    """Five (prompt, chosen, rejected) triples; two answers start with the same token, one pair shares its prompt
    with another."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    out = [(rand(2 + i), rand(3 + i % 3), rand(5 - i % 2)) for i in range(4)]
    out[1] = (out[1][0], [7] + out[1][1], [7] + out[1][2])
    return out + [(list(out[0][0]), rand(4), rand(2))]


def policy(family: str):
    model = make_model(family)
    apply_lora(model, default_targets(model.config.model_type), r=4, alpha=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model.double().eval()  # as train_dpo.py trains: eval mode, no dropout


def halves(batch_pairs):
    prompts = [p for p, _, _ in batch_pairs] * 2
    return prompts, [c for _, c, _ in batch_pairs] + [r for _, _, r in batch_pairs]


@pytest.mark.parametrize("mode", ["flat", "prefix"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_dpo_equals_padded(family, mode):
    model, batch_pairs = policy(family), pairs()
    packing = Packing(mode, 0.1)
    refs = {m: reference_logprobs(model, batch_pairs, PAD, packing=p) for m, p in (("off", None), (mode, packing))}
    for ours, ref in zip(refs[mode], refs["off"], strict=True):
        assert_same(ours, ref, what="reference log-probs")
    results = {}
    for name, p in (("off", None), (mode, packing)):
        model.zero_grad(set_to_none=True)
        logp = sequence_logprobs(model, pack(*halves(batch_pairs), PAD, packing=p))
        n = len(batch_pairs)
        out = dpo_loss(logp[:n], logp[n:], *refs["off"], beta=0.5)
        out.loss.backward()
        grads = {k: v.grad.clone() for k, v in model.named_parameters() if v.requires_grad}
        results[name] = (logp.detach(), out.loss.detach(), grads)
    (logp, loss, grads), (ref_logp, ref_loss, ref_grads) = results[mode], results["off"]
    assert_same(logp, ref_logp, what="log-probs")
    assert abs(float(loss - ref_loss)) <= EXACT * abs(float(ref_loss))
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert_same(grad, ref_grads[name], what=name)


def test_a_packed_dpo_step_moves_the_weights_as_the_padded_one():
    start, batch_pairs = policy("gpt2"), pairs(seed=1)
    refs = reference_logprobs(start, batch_pairs, PAD)
    weights = {}
    for mode in ("off", "prefix"):
        model = copy.deepcopy(start)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        packing = resolve_packing(model, "auto" if mode == "prefix" else "off", training=True)
        assert packing.mode == mode  # eval mode: no dropout, so auto shares the prompts
        dpo_step(model, optimizer, batch_pairs, *refs, beta=0.5, pad_id=PAD, packing=packing)
        weights[mode] = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    assert_same(weights["prefix"], weights["off"], what="weights after the step")
    assert not torch.equal(weights["off"], torch.cat([p.detach().flatten() for p in start.parameters()
                                                      if p.requires_grad]))  # fmt: skip


def test_a_shared_prompt_is_one_node():
    batch = pack(*halves(pairs()), PAD, packing=Packing("prefix"))
    rows = [list(p) + list(c) for p, c in zip(*halves(pairs()), strict=True)]
    distinct = {tuple(r[: t + 1]) for r in rows for t in range(len(r))}
    assert int((batch["token_index"].flatten().unique()).numel()) == len(distinct) < sum(map(len, rows))
