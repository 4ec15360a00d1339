"""LoRALinear and the model-level API (``lora_fast.model``) on small random HF models: targets, tied weights, merging,
state_dict keys and save_pretrained."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2LMHeadModel

import lora_fast
from lora_fast import AdapterError, LoRALinear, apply_lora, disable_lora, load_adapter, merge_lora, unmerge_lora
from tests.helpers import model_snapshot, tiny_gpt2_config, tiny_llama_config, unchanged_since
from tests.peft_models import logits_on_ids, peft_adapter, randomise_lora, small_gpt2


@pytest.fixture
def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config()).eval()


def _ids(n=2, t=9, seed=0):
    return torch.randint(0, 50257, (n, t), generator=torch.Generator().manual_seed(seed))


def _randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_fast.lora_modules(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


def test_fresh_lora_gives_base_output_exactly(gpt2):
    ids = _ids()
    base = gpt2(ids).logits
    apply_lora(gpt2, ["attn.c_attn", "attn.c_proj"], r=4, alpha=8)
    assert torch.equal(gpt2(ids).logits, base)


def test_suffix_matching_follows_peft(gpt2):
    apply_lora(copy.deepcopy(gpt2), "attn.c_attn", r=2, alpha=2)
    m = apply_lora(copy.deepcopy(gpt2), "attn.c_attn", r=2, alpha=2)
    names = [n for n, _ in lora_fast.lora_modules(m)]
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    m = apply_lora(copy.deepcopy(gpt2), ["c_proj"], r=2, alpha=2)
    names = {n for n, _ in lora_fast.lora_modules(m)}
    assert names == {f"transformer.h.{i}.{p}.c_proj" for i in range(2) for p in ("attn", "mlp")}


def test_only_lora_trains(gpt2):
    apply_lora(gpt2, ["c_attn"], r=4, alpha=8)
    trainable = {n for n, p in gpt2.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.c_attn.lora_{ab}" for i in range(2) for ab in "AB"}


def test_unknown_target_lists_close_candidates(gpt2):
    before = copy.deepcopy(gpt2.state_dict())
    with pytest.raises(ValueError, match=r"'attn.c_atn' matches no module.*attn.c_attn"):
        apply_lora(gpt2, ["attn.c_atn"], r=4, alpha=8)
    assert not any(True for _ in lora_fast.lora_modules(gpt2))
    assert all(p.requires_grad for p in gpt2.parameters())
    assert all(torch.equal(v, gpt2.state_dict()[k]) for k, v in before.items())


def test_non_linear_target_and_double_apply_refused(gpt2):
    with pytest.raises(TypeError, match="ln_1.*LayerNorm"):
        apply_lora(gpt2, ["ln_1"], r=4, alpha=8)
    apply_lora(gpt2, ["c_attn"], r=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(gpt2, ["c_attn"], r=4, alpha=8)


def test_weight_is_held_by_reference_not_copied(gpt2):
    conv = gpt2.transformer.h[0].attn.c_attn
    apply_lora(gpt2, ["c_attn"], r=4, alpha=8)
    layer = gpt2.transformer.h[0].attn.c_attn
    assert layer.base is conv
    assert layer.weight.data_ptr() == conv.weight.data_ptr() and layer.weight.shape == (96, 32)


def test_init_and_scaling():
    lin = nn.Linear(64, 48)
    layer = LoRALinear(lin, r=16, alpha=32)
    assert layer.scaling == 2.0 and torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / 64**0.5  # kaiming_uniform(a=√5) on fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 3
    assert LoRALinear(lin, r=16, alpha=32, use_rslora=True).scaling == 8.0
    assert "r=16" in repr(layer) and "layout=Linear" in repr(layer)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_merge_unmerge_round_trip(gpt2, backend):
    ids = _ids()
    apply_lora(gpt2, ["c_attn", "c_proj"], r=4, alpha=8, backend=backend)
    _randomise_lora(gpt2)
    w0 = {n: m.base.weight.clone() for n, m in lora_fast.lora_modules(gpt2)}
    out = gpt2(ids).logits
    merge_lora(gpt2)
    assert all(m.merged for _, m in lora_fast.lora_modules(gpt2))
    torch.testing.assert_close(gpt2(ids).logits, out, rtol=1e-5, atol=1e-5)
    unmerge_lora(gpt2)
    for n, m in lora_fast.lora_modules(gpt2):
        assert torch.equal(m.base.weight, w0[n])  # the pre-merge weight comes back bit for bit
    assert torch.equal(gpt2(ids).logits, out)


def test_eval_does_not_merge(gpt2):
    apply_lora(gpt2, ["c_attn"], r=4, alpha=8)
    gpt2.train()
    gpt2.eval()
    assert not any(m.merged for _, m in lora_fast.lora_modules(gpt2))


def test_disable_lora_gives_base_output(gpt2):
    ids = _ids()
    base = gpt2(ids).logits
    apply_lora(gpt2, ["c_attn", "c_proj"], r=4, alpha=8)
    _randomise_lora(gpt2)
    tuned = gpt2(ids).logits
    assert not torch.allclose(tuned, base)
    with disable_lora(gpt2):
        assert torch.equal(gpt2(ids).logits, base)
    assert torch.equal(gpt2(ids).logits, tuned)
    merge_lora(gpt2)
    merged = gpt2(ids).logits
    with disable_lora(gpt2):
        assert torch.equal(gpt2(ids).logits, base)
    assert all(m.merged for _, m in lora_fast.lora_modules(gpt2))
    assert torch.equal(gpt2(ids).logits, merged)


def test_gradients_reach_lora_only(gpt2):
    apply_lora(gpt2, ["c_attn"], r=4, alpha=8, dropout=0.1)
    gpt2.train()
    _randomise_lora(gpt2)
    gpt2(_ids(), labels=_ids()).loss.backward()
    for n, p in gpt2.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n
        if p.grad is not None:
            assert torch.count_nonzero(p.grad) > 0, n


def test_backends_agree_on_gpt2(gpt2):
    apply_lora(gpt2, ["c_attn", "c_proj"], r=4, alpha=8, dropout=0.2)
    _randomise_lora(gpt2)
    gpt2.train()
    ids = _ids()
    grads = {}
    for backend in ("reference", "torch"):
        lora_fast.set_backend(gpt2, backend)
        gpt2.zero_grad()
        torch.manual_seed(42)  # the dropout seeds come from torch's generator
        loss = gpt2(ids, labels=ids).loss
        loss.backward()
        grads[backend] = (loss.detach(), [p.grad.clone() for p in gpt2.parameters() if p.requires_grad])
    torch.testing.assert_close(grads["torch"][0], grads["reference"][0])
    for a, b in zip(grads["torch"][1], grads["reference"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_set_backend_refuses_unknown_names_before_changing_a_layer(gpt2):
    apply_lora(gpt2, ["c_attn", "c_proj"], r=2, alpha=2, backend="torch")
    for name in ("cuda", "Triton", None):
        with pytest.raises(ValueError, match=rf"unknown backend {name!r}; choose one of \('auto', 'reference',"):
            lora_fast.set_backend(gpt2, name)
    assert {layer.backend for _, layer in lora_fast.lora_modules(gpt2)} == {"torch"}
    assert lora_fast.set_backend(gpt2, "reference") is gpt2
    assert {layer.backend for _, layer in lora_fast.lora_modules(gpt2)} == {"reference"}


def test_print_trainable_parameters_gpt2_small(capsys):
    from transformers import GPT2Config

    model = GPT2LMHeadModel(GPT2Config())
    apply_lora(model, ["c_attn"], r=8, alpha=16)
    line = lora_fast.print_trainable_parameters(model)
    assert line == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
    assert capsys.readouterr().out.strip() == line


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_non_gpt2_linear_models(family):
    from transformers import BertConfig, BertModel, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "bert":
        model = BertModel(
            BertConfig(
                vocab_size=100,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        )
        targets = ["query", "value"]
    else:
        model = LlamaForCausalLM(tiny_llama_config())
        targets = ["q_proj", "v_proj"]
    model.eval()
    ids = torch.randint(0, 100, (2, 7))
    out = lambda: model(ids)[0]  # noqa: E731
    base = out()
    apply_lora(model, targets, r=4, alpha=8)
    assert len(list(lora_fast.lora_modules(model))) == 4
    assert torch.equal(out(), base)
    _randomise_lora(model)
    assert not torch.allclose(out(), base)
    with disable_lora(model):
        assert torch.equal(out(), base)


def test_lora_layers_follow_the_models_mode(gpt2):
    ids = _ids()
    apply_lora(gpt2, ["c_attn"], r=4, alpha=8, dropout=0.5)
    _randomise_lora(gpt2)
    assert not any(m.training for _, m in lora_fast.lora_modules(gpt2))
    assert torch.equal(gpt2(ids).logits, gpt2(ids).logits)  # eval: no dropout
    gpt2.train()
    assert not torch.equal(gpt2(ids).logits, gpt2(ids).logits)


# ---------------------------------------------------------------- tied weights


def test_lora_on_a_tied_weight_is_refused(tmp_path):
    model = small_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    snap = model_snapshot(model)
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to \['transformer.wte.weight'\]"):
        apply_lora(model, ["c_attn", "lm_head"], r=4, alpha=8)
    assert unchanged_since(model, snap) and all(p.requires_grad for p in model.parameters())
    # A PEFT adapter on lm_head of a tied model: refused at load as well.
    peft_adapter(tmp_path / "adapter", "gpt2", target_modules=["lm_head"])
    with pytest.raises(AdapterError, match="tied"):
        load_adapter(small_gpt2(), tmp_path / "adapter")
    # Untied, lm_head takes LoRA, and merging it leaves the embedding alone.
    untied = apply_lora(small_gpt2(tie_word_embeddings=False), ["lm_head"], r=4, alpha=8)
    randomise_lora(untied)
    wte = untied.transformer.wte.weight.clone()
    lora_fast.merge_lora(untied)
    assert torch.equal(untied.transformer.wte.weight, wte)


# ---------------------------------------------------------------- merge_and_unload, save_pretrained


def test_merge_and_unload_saves_and_reloads_as_a_plain_model(tmp_path):
    model = apply_lora(small_gpt2(), ["c_attn", "c_proj"], r=4, alpha=8)
    randomise_lora(model)
    tuned = logits_on_ids(model)
    plain = lora_fast.merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules()) and not hasattr(plain, "lora_config")
    assert set(plain.state_dict()) == set(small_gpt2().state_dict())
    torch.testing.assert_close(logits_on_ids(plain), tuned, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path / "merged")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits_on_ids(reloaded), logits_on_ids(plain))


def test_wrapped_model_state_dict_keeps_the_original_keys(tmp_path):
    model = apply_lora(small_gpt2(), ["c_attn"], r=4, alpha=8)
    randomise_lora(model)
    keys = set(model.state_dict())
    assert keys == set(small_gpt2().state_dict()) | {
        f"transformer.h.{i}.attn.c_attn.lora_{ab}" for i in (0, 1) for ab in "AB"
    }
    # state_dict -> load_state_dict into another wrapped model: the same model.
    other = apply_lora(small_gpt2(seed=5), ["c_attn"], r=4, alpha=8)
    other.load_state_dict(model.state_dict())
    assert torch.equal(logits_on_ids(other), logits_on_ids(model))
    # A merged model saved with save_pretrained reloads (plain) as the merged model: its weights, original keys.
    lora_fast.merge_lora(model)
    model.save_pretrained(tmp_path / "wrapped")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "wrapped").eval()
    assert torch.equal(logits_on_ids(reloaded), logits_on_ids(model))
    # ... but a merged state_dict never goes under LoRA again (the update would count twice), neither from memory nor
    # from the safetensors file save_pretrained wrote (which keeps no state_dict metadata: the flag is a key).
    with pytest.raises(RuntimeError, match="saved from a merged LoRA layer"):
        apply_lora(small_gpt2(), ["c_attn"], r=4, alpha=8).load_state_dict(model.state_dict())
    from_file = load_file(str(tmp_path / "wrapped" / "model.safetensors"))
    assert all(bool(from_file[f"transformer.h.{i}.attn.c_attn.lora_merged"]) for i in (0, 1))
    with pytest.raises(RuntimeError, match="saved from a merged LoRA layer"):
        apply_lora(small_gpt2(), ["c_attn"], r=4, alpha=8).load_state_dict(from_file, strict=False)
    with pytest.raises(RuntimeError, match="unmerge_lora before load_state_dict"):
        model.load_state_dict(other.state_dict())
    lora_fast.unmerge_lora(model)
    assert set(model.state_dict()) == keys  # unmerged: no flag key


# ---------------------------------------------------------------- partial targets


def test_apply_lora_follows_peft_on_partly_matching_targets():
    model = small_gpt2()
    with pytest.warns(UserWarning, match=r"target 'q_proj' matches no module of GPT2LMHeadModel"):
        apply_lora(model, ["c_attn", "q_proj"], r=4, alpha=8)
    assert [n for n, _ in lora_fast.lora_modules(model)] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]
    with pytest.raises(ValueError, match=r"'q_proj' matches no module.*'v_proj' matches no module"):
        apply_lora(small_gpt2(), ["q_proj", "v_proj"], r=4, alpha=8)
