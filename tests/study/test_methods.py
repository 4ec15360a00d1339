"""The training methods' table: each method's prepare/save/load round trip with its hyper-parameters passed
explicitly, LoRA loading through load_adapter's checks, and full fine-tuning loaded by from_pretrained (sharded files
too), strictly."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from lora_fast import AdapterError
from lora_fast.study.methods import METHODS
from tests.helpers import tiny_gpt2_config

# Every method's hyper-parameters, by the names its functions take.
HYPER = dict(targets=["attn.c_attn"], r=4, alpha=8.0, dropout=0.0, rslora=False, backend="torch", dim=4)


def params(name: str) -> dict:
    return {k: HYPER[k] for k in METHODS[name].params}


def fresh(seed=0, **config):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(**config)).eval()


def trained(name):
    model = METHODS[name].prepare(fresh(), **params(name))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", sorted(METHODS))
def test_round_trip_gives_back_the_trained_model(name, tmp_path, tokenizer):
    model = trained(name)
    METHODS[name].save(model, tokenizer, tmp_path / "saved")
    ids = torch.tensor([[464, 3290, 318, 257, 1332]])
    loaded = METHODS[name].load(fresh() if name != "full" else fresh(seed=1), tmp_path / "saved", **params(name))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # Loading into the trained model itself (the best-checkpoint score) works too.
    assert METHODS[name].load(model, tmp_path / "saved", **params(name)) is model


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_folder_left_aside_by_a_killed_save_is_put_back_and_loads(name, tmp_path, tokenizer):
    model = trained(name)
    METHODS[name].save(model, tokenizer, tmp_path / "stash")
    holder = tmp_path / ".adapter_best.q1w2e3r4.old"  # where atomic_directory moves the old folder before the new
    holder.mkdir()
    (tmp_path / "stash").rename(holder / "adapter_best")
    loaded = METHODS[name].load(fresh() if name != "full" else fresh(seed=1), tmp_path / "adapter_best", **params(name))
    ids = torch.tensor([[464, 3290, 318, 257, 1332]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_best"]


def test_a_full_save_after_a_kill_keeps_the_old_weights_even_when_it_fails(tmp_path, tokenizer, monkeypatch):
    old = trained("full")
    METHODS["full"].save(old, tokenizer, tmp_path / "stash")
    (tmp_path / ".adapter_best.q1w2e3r4.old").mkdir()
    (tmp_path / "stash").rename(tmp_path / ".adapter_best.q1w2e3r4.old" / "adapter_best")
    monkeypatch.setattr(tokenizer, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        METHODS["full"].save(trained("full"), tokenizer, tmp_path / "adapter_best")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_best"]  # put back before the write, kept after
    loaded = METHODS["full"].load(fresh(seed=1), tmp_path / "adapter_best", **params("full"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in old.state_dict().items())


def test_lora_loads_through_load_adapter_checks(tmp_path, tokenizer):
    METHODS["lora"].save(trained("lora"), tokenizer, tmp_path / "a")
    state = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = next(iter(state))
    state[key][0, 0] = float("nan")
    save_file(state, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN"):
        METHODS["lora"].load(fresh(), tmp_path / "a", **params("lora"))


def test_full_loads_sharded_files_strictly(tmp_path):
    model = trained("full")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="500KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    target = fresh(seed=1)
    METHODS["full"].load(target, tmp_path / "sharded", **params("full"))
    for (n, a), b in zip(model.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), n

    # A folder of another model (one block fewer) does not fit: refused, the model untouched.
    fresh(n_layer=1).save_pretrained(tmp_path / "other")
    target, before = fresh(seed=1), {k: v.clone() for k, v in fresh(seed=1).state_dict().items()}
    with pytest.raises(AdapterError, match="does not fit the model"):
        METHODS["full"].load(target, tmp_path / "other", **params("full"))
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(AdapterError, match="not a loadable model folder"):
        METHODS["full"].load(target, tmp_path / "nowhere", **params("full"))
