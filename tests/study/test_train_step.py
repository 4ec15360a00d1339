"""The efficient step: last-token logits equal HF's, padding side does not matter, the loss is HF's masked LM loss,
the GELU swap keeps the values, accumulation equals one big batch, and the data order is a pure function."""

import copy
import math

import pytest
import torch

from lora_fast import apply_lora
from lora_fast.study.causal_lm import LastTokenLM, label_logits, use_fused_gelu
from lora_fast.study.errors import NonFiniteError
from lora_fast.study.prompts import INSTRUCTIONS, build_prompt, encode_example, label_token_ids
from lora_fast.study.training import collate, make_optimizer, micro_batches, step_indices, train_step
from tests.helpers import tiny_gpt2_config, tiny_llama_config

TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "dull",
    "if you sometimes like to go to the movies to have fun , wasabi is a good place to start .",
]


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=len(tokenizer))).eval()
    apply_lora(m, ["attn.c_attn", "attn.c_proj"], r=4, alpha=8)
    for _, p in m.named_parameters():  # non-zero B, so LoRA takes part
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return m


def _examples(tok):
    return [encode_example(tok, build_prompt(t, INSTRUCTIONS["default"]), i % 2) for i, t in enumerate(TEXTS)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_logits_equal_hf_full_logits(model, tokenizer, side):
    prompts = [ex["input_ids"][:-1] for ex in _examples(tokenizer)]
    batch = collate(prompts, tokenizer.pad_token_id, side)
    ours = label_logits(model, batch["input_ids"], batch["attention_mask"])
    assert ours.shape == (3, len(tokenizer))
    for i, ids in enumerate(prompts):  # each prompt alone, unpadded
        ref = model(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=1e-5)
    ids = label_token_ids(tokenizer)
    two = label_logits(model, batch["input_ids"], batch["attention_mask"], label_ids=ids)
    torch.testing.assert_close(two, ours[:, list(ids)])


def test_loss_equals_hf_masked_lm_loss(model, tokenizer):
    exs = _examples(tokenizer)
    batch = collate([ex["input_ids"][:-1] for ex in exs], tokenizer.pad_token_id)
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


def test_accumulated_micro_batches_equal_one_batch(model, tokenizer):
    exs = _examples(tokenizer) * 2
    seqs, targets = [ex["input_ids"][:-1] for ex in exs], [ex["input_ids"][-1] for ex in exs]
    results = []
    for chunks in ([[0, 1, 2, 3, 4, 5]], [[0, 1], [2, 3], [4, 5]]):
        m = copy.deepcopy(model).train()
        # SGD, so the update is the gradient itself (Adam's first step is ~lr·sign(g), blind to its size).
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
        batches = [collate([seqs[i] for i in c], tokenizer.pad_token_id) for c in chunks]
        labels = [torch.tensor([targets[i] for i in c]) for c in chunks]
        res = train_step(LastTokenLM(m), opt, batches, labels, grad_clip=1.0)
        results.append((res.loss, res.grad_norm, [p.detach().clone() for p in m.parameters() if p.requires_grad]))
    (l1, n1, p1), (l2, n2, p2) = results
    assert l1 == pytest.approx(l2, rel=1e-5) and n1 == pytest.approx(n2, rel=1e-4)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_non_finite_loss_stops_before_the_update(model, tokenizer):
    m = copy.deepcopy(model).train()
    opt = make_optimizer(m, lr=1e-2)
    with torch.no_grad():
        m.transformer.h[0].attn.c_attn.lora_A.fill_(float("nan"))
    before = [p.detach().clone() for p in m.parameters() if p.requires_grad]
    batch = collate([[1, 2, 3]], tokenizer.pad_token_id)
    with pytest.raises(NonFiniteError):
        train_step(LastTokenLM(m), opt, [batch], [torch.tensor([label_token_ids(tokenizer)[1]])])
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


# ---------------------------------------------------------------- the last block on the label rows only

# Uneven lengths (1 to 14 tokens), so padding covers keys of most rows on either side.
UNEVEN = [[5, 17, 400, 9, 31, 2, 77, 1000, 12, 8, 50, 3, 99, 7], [4, 300], [11], list(range(200, 209))]


def _lora_gpt2(**overrides):
    """A tiny random GPT-2 with LoRA on c_attn and c_proj, weights large enough (init std 0.3) that attention is far
    from uniform: a wrong scale, mask or missing term moves the logits well past 1e-5."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(tiny_gpt2_config(n_layer=3, initializer_range=0.3, **overrides))
    apply_lora(m, ["attn.c_attn", "attn.c_proj"], r=4, alpha=8)
    for _, p in m.named_parameters():  # non-zero B, so LoRA takes part
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    return m


def _rows_seen_by_last_mlp(model):
    """A list that collects the number of rows the last block's MLP sees per call (B·T on the full path)."""
    seen = []
    model.transformer.h[-1].mlp.register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].numel() // args[0].shape[-1])
    )
    return seen


def _logits_loss_grads(model, batch, fast):
    model.zero_grad(set_to_none=True)
    logits = LastTokenLM(model, last_block_rows_only=fast)(**batch)
    target = torch.arange(logits.shape[0]) * 997 % logits.shape[1]
    loss = torch.nn.functional.cross_entropy(logits, target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("inverse_layer_scale", [False, True])
def test_last_block_rows_only_equals_full_path(side, mode, inverse_layer_scale):
    m = _lora_gpt2(scale_attn_by_inverse_layer_idx=inverse_layer_scale)  # all dropouts 0
    m.train(mode == "train")
    seen = _rows_seen_by_last_mlp(m)
    batch = collate(UNEVEN, 50256, side)
    fast = _logits_loss_grads(m, batch, fast=True)
    full = _logits_loss_grads(m, batch, fast=False)
    assert seen == [len(UNEVEN), len(UNEVEN) * batch["input_ids"].shape[1]]  # the fast path ran, on B rows
    torch.testing.assert_close(fast[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], full[1], atol=1e-5, rtol=1e-5)
    assert fast[2].keys() == full[2].keys() and len(fast[2]) == 4 * 3  # A and B of c_attn and c_proj, 3 blocks
    for name, g in full[2].items():
        assert g.abs().max() > 1e-3, name  # every LoRA matrix gets a real gradient
        torch.testing.assert_close(fast[2][name], g, atol=1e-5, rtol=1e-5, msg=name)
    # And both equal HF's own logits at each prompt's last token, each prompt alone and unpadded.
    for i, ids in enumerate(UNEVEN):
        with torch.no_grad():
            ref = m(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(fast[0][i], ref, atol=1e-5, rtol=1e-5)
    assert fast[0].std() > 0.1  # logits far from zero, so the tolerance means something


def test_last_block_rows_only_under_gradient_checkpointing():
    m = _lora_gpt2().train()
    # 5.17 has only the older name; later 5.x warn on it.
    (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
    assert m.transformer.gradient_checkpointing
    seen = _rows_seen_by_last_mlp(m)
    batch = collate(UNEVEN, 50256, "left")
    fast, full = _logits_loss_grads(m, batch, fast=True), _logits_loss_grads(m, batch, fast=False)
    assert seen[0] == len(UNEVEN)
    torch.testing.assert_close(fast[1], full[1], atol=1e-5, rtol=1e-5)
    for name, g in full[2].items():
        torch.testing.assert_close(fast[2][name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_last_block_rows_only_with_dropout_runs_and_drops():
    m = _lora_gpt2(resid_pdrop=0.3, embd_pdrop=0.0, attn_pdrop=0.3)
    seen = _rows_seen_by_last_mlp(m)
    batch = collate(UNEVEN, 50256, "right")
    m.eval()
    ref = _logits_loss_grads(m, batch, fast=True)
    m.train()
    torch.manual_seed(1)
    logits, loss, grads = _logits_loss_grads(m, batch, fast=True)
    assert seen == [len(UNEVEN)] * 2
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert not torch.allclose(logits, ref[0], atol=1e-3)  # dropout is on in train mode
    # Each of the last block's dropouts alone (the earlier blocks' off): the fast path's own dropout moves the logits.
    last = m.transformer.h[-1]
    drops = [last.attn.attn_dropout, last.attn.resid_dropout, last.mlp.dropout]
    for blk in m.transformer.h[:-1]:
        blk.attn.attn_dropout.p = blk.attn.resid_dropout.p = blk.mlp.dropout.p = 0.0
    for on in drops:
        for d in drops:
            d.p = 0.3 if d is on else 0.0
        with torch.no_grad():
            assert not torch.allclose(LastTokenLM(m)(**batch), ref[0], atol=1e-3)
    for d in drops:
        d.p = 0.0
    with torch.no_grad():
        torch.testing.assert_close(LastTokenLM(m)(**batch), ref[0], atol=1e-5, rtol=1e-5)


def test_last_block_rows_only_at_an_inner_position():
    """``last_index`` before the sequence's end (the bench's layout: the label token is in the batch, its logits
    come from the position before): the keys after ``last_index`` are real tokens the query must not see."""
    m = _lora_gpt2().eval()
    seen = _rows_seen_by_last_mlp(m)
    batch = collate(UNEVEN, 50256, "right")
    batch["last_index"] = (batch["last_index"] - 3).clamp(min=0)
    fast, full = _logits_loss_grads(m, batch, fast=True), _logits_loss_grads(m, batch, fast=False)
    assert seen == [len(UNEVEN), len(UNEVEN) * batch["input_ids"].shape[1]]
    torch.testing.assert_close(fast[0], full[0], atol=1e-5, rtol=1e-5)
    for name, g in full[2].items():
        torch.testing.assert_close(fast[2][name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_reorder_and_upcast_attn_takes_the_full_path():
    m = _lora_gpt2(reorder_and_upcast_attn=True).eval()
    m.config._attn_implementation = "eager"  # HF uses the reordered attention with eager only
    seen = _rows_seen_by_last_mlp(m)
    batch = collate(UNEVEN, 50256, "right")
    logits = LastTokenLM(m)(**batch)
    assert seen == [len(UNEVEN) * batch["input_ids"].shape[1]]
    with torch.no_grad():
        torch.testing.assert_close(logits[1], m(torch.tensor([UNEVEN[1]])).logits[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_non_gpt2_model_falls_back_and_works(side):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=1000, num_attention_heads=4, max_position_embeddings=64, initializer_range=0.3
    )
    m = LlamaForCausalLM(config).eval()
    apply_lora(m, ["self_attn.q_proj", "self_attn.v_proj"], r=4, alpha=8)
    calls = []
    m.model.layers[-1].mlp.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[:-1].numel()))
    seqs = [[s % 1000 for s in seq] for seq in UNEVEN]
    batch = collate(seqs, 0, side)
    logits, loss, grads = _logits_loss_grads(m, batch, fast=True)
    assert calls == [len(seqs) * batch["input_ids"].shape[1]]  # the full path
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads.values())
    for i, ids in enumerate(seqs):
        with torch.no_grad():
            ref = m(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=1e-5)


def _poisoned_step(model, tokenizer, scaler=None):
    """One train_step whose loss is finite but whose gradient is NaN (a hook poisons one LoRA gradient)."""
    m = copy.deepcopy(model).train()
    opt = make_optimizer(m, lr=1e-2)
    m.transformer.h[0].attn.c_attn.lora_A.register_hook(lambda g: g * float("nan"))
    before = [p.detach().clone() for p in m.parameters() if p.requires_grad]
    batch = collate([[1, 2, 3]], tokenizer.pad_token_id)
    positive = torch.tensor([label_token_ids(tokenizer)[1]])
    run = lambda: train_step(LastTokenLM(m), opt, [batch], [positive], scaler=scaler)
    return m, opt, before, run


def test_non_finite_gradient_with_a_finite_loss_stops_before_the_update(model, tokenizer):
    m, opt, before, run = _poisoned_step(model, tokenizer)
    with pytest.raises(NonFiniteError, match=r"^the gradient norm is nan \(the loss, [0-9.]+, is finite\)"):
        run()
    assert all(torch.equal(a, b) for a, b in zip(before, [p for p in m.parameters() if p.requires_grad], strict=True))
    assert not opt.state and all(p.grad is None for p in m.parameters())


def test_grad_scaler_skips_a_non_finite_gradient_step(model, tokenizer):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    m, opt, before, run = _poisoned_step(model, tokenizer, scaler)
    res = run()  # fp16 training's path: the scaler skips the step and lowers its scale, the run goes on
    assert not math.isfinite(res.grad_norm) and scaler.get_scale() == 512.0
    assert all(torch.equal(a, b) for a, b in zip(before, [p for p in m.parameters() if p.requires_grad], strict=True))


def test_label_logits_include_lora_on_the_lm_head():
    # An untied Llama with LoRA on q_proj and lm_head: the label rows must come from the head's whole forward (base
    # weight plus its LoRA term), as training's head(h) computes them, not from the base weight's rows alone.
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).eval()
    apply_lora(m, ["q_proj", "lm_head"], r=4, alpha=8)
    for _, p in m.named_parameters():  # non-zero B, so the head's LoRA term is there
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    seqs = [[s % 100 for s in seq] for seq in UNEVEN]
    batch = collate(seqs, 0, "right")
    label_ids = (7, 42)
    with torch.no_grad():
        two = LastTokenLM(m)(**batch, label_ids=label_ids)
        full = LastTokenLM(m)(**batch)
        torch.testing.assert_close(two, full[:, list(label_ids)], atol=1e-6, rtol=1e-6)
        for i, ids in enumerate(seqs):
            ref = m(torch.tensor([ids])).logits[0, -1, list(label_ids)]
            torch.testing.assert_close(two[i], ref, atol=1e-5, rtol=1e-5)
