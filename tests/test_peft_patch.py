"""``lora_fast.patch_peft`` against HF PEFT itself: same logits, gradients, losses, files; PEFT's answer where the op
cannot give it exactly; Trainer and torch.compile."""

import copy
import io
import subprocess
import sys

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import patch_peft, unpatch_peft
from lora_fast import peft_patch as pp
from tests.helpers import ROOT, requires_cuda, tiny_gpt2_config

peft = pytest.importorskip("peft", reason="HF PEFT is a dev dependency: pip install -e '.[dev]'")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]
VOCAB = 128  # Llama and BERT; GPT-2 keeps the real 50,257 of tiny_gpt2_config
FP64 = {"rtol": 1e-10, "atol": 1e-12}  # fp64, patched vs PEFT: the same math in another order of operations


# ---------------------------------------------------------------- models and helpers


def _gpt2(**overrides):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config(**overrides))


# Sizes shared by the tiny Llama and BERT (GPT-2: tests.helpers.tiny_gpt2_config).
_SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_SMALL, num_attention_heads=4, num_key_value_heads=2))


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(**_SMALL, num_attention_heads=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.num_labels = 3
    return BertForSequenceClassification(cfg)


def _config(targets, **kw):
    # init_lora_weights=False: B is random, not zero, so the LoRA term and dA are not trivially zero.
    kw = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False, **kw}
    return LoraConfig(target_modules=targets, **kw)


def _gpt2_peft(dtype=torch.float64, **kw):
    return get_peft_model(_gpt2().to(dtype), _config(GPT2_TARGETS, fan_in_fan_out=True, **kw))


def _ids(n=2, t=9, vocab=50257, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _patched_copy(model, **kw):
    fast = copy.deepcopy(model)
    patch_peft(fast, verbose=False, **kw)
    return fast


def _trainable_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _peft_layers(model):
    """PEFT's lora.Linear layers (patched ones included: a subclass)."""
    return [m for m in model.modules() if isinstance(m, PeftLinear)]


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of lora_linear made by patched layers (so an equality can't pass by always falling back)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return lora_fast.lora_linear(*args, **kwargs)

    monkeypatch.setattr(pp, "lora_linear", spy)
    return calls


# ---------------------------------------------------------------- exactness on three architectures (fp64, p = 0)


def _gpt2_case():
    pm = _gpt2_peft()
    ids = _ids()
    return pm, {"input_ids": ids, "labels": ids}


def _llama_case():
    pm = get_peft_model(_llama().double(), _config(LLAMA_TARGETS))
    ids = _ids(vocab=VOCAB)
    return pm, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _bert_case():
    # bias="all": the base layers' biases train too, so the op's bias gradient is checked against PEFT's.
    pm = get_peft_model(_bert().double(), _config(BERT_TARGETS, task_type="SEQ_CLS", bias="all"))
    ids = _ids(n=3, vocab=VOCAB)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding in one row
    return pm, {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}


@pytest.mark.parametrize("case", [_gpt2_case, _llama_case, _bert_case], ids=["gpt2", "llama", "bert"])
def test_logits_and_gradients_match_peft(case, op_calls):
    peft_model, batch = case()
    peft_model.train()
    fast = _patched_copy(peft_model)
    out_ref = peft_model(**batch)
    out_ref.loss.backward()
    out = fast(**batch)
    out.loss.backward()
    n_layers = len(_peft_layers(fast))
    assert n_layers >= 8 and len(op_calls) == n_layers  # every LoRA layer ran through the op, once
    torch.testing.assert_close(out.logits, out_ref.logits, **FP64)
    ref_grads, grads = _trainable_grads(peft_model), _trainable_grads(fast)
    assert grads.keys() == ref_grads.keys() and any(".lora_A." in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **FP64, msg=name)


def test_triton_backend_matches_peft(monkeypatch, op_calls):
    """The kernels (interpreted on CPU) behind patch_peft: Conv1D weights read through strides, bias gradients."""
    pytest.importorskip("triton", reason="the triton backend needs triton")
    from lora_fast.triton_backend import config

    monkeypatch.setattr(config, "fp32_precision", "ieee")
    peft_model = get_peft_model(_gpt2(), _config(GPT2_TARGETS, fan_in_fan_out=True, bias="all"))
    fast = _patched_copy(peft_model, backend="triton")
    ids = _ids(t=5)
    for model in (peft_model, fast):
        model(input_ids=ids, labels=ids).loss.backward()
    assert set(op_calls) == {"triton"} and len(op_calls) == len(_peft_layers(fast))
    ref_grads = _trainable_grads(peft_model)
    for name, g in _trainable_grads(fast).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------- dropout


def _identity_lora(p, r=64, alpha=128):
    """One PEFT LoRA layer on a 64x64 nn.Linear with A = B = I, so ``y - base(x) = s · drop(x)`` shows the mask."""
    base = nn.Sequential()
    base.add_module("fc", nn.Linear(r, r).double())
    pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["fc"]))
    layer = pm.base_model.model.fc
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(r))
        layer.lora_B["default"].weight.copy_(torch.eye(r))
    patch_peft(pm, verbose=False)
    return pm.train(), layer


def test_dropout_is_peft_formula_with_a_keep_mask(op_calls):
    p, s = 0.3, 2.0
    pm, layer = _identity_lora(p)
    x = torch.randn(256, 64, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    y = pm(x)
    assert len(op_calls) == 1
    base = layer.base_layer(x)
    keep = (y - base).detach() != 0
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 0.02, rate  # 16,384 draws: sigma 0.0036
    # The PEFT formula with that mask, by plain autograd on leaf copies of A and B.
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    # Kept elements scaled by the mask's real keep rate (p to 1/65536), so that E[mask] = 1 exactly, as PEFT's.
    y_ref = layer.base_layer(x_ref) + s * ((x_ref * keep / lora_fast.reference.keep_probability(p)) @ A.t()) @ B.t()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)  # the backward must regenerate the very mask the forward used
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, A.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, B.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)


def test_dropout_same_seed_same_step_and_eval_has_none():
    pm, layer = _identity_lora(0.3)
    x = torch.randn(32, 64, dtype=torch.float64)
    torch.manual_seed(11)
    y1 = pm(x)
    torch.manual_seed(11)
    y2 = pm(x)
    y3 = pm(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y2, y3)  # the next call draws a new mask
    pm.eval()
    torch.testing.assert_close(pm(x), layer.base_layer(x) + 2.0 * x, rtol=1e-12, atol=1e-12)


def _enable_checkpointing(model, use_reentrant):
    kw = {"use_reentrant": use_reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; older: the deprecated name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_regenerates_the_same_mask(use_reentrant, op_calls):
    pm = _patched_copy(_gpt2_peft(lora_dropout=0.2))
    ckpt = copy.deepcopy(pm)
    _enable_checkpointing(ckpt, use_reentrant)
    ids = _ids()
    results = []
    for model in (pm, ckpt):
        model.train()
        torch.manual_seed(3)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), _trainable_grads(model)))
    assert len(op_calls) > 2 * len(_peft_layers(pm))  # the checkpointed model recomputed its layers
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-10, atol=1e-12, msg=name)
    pm.eval()
    assert not torch.allclose(pm(input_ids=ids, labels=ids).loss, loss_ref)  # dropout did act in training


# ---------------------------------------------------------------- training, files, PEFT's own switches


def _adamw_losses(model, batch, steps=20):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_adamw_20_steps_same_loss_curve(op_calls):
    peft_model, batch = _llama_case()
    fast = _patched_copy(peft_model)
    ref = _adamw_losses(peft_model.train(), batch)
    ours = _adamw_losses(fast.train(), batch)
    assert len(op_calls) == 20 * len(_peft_layers(fast))
    assert ref[-1] < 0.95 * ref[0]  # it trained
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=0)


def test_save_pretrained_after_patched_training_loads_back(tmp_path):
    fast = _patched_copy(_gpt2_peft(lora_dropout=0.1))
    ids = _ids()
    _adamw_losses(fast.train(), {"input_ids": ids, "labels": ids}, steps=3)
    fast.save_pretrained(tmp_path / "patched")
    unpatched = _gpt2_peft(lora_dropout=0.1)
    unpatched.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "patched" / "adapter_model.safetensors")
    assert saved.keys() == load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    loaded = PeftModel.from_pretrained(_gpt2().double(), tmp_path / "patched").eval()
    assert not any(type(m) is pp._fast_class() for m in loaded.modules())
    fast.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, fast(input_ids=ids).logits, **FP64)


def test_disable_merge_and_set_adapter_give_peft_results(op_calls):
    peft_model = _gpt2_peft()
    peft_model.add_adapter("other", _config(GPT2_TARGETS, fan_in_fan_out=True, r=2))
    fast = _patched_copy(peft_model)
    peft_model.eval(), fast.eval()
    ids = _ids()

    def same(expect_op_calls):
        before = len(op_calls)
        torch.testing.assert_close(fast(input_ids=ids).logits, peft_model(input_ids=ids).logits, **FP64)
        assert (len(op_calls) > before) == expect_op_calls

    same(True)
    with fast.disable_adapter(), peft_model.disable_adapter():
        same(False)
    same(True)
    for model in (peft_model, fast):
        model.set_adapter("other")
    same(True)
    for model in (peft_model, fast):
        model.merge_adapter()
    same(False)
    for model in (peft_model, fast):
        model.unmerge_adapter()
    same(True)
    merged_ref, merged = peft_model.merge_and_unload(), fast.merge_and_unload()
    assert not any(type(m) is pp._fast_class() for m in merged.modules())
    torch.testing.assert_close(merged(input_ids=ids).logits, merged_ref(input_ids=ids).logits, **FP64)


def _two_active(pm):
    pm.add_adapter("b", _config(GPT2_TARGETS, fan_in_fan_out=True))
    pm.base_model.set_adapter(["default", "b"])


def _hook_base_layers(pm):
    for m in _peft_layers(pm):
        m.base_layer.register_forward_hook(lambda mod, inp, out: out * 2)


def _train_base_weights(pm):
    for m in _peft_layers(pm):
        m.base_layer.weight.requires_grad_(True)


FALLBACKS = {
    "dora": (dict(use_dora=True), None, "DoraLinearVariant"),
    "two_active": ({}, _two_active, "2 active adapters"),
    "merged": ({}, lambda pm: pm.merge_adapter(), "merged"),
    "lora_bias": (dict(lora_bias=True), None, "lora_bias"),
    "hooked_base": ({}, _hook_base_layers, "base layer has hooks"),
    "trainable_base": ({}, _train_base_weights, "base weight trains"),
    "alpha_zero": (dict(lora_alpha=0), None, "scaling 0.0 (lora_linear refuses a zero or non-finite one)"),
    # p finer than the mask's 1/65536 resolution: it would round to "drop all" or "keep all"
    "dropout_near_1": (dict(lora_dropout=0.999995), None, "dropout_p = 0.999995 rounds to 1"),
    "dropout_near_0": (dict(lora_dropout=1e-6), None, "dropout_p = 1e-06 rounds to 0"),
}


@pytest.mark.parametrize("name", FALLBACKS)
def test_fallbacks_give_peft_exactly_and_are_reported(name, op_calls, capsys):
    kw, prepare, reason = FALLBACKS[name]
    peft_model = _gpt2_peft(**kw).eval()
    if prepare is not None:
        prepare(peft_model)
    fast = copy.deepcopy(peft_model)
    report = patch_peft(fast)
    printed = capsys.readouterr().out
    assert reason in printed and f"0 of {len(_peft_layers(fast))}" in printed
    assert all(forward == pp.PEFT and reason in why for _, forward, why in report.rows)
    ids = _ids()
    assert torch.equal(fast(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    assert op_calls == []


def test_unknown_keyword_goes_to_peft(op_calls):
    peft_model = _gpt2_peft().eval()
    fast = _patched_copy(peft_model)
    layer = _peft_layers(fast)[0]
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x, adapter_names=None), _peft_layers(peft_model)[0](x), **FP64)
    assert len(op_calls) == 1
    with pytest.raises(TypeError, match="unexpected keyword argument 'scale'"):  # PEFT passes it to the base layer
        layer(x, scale=None)
    assert len(op_calls) == 1


def test_mixed_batch_adapter_names_falls_back(op_calls):
    peft_model = _gpt2_peft().eval()
    peft_model.add_adapter("b", _config(GPT2_TARGETS, fan_in_fan_out=True))
    fast = _patched_copy(peft_model)
    ids = _ids()
    names = ["default", "b"]
    ref = peft_model(input_ids=ids, adapter_names=names).logits
    assert torch.equal(fast(input_ids=ids, adapter_names=names).logits, ref)
    assert op_calls == []


def test_non_linear_lora_layers_are_reported_not_patched():
    model = get_peft_model(_gpt2().double(), _config(["wte", "c_attn"], fan_in_fan_out=True))
    report = patch_peft(model, verbose=False)
    rows = {name.split(".")[-1]: (forward, why) for name, forward, why in report.rows}
    assert rows["wte"] == (pp.NOT_PATCHED, "Embedding is not PEFT's lora.Linear")
    assert report.fast == [name for name, _, _ in report.rows if name.endswith("c_attn")] and len(report.fast) == 2
    assert "| 1: base_model.model.transformer.wte | not patched |" in str(report)


# ---------------------------------------------------------------- the mechanism


def test_per_instance_patch_leaves_peft_classes_alone_and_unpatches(op_calls):
    forward_before = PeftLinear.forward
    peft_model = _gpt2_peft().eval()
    other = copy.deepcopy(peft_model)
    report = patch_peft(peft_model, verbose=False)
    assert PeftLinear.forward is forward_before
    assert all(type(m) is PeftLinear for m in _peft_layers(other))
    ids = _ids()
    ref = other(input_ids=ids).logits
    assert op_calls == []  # the unpatched model of the same class does not run the op
    assert len(report.patched) == len(_peft_layers(peft_model)) == 8
    assert unpatch_peft(peft_model) == 8
    assert all(type(m) is PeftLinear and not hasattr(m, "_lora_fast_backend") for m in _peft_layers(peft_model))
    torch.testing.assert_close(peft_model(input_ids=ids).logits, ref, rtol=0, atol=0)
    assert op_calls == []
    assert unpatch_peft(peft_model) == 0


def test_state_dict_deepcopy_pickle_and_to(op_calls):
    peft_model = _gpt2_peft().eval()
    keys = list(peft_model.state_dict())
    fast = _patched_copy(peft_model)
    assert list(fast.state_dict()) == keys
    ids = _ids()
    ref = fast(input_ids=ids).logits
    torch.testing.assert_close(ref, peft_model(input_ids=ids).logits, **FP64)
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    for model in (copy.deepcopy(fast), torch.load(buf, weights_only=False)):
        before = len(op_calls)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
        assert len(op_calls) == before + 8  # the copies run the op too
    fast32 = fast.to(torch.float32)
    torch.testing.assert_close(fast32(input_ids=ids).logits, peft_model.float()(input_ids=ids).logits)


def test_library_imports_without_peft():
    code = (
        "import sys; sys.modules['peft'] = None\n"  # an import of peft now raises ImportError
        "import torch, lora_fast\n"
        "try:\n    lora_fast.patch_peft(torch.nn.Linear(2, 2))\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lora_fast.patch_peft needs peft" in out.stdout


def test_bad_calls_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        patch_peft(_gpt2_peft(), backend="cuda")
    with pytest.raises(ValueError, match="no PEFT LoRA layers in this GPT2LMHeadModel"):
        patch_peft(_gpt2())
    with pytest.raises(TypeError, match="must be an nn.Module"):
        patch_peft("model")


def test_auto_takes_triton_only_where_its_precision_is_peft_s(monkeypatch):
    pytest.importorskip("triton", reason="the triton backend's settings need triton")
    from lora_fast.triton_backend import config

    bf16, fp32, fp64 = torch.bfloat16, torch.float32, torch.float64
    precision = torch.get_float32_matmul_precision()
    try:
        monkeypatch.setattr(config, "fp32_precision", "auto")  # the default: the kernels round as torch's matmuls
        for setting in ("highest", "high"):
            torch.set_float32_matmul_precision(setting)
            assert pp._triton_matches_peft((fp32, fp32)) and pp._triton_matches_peft((bf16, fp32))
        monkeypatch.setattr(config, "fp32_precision", "tf32")
        torch.set_float32_matmul_precision("highest")
        assert pp._triton_matches_peft((bf16, bf16))
        assert not pp._triton_matches_peft((bf16, fp32))  # fp32 adapters: PEFT runs the branch in exact fp32
        assert not pp._triton_matches_peft((fp64, fp64))
        torch.set_float32_matmul_precision("high")  # TF32 allowed: torch's own matmuls round like the kernels
        assert pp._triton_matches_peft((fp32, fp32))
        torch.set_float32_matmul_precision("highest")
        monkeypatch.setattr(config, "fp32_precision", "ieee")
        assert pp._triton_matches_peft((fp32, fp32))
    finally:
        torch.set_float32_matmul_precision(precision)


# ---------------------------------------------------------------- HF Trainer and torch.compile


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n=8, t=12):
        self.ids = _ids(1, t, seed=4).repeat(n, 1)  # one sequence, so the loss falls step by step

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_losses(model, out_dir):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Batches())
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_hf_trainer_same_losses(tmp_path, op_calls):
    peft_model = _gpt2_peft(dtype=torch.float32)
    fast = _patched_copy(peft_model)
    ref = _trainer_losses(peft_model, tmp_path / "peft")
    ours = _trainer_losses(fast, tmp_path / "fast")
    assert len(ref) == 4 and len(op_calls) == 4 * len(_peft_layers(fast))
    assert ref[-1] < ref[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)


def _loss_and_grads(run, model, ids, seed):
    """``run`` (the model or its compiled wrapper) on ``ids``; the loss and the gradients it left on ``model``."""
    torch.manual_seed(seed)
    loss = run(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = _trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


# aot_eager: dynamo's trace and AOT autograd, without inductor's C++ compile (the same test under inductor passes too,
# in ~30 s instead of ~7 s on a 2-core CPU).
def test_torch_compile_matches_eager(op_calls):
    torch._dynamo.reset()
    fast = _patched_copy(_gpt2_peft(dtype=torch.float32)).eval()
    ids = _ids()
    eager = fast(input_ids=ids).logits
    assert len(op_calls) == 8
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break in our forward
    torch.testing.assert_close(compiled(input_ids=ids).logits, eager, rtol=1e-5, atol=1e-5)
    assert len(op_calls) == 16  # traced through the op (dynamo replays the spy's list appends)
    with compiled.disable_adapter(), fast.disable_adapter():  # a guard on PEFT's state: recompiled, PEFT's path
        torch.testing.assert_close(compiled(input_ids=ids).logits, fast(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_torch_compile_training_with_dropout_matches_eager():
    torch._dynamo.reset()
    fast = _patched_copy(_gpt2_peft(dtype=torch.float32, lora_dropout=0.2)).train()
    ids = _ids()
    loss_ref, grads_ref = _loss_and_grads(fast, fast, ids, seed=9)
    # Each dropout seed is drawn in Python (a graph break), in the order eager draws them: the same masks.
    loss, grads = _loss_and_grads(torch.compile(fast, backend="aot_eager"), fast, ids, seed=9)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------- CUDA tier


# (model dtype, autocast dtype, the backend auto must pick): bf16 weights get fp32 adapters from PEFT, whose LoRA branch
# then runs in fp32 at torch's precision, as the kernels do by default, so auto takes the triton backend everywhere.
CUDA_CASES = {
    "fp32": (torch.float32, None, "triton"),
    "bf16": (torch.bfloat16, None, "triton"),
    "fp32_autocast_bf16": (torch.float32, torch.bfloat16, "triton"),
}


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_matches_peft(case, op_calls):
    dtype, amp, backend = CUDA_CASES[case]
    peft_model = get_peft_model(_llama().to("cuda", dtype), _config(LLAMA_TARGETS, lora_dropout=0.0))
    fast = _patched_copy(peft_model)
    ids = _ids(n=4, t=64, vocab=VOCAB).cuda()
    outs = []
    for model in (peft_model, fast):
        with torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out.logits.float())
    assert len(op_calls) == len(_peft_layers(fast)) and set(op_calls) == {backend}
    low = dtype == torch.bfloat16 or amp is not None
    tol = {"rtol": 2e-2, "atol": 2e-2} if low else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(outs[1], outs[0], **tol)
    ref_grads = _trainable_grads(peft_model)
    for name, g in _trainable_grads(fast).items():
        torch.testing.assert_close(g.float(), ref_grads[name].float(), **tol, msg=name)
