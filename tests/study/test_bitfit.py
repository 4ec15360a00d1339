"""BitFit: the trainable count against a hand count for GPT-2 small, what trains, and strict round trips of its
files."""

import pytest
import torch
from transformers import GPT2LMHeadModel

from lora_fast import AdapterError, count_parameters
from lora_fast.study.bitfit import BITFIT_WEIGHTS, load_bitfit, prepare_bitfit, save_bitfit
from tests.helpers import tiny_gpt2_config
from tests.study.method_models import GPT2_SMALL_TOTAL, assert_same_state, gpt2_small, state_copy, tiny


def test_bitfit_count_gpt2_small():
    model = prepare_bitfit(gpt2_small())
    trainable, total = count_parameters(model)
    # Per block: c_attn 3·768 + attn.c_proj 768 + c_fc 4·768 + mlp.c_proj 768 (Conv1D biases) + ln_1, ln_2 biases.
    per_block = 2304 + 768 + 3072 + 768 + 768 + 768
    assert total == GPT2_SMALL_TOTAL
    assert trainable == 12 * per_block + 768 == 102_144  # + ln_f.bias
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".bias") for n in names)
    assert "transformer.h.0.ln_1.weight" not in names and "transformer.ln_f.bias" in names
    assert not model.lm_head.weight.requires_grad and not model.transformer.wte.weight.requires_grad


def test_bitfit_step_moves_only_biases(ids):
    model = prepare_bitfit(tiny())
    before = state_copy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids, labels=ids).loss.backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        moved = not torch.equal(after[k], v)
        trains = k.endswith(".bias") and k != "lm_head.bias"
        assert moved == trains, k


def test_bitfit_round_trip_and_refusals(tmp_path, ids):
    from safetensors.torch import load_file, save_file

    model = prepare_bitfit(tiny())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
        want = model(ids).logits
    save_bitfit(model, tmp_path / "b")
    assert sorted(load_file(str(tmp_path / "b" / BITFIT_WEIGHTS))) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad
    )
    loaded = load_bitfit(tiny(), tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    assert count_parameters(loaded)[0] == count_parameters(model)[0]

    missing = tmp_path / "missing"
    save_bitfit(model, missing)
    state = load_file(str(missing / BITFIT_WEIGHTS))
    del state["transformer.h.0.attn.c_attn.bias"]
    save_file(state, str(missing / BITFIT_WEIGHTS))
    corrupt = tmp_path / "corrupt"
    save_bitfit(model, corrupt)
    (corrupt / BITFIT_WEIGHTS).write_bytes(b"\x00" * 7)
    for make, folder, match in [
        (tiny, missing, "missing keys"),
        (tiny, corrupt, "corrupt"),
        (lambda: GPT2LMHeadModel(tiny_gpt2_config(n_embd=48)), tmp_path / "b", "shape"),
        (lambda: GPT2LMHeadModel(tiny_gpt2_config(n_layer=3)), tmp_path / "b", "missing keys"),
        (tiny, tmp_path / "nowhere", "does not exist"),
    ]:
        target = make()
        before = state_copy(target)
        with pytest.raises(AdapterError, match=match):
            load_bitfit(target, folder)
        assert_same_state(target, before)
        assert all(p.requires_grad for p in target.parameters())
