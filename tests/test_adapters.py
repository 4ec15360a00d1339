"""Adapter files: HF PEFT interop both ways, strict and atomic loading, every refusal leaves the model unchanged."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

import lora_fast
from lora_fast import AdapterError, apply_lora, load_adapter, save_adapter
from tests.helpers import model_snapshot, tiny_gpt2_config, unchanged_since

peft = pytest.importorskip("peft", reason="HF PEFT is a dev dependency: pip install -e '.[dev]'")

TARGETS = ["attn.c_attn", "attn.c_proj"]


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config()).eval()


def _ids(tokenizer):
    text = ["Instruction: classify\nText: a gorgeous, witty film\nLabel:", "Text: dull and far too long\nLabel:"]
    return tokenizer(text, return_tensors="pt", padding=True)


def _trained_adapter(tmp_path, seed=1):
    model = apply_lora(_model(), TARGETS, r=4, alpha=16, dropout=0.05)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_fast.lora_modules(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-gpt2")
    return model, tmp_path / "adapter"


def test_file_format(tmp_path):
    model, path = _trained_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["fan_in_fan_out"] is True and config["target_modules"] == TARGETS
    assert config["bias"] == "none" and config["task_type"] == "CAUSAL_LM" and config["use_rslora"] is False
    assert config["lora_dropout"] == 0.05 and config["base_model_name_or_path"] == "tiny-gpt2"
    state = load_file(path / "adapter_model.safetensors")
    assert len(state) == 2 * 2 * 2
    assert state["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert state["base_model.model.transformer.h.1.attn.c_proj.lora_B.weight"].shape == (32, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary leftovers


def test_lora_fast_to_peft(tmp_path, tokenizer):
    model, path = _trained_adapter(tmp_path)
    batch = _ids(tokenizer)
    ours = model(**batch).logits
    peft_model = peft.PeftModel.from_pretrained(_model(), str(path)).eval()
    theirs = peft_model(**batch).logits
    assert not torch.allclose(ours, _model()(**batch).logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_peft_to_lora_fast(tmp_path, tokenizer):
    config = peft.LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["c_attn", "mlp.c_fc"],
        lora_dropout=0.1,
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(_model(), config).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    batch = _ids(tokenizer)
    theirs = peft_model(**batch).logits
    model = load_adapter(_model(), tmp_path / "peft")
    assert {n for n, _ in lora_fast.lora_modules(model)} == {
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")
    }
    torch.testing.assert_close(model(**batch).logits, theirs, rtol=1e-5, atol=1e-5)
    ours, peft_count = lora_fast.count_parameters(model), peft_model.get_nb_trainable_parameters()
    assert ours == peft_count


def test_round_trip_into_model_with_lora(tmp_path, tokenizer):
    model, path = _trained_adapter(tmp_path)
    other = apply_lora(_model(), TARGETS, r=4, alpha=16)
    load_adapter(other, path)
    batch = _ids(tokenizer)
    assert torch.equal(other(**batch).logits, model(**batch).logits)


def test_trainable_counts_match_peft_gpt2_small():
    from transformers import GPT2Config

    ours = apply_lora(GPT2LMHeadModel(GPT2Config()), TARGETS, r=16, alpha=32)
    theirs = peft.get_peft_model(
        GPT2LMHeadModel(GPT2Config()), peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, fan_in_fan_out=True)
    )
    assert lora_fast.count_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_save_is_atomic_and_keeps_old_adapter_on_failure(tmp_path, monkeypatch):
    model, path = _trained_adapter(tmp_path)
    before = (path / "adapter_model.safetensors").read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def _corrupt(path, how):
    weights = path / "adapter_model.safetensors"
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif how == "bad_json":
        config_path.write_text("{not json")
    elif how in ("missing_key", "unexpected_key", "shape", "dtype", "nan"):
        state = load_file(weights)
        key = "base_model.model.transformer.h.1.attn.c_proj.lora_A.weight"
        if how == "missing_key":
            del state[key]
        elif how == "unexpected_key":
            state["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"] = torch.zeros(4, 32)
        elif how == "shape":
            state[key] = torch.zeros(4, 31)
        elif how == "dtype":
            state[key] = state[key].double()
        else:
            state[key][0, 0] = float("nan")
        save_file(state, str(weights))
    elif how in ("rank", "target"):
        # A PEFT-written pair (no lora-fast record in the weights' metadata) whose config does not fit the model.
        save_file(load_file(weights), str(weights))
        config.update(r=8) if how == "rank" else config.update(target_modules=["attn.q_proj"])
        config_path.write_text(json.dumps(config))
    elif how == "mixed_saves":  # what a save interrupted between its two renames leaves: new weights, old config
        config["lora_alpha"] = 32
        config_path.write_text(json.dumps(config))
    elif how == "not_lora":
        config["peft_type"] = "IA3"
        config_path.write_text(json.dumps(config))
    elif how == "dora":
        config["use_dora"] = True
        config_path.write_text(json.dumps(config))
    elif how == "no_weights":
        weights.unlink()


# how the adapter is broken -> (message for a model without LoRA, message for a model that has r=4 LoRA already)
REFUSALS = {
    "truncated": ("corrupt or truncated",) * 2,
    "garbage": ("corrupt or truncated",) * 2,
    "bad_json": ("not valid JSON",) * 2,
    "missing_key": ("missing keys ['base_model.model.transformer.h.1.attn.c_proj.lora_A.weight']",) * 2,
    "unexpected_key": ("unexpected keys ['base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight']",) * 2,
    "shape": ("shape (4, 31), the model expects (4, 32)",) * 2,
    "dtype": ("holds dtype torch.float64, the model's LoRA weight is torch.float32; converting would round it",) * 2,
    "nan": ("NaN",) * 2,
    "rank": ("shape (4, 32), the model expects (8, 32)", "the model has LoRA with r=4"),
    "target": ("the adapter's target 'attn.q_proj' matches no module",) * 2,
    "mixed_saves": ("come from different saves (lora_alpha=32 in the config but 16 for the weights)",) * 2,
    "not_lora": ("only LORA adapters",) * 2,
    "dora": ("use_dora",) * 2,
    "no_weights": ("no adapter_model.safetensors",) * 2,
}


@pytest.mark.parametrize("with_lora", [False, True], ids=["fresh_model", "model_with_lora"])
@pytest.mark.parametrize("how", sorted(REFUSALS))
def test_refusals_leave_model_unchanged(tmp_path, how, with_lora):
    _, path = _trained_adapter(tmp_path)
    _corrupt(path, how)
    model = _model(seed=3)
    if with_lora:
        apply_lora(model, TARGETS, r=4, alpha=16)
    snap = model_snapshot(model)
    with pytest.raises(AdapterError) as err:
        load_adapter(model, path)
    assert REFUSALS[how][with_lora] in str(err.value)
    assert unchanged_since(model, snap)


def test_merged_model_refuses_load(tmp_path):
    model, path = _trained_adapter(tmp_path)
    lora_fast.merge_lora(model)
    snap = model_snapshot(model)
    with pytest.raises(AdapterError, match="unmerge_lora"):
        load_adapter(model, path)
    assert unchanged_since(model, snap)


def test_missing_folder():
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(_model(), "/nonexistent/adapter")
