"""Bottleneck adapters: trainable counts against hand counts for GPT-2 small, exactness of a fresh adapter, what
trains, and strict round trips of their files."""

import json

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel

from lora_fast import AdapterError, count_parameters
from lora_fast.study.bottleneck import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BottleneckAdapterLayer,
    apply_bottleneck_adapters,
    bottleneck_adapter_modules,
    load_bottleneck_adapters,
    save_bottleneck_adapters,
)
from tests.helpers import tiny_gpt2_config
from tests.study.method_models import GPT2_SMALL_TOTAL, assert_same_state, gpt2_small, state_copy, tiny


@pytest.mark.parametrize("dim", [1, 4, 64])
def test_adapter_count_gpt2_small(dim):
    model = apply_bottleneck_adapters(gpt2_small(), dim=dim)
    trainable, total = count_parameters(model)
    per_adapter = (768 * dim + dim) + (dim * 768 + 768)  # down (D, N) + bias, up (N, D) + bias
    assert trainable == 24 * per_adapter
    assert total == GPT2_SMALL_TOTAL + 24 * per_adapter
    assert sorted(bottleneck_adapter_modules(model)) == sorted(
        f"transformer.h.{i}.{m}.c_proj" for i in range(12) for m in ("attn", "mlp")
    )
    if dim == 4:
        assert trainable == 165_984


def test_fresh_adapter_is_exactly_the_base_model(ids):
    model = tiny()
    with torch.no_grad():
        base = model(ids).logits
        apply_bottleneck_adapters(model, dim=4)
        fresh = model(ids).logits
    assert torch.equal(fresh, base)
    # A non-zero up-projection must change the output: the adapters are really in the forward path.
    for layer in bottleneck_adapter_modules(model).values():
        nn.init.normal_(layer.up.weight, std=0.5)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base, atol=1e-3)


def test_adapter_layer_formula_fp64():
    model = tiny().double()
    apply_bottleneck_adapters(model, dim=3)
    layer = model.transformer.h[1].mlp.c_proj
    assert isinstance(layer, BottleneckAdapterLayer)
    nn.init.normal_(layer.up.weight)
    nn.init.normal_(layer.up.bias)
    x = torch.randn(5, 128, dtype=torch.float64)  # c_fc width 4·32
    y = x @ layer.base.weight + layer.base.bias  # Conv1D: weight (K, N)
    h = torch.nn.functional.gelu(y @ layer.down.weight.T + layer.down.bias)
    torch.testing.assert_close(layer(x), y + h @ layer.up.weight.T + layer.up.bias, rtol=1e-12, atol=1e-12)


def test_adapter_gradients_reach_only_adapters(ids):
    model = apply_bottleneck_adapters(tiny(), dim=4)
    model.train()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        is_adapter = ".down." in name or ".up." in name
        assert param.requires_grad == is_adapter, name
        if is_adapter and ".up." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_adapter_errors_leave_model_alone():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="transformer.h"):
        apply_bottleneck_adapters(NoBlocks())
    model = tiny()
    before = state_copy(model)
    with pytest.raises(ValueError, match="dim"):
        apply_bottleneck_adapters(model, dim=0)
    assert_same_state(model, before)
    assert all(p.requires_grad for p in model.parameters())
    apply_bottleneck_adapters(model, dim=2)
    with pytest.raises(ValueError, match="already"):
        apply_bottleneck_adapters(model, dim=2)


def trained_adapters(dim=4, seed=0):
    model = apply_bottleneck_adapters(tiny(seed), dim=dim)
    for layer in bottleneck_adapter_modules(model).values():
        for p in (*layer.down.parameters(), *layer.up.parameters()):
            nn.init.normal_(p, std=0.3)
    return model


def test_adapter_round_trip(tmp_path, ids):
    model = trained_adapters()
    save_bottleneck_adapters(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert config["dim"] == 4 and len(config["modules"]) == 4
    assert config["shapes"]["transformer.h.0.attn.c_proj.down.weight"] == [4, 32]
    with torch.no_grad():
        want = model(ids).logits
        fresh = load_bottleneck_adapters(tiny(), tmp_path / "a")  # same base (seed 0), adapters applied on load
        assert torch.equal(fresh(ids).logits, want)
        existing = load_bottleneck_adapters(apply_bottleneck_adapters(tiny(), dim=4), tmp_path / "a")
        assert torch.equal(existing(ids).logits, want)
    assert count_parameters(fresh)[0] == 4 * (32 * 4 + 4 + 4 * 32 + 32)


def test_adapter_load_refusals(tmp_path):
    from safetensors.torch import load_file, save_file

    save_bottleneck_adapters(trained_adapters(dim=4), tmp_path / "a")
    cases = {}
    # Wrong dim: a model that already has dim-8 adapters, and a config whose dim no longer fits the weights.
    cases["dim8"] = (lambda: apply_bottleneck_adapters(tiny(), dim=8), tmp_path / "a", "dim")
    bad_dim = tmp_path / "bad_dim"
    save_bottleneck_adapters(trained_adapters(dim=4), bad_dim)
    config = json.loads((bad_dim / ADAPTER_CONFIG).read_text())
    config["dim"] = 8
    (bad_dim / ADAPTER_CONFIG).write_text(json.dumps(config))
    cases["config_dim"] = (tiny, bad_dim, "shape")
    # Missing key.
    missing = tmp_path / "missing"
    save_bottleneck_adapters(trained_adapters(dim=4), missing)
    state = load_file(str(missing / ADAPTER_WEIGHTS))
    del state["transformer.h.1.mlp.c_proj.up.bias"]
    save_file(state, str(missing / ADAPTER_WEIGHTS))
    cases["missing"] = (tiny, missing, "missing keys")
    # Truncated weights file.
    corrupt = tmp_path / "corrupt"
    save_bottleneck_adapters(trained_adapters(dim=4), corrupt)
    data = (corrupt / ADAPTER_WEIGHTS).read_bytes()
    (corrupt / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    cases["corrupt"] = (tiny, corrupt, "corrupt")
    # A model of another width.
    cases["width"] = (lambda: GPT2LMHeadModel(tiny_gpt2_config(n_embd=48)), tmp_path / "a", "shape")
    cases["nofolder"] = (tiny, tmp_path / "nowhere", "does not exist")
    for name, (make, folder, match) in cases.items():
        model = make()
        before, modules = state_copy(model), [type(m) for m in model.modules()]
        grads = [p.requires_grad for p in model.parameters()]
        with pytest.raises(AdapterError, match=match):
            load_bottleneck_adapters(model, folder)
        assert_same_state(model, before)
        assert [type(m) for m in model.modules()] == modules, name
        assert [p.requires_grad for p in model.parameters()] == grads, name


def test_saves_are_small_and_leave_other_files_alone(tmp_path):
    model = trained_adapters()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    save_bottleneck_adapters(model, tmp_path / "a")
    save_bottleneck_adapters(trained_adapters(seed=1), tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, "notes.txt"])
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"
    saved = sum(p.stat().st_size for p in (tmp_path / "a").iterdir() if p.name != "notes.txt")
    assert saved < 4 * count_parameters(model)[0] + 8192  # adapters only, not the base model
