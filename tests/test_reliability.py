"""No silent wrong answers, no lost files: PEFT's config space, tied weights, merging, saving and half precision.

The config fuzz enumerates ``dataclasses.fields(peft.LoraConfig)`` itself: every field of the installed PEFT needs a
row in ``CASES``, so a field a new PEFT release adds fails ``test_every_peft_field_is_decided`` until it is decided.
Each row's value either round-trips (our logits = PEFT's within 1e-5) or is refused with the field and value named.
"""

import dataclasses
import json
import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import lora_fast
from lora_fast import AdapterError, LoRALinear, apply_lora, load_adapter, save_adapter
from tests.helpers import kill_at_rename, model_snapshot, tiny_gpt2_config, tiny_llama_config, unchanged_since

peft = pytest.importorskip("peft", reason="HF PEFT is a dev dependency: pip install -e '.[dev]'")

PEFT_FIELDS = {f.name for f in dataclasses.fields(peft.LoraConfig)}
IDS = torch.tensor([[5, 17, 42, 3, 99, 64, 8], [1, 2, 3, 4, 5, 6, 7]])
TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj"]}


def _gpt2(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(vocab_size=100, bos_token_id=0, eos_token_id=0, **overrides)).eval()


def _llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


MODELS = {"gpt2": _gpt2, "llama": _llama}


def _randomise_lora(model, seed=1):
    """Non-zero LoRA weights, so that an adapter read wrongly changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _peft_adapter(path, kind="gpt2", **config):
    """A PEFT model (randomised LoRA, eval mode) saved to ``path``; returns its logits on IDS."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[kind], **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own notes (fan_in_fan_out flipped for Conv1D, ...)
        model = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(**config)).eval()
    _randomise_lora(model)
    model.save_pretrained(str(path))
    with torch.no_grad():
        return model(IDS).logits


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _patch_config(path, **fields):
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(fields)
    config_path.write_text(json.dumps(config))


# ---------------------------------------------------------------- PEFT's LoraConfig, field by field

EXACT, REFUSED = "exact", "refused"
# (field, value, expectation, how the adapter is made, model). "peft": LoraConfig(field=value) through PEFT, which
# saves the adapter; "json": the value written into a PEFT-saved config (fields PEFT would not save as given, or that
# need hardware or libraries this test does not have).
CASES = [
    # bookkeeping fields: any value
    ("task_type", "CAUSAL_LM", EXACT, "peft", "gpt2"),
    ("auto_mapping", {"base_model_class": "Other", "parent_library": "x"}, EXACT, "json", "gpt2"),
    ("peft_version", "0.0.1", EXACT, "json", "gpt2"),
    ("base_model_name_or_path", "some/model", EXACT, "json", "gpt2"),
    ("revision", "v2", EXACT, "json", "gpt2"),
    ("inference_mode", False, EXACT, "json", "gpt2"),
    ("runtime_config", {"ephemeral_gpu_offload": True}, EXACT, "json", "gpt2"),
    ("fan_in_fan_out", False, EXACT, "json", "gpt2"),  # Conv1D: PEFT uses True whatever the file says
    ("fan_in_fan_out", True, EXACT, "peft", "llama"),  # nn.Linear: PEFT uses False
    ("megatron_core", "my.megatron", EXACT, "json", "gpt2"),
    ("qalora_group_size", 32, EXACT, "peft", "gpt2"),
    ("ensure_weight_tying", True, EXACT, "peft", "gpt2"),
    # plain LoRA
    ("r", 2, EXACT, "peft", "gpt2"),
    ("r", 0, REFUSED, "json", "gpt2"),
    ("r", True, REFUSED, "json", "gpt2"),
    ("r", 4.0, REFUSED, "json", "gpt2"),
    ("lora_alpha", 3.5, EXACT, "peft", "gpt2"),
    ("lora_alpha", "8", REFUSED, "json", "gpt2"),
    ("lora_alpha", math.inf, REFUSED, "json", "gpt2"),
    ("lora_alpha", math.nan, REFUSED, "json", "gpt2"),
    ("lora_dropout", 0.3, EXACT, "peft", "gpt2"),
    ("lora_dropout", 1.5, REFUSED, "json", "gpt2"),
    ("lora_dropout", "0.1", REFUSED, "json", "gpt2"),
    ("use_rslora", True, EXACT, "peft", "gpt2"),
    ("use_rslora", "yes", REFUSED, "json", "gpt2"),
    ("target_modules", r".*\.attn\.c_attn", EXACT, "peft", "gpt2"),
    ("target_modules", ["c_attn", "q_proj"], EXACT, "peft", "gpt2"),  # q_proj matches nothing: PEFT accepts it
    ("target_modules", "all-linear", REFUSED, "json", "gpt2"),
    ("target_modules", [], REFUSED, "json", "gpt2"),
    ("init_lora_weights", False, EXACT, "peft", "gpt2"),
    ("init_lora_weights", "gaussian", EXACT, "peft", "gpt2"),
    ("init_lora_weights", "orthogonal", EXACT, "peft", "llama"),
    *[
        ("init_lora_weights", v, REFUSED, "json", "gpt2")
        for v in ("pissa", "pissa_niter_4", "olora", "corda", "loftq", "eva", "lora_ga", "mica")
    ],
    # features lora-fast does not implement: refused unless off
    ("bias", "all", REFUSED, "json", "gpt2"),
    ("bias", "lora_only", REFUSED, "json", "gpt2"),
    ("lora_bias", True, REFUSED, "json", "gpt2"),
    ("use_dora", True, REFUSED, "json", "gpt2"),
    ("use_qalora", True, REFUSED, "json", "gpt2"),
    ("exclude_modules", ["c_proj"], REFUSED, "json", "gpt2"),
    ("modules_to_save", ["lm_head"], REFUSED, "json", "gpt2"),
    ("layers_to_transform", [0], REFUSED, "json", "gpt2"),
    ("layers_to_transform", 0, REFUSED, "json", "gpt2"),
    ("layers_pattern", "h", REFUSED, "json", "gpt2"),
    ("rank_pattern", {"c_attn": 2}, REFUSED, "json", "gpt2"),
    ("alpha_pattern", {"c_attn": 2}, REFUSED, "json", "gpt2"),
    ("megatron_config", {"tensor_model_parallel_size": 2}, REFUSED, "json", "gpt2"),
    ("trainable_token_indices", [0, 1], REFUSED, "json", "gpt2"),
    ("target_parameters", ["mlp.c_fc.weight"], REFUSED, "json", "gpt2"),
    ("layer_replication", [[0, 1]], REFUSED, "json", "gpt2"),
    ("alora_invocation_tokens", [1, 2], REFUSED, "json", "gpt2"),
    ("loftq_config", {"loftq_bits": 4}, REFUSED, "json", "gpt2"),
    ("eva_config", {"rho": 2.0}, REFUSED, "json", "gpt2"),
    ("corda_config", {"corda_method": "kpm"}, REFUSED, "json", "gpt2"),
    ("lora_ga_config", {}, REFUSED, "json", "gpt2"),
    ("velora_config", {}, REFUSED, "json", "gpt2"),
    ("monteclora_config", {}, REFUSED, "json", "gpt2"),
    ("use_bdlora", {}, REFUSED, "json", "gpt2"),
    ("arrow_config", {}, REFUSED, "json", "gpt2"),
    ("kasa_config", {}, REFUSED, "json", "gpt2"),
    ("peft_type", "IA3", REFUSED, "json", "gpt2"),
    # early PEFT releases' fields, and a field no PEFT has (yet)
    ("merge_weights", True, EXACT, "json", "gpt2"),
    ("enable_lora", [True, False, True], REFUSED, "json", "gpt2"),
    ("a_future_peft_feature", 1, REFUSED, "json", "gpt2"),
]
NOT_PEFT_FIELDS = {"merge_weights", "enable_lora", "a_future_peft_feature"}


def test_every_peft_field_is_decided():
    """A field the installed PEFT has and CASES lacks is a new feature: decide (allow-list and test) before shipping."""
    undecided = PEFT_FIELDS - {case[0] for case in CASES}
    assert not undecided, f"LoraConfig fields with no decision in lora_fast.adapters.PEFT_LORA_FIELDS: {undecided}"
    assert PEFT_FIELDS <= set(lora_fast.adapters.PEFT_LORA_FIELDS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One PEFT-saved adapter per model kind (the JSON cases copy and edit it) and PEFT's logits for it."""
    root = tmp_path_factory.mktemp("peft")
    return {kind: (root / kind, _peft_adapter(root / kind, kind)) for kind in MODELS}


@pytest.mark.parametrize("field, value, expect, how, kind", CASES, ids=[f"{c[0]}={c[1]!r}"[:60] for c in CASES])
def test_peft_config_field(tmp_path, saved, field, value, expect, how, kind):
    if field not in PEFT_FIELDS | NOT_PEFT_FIELDS:
        pytest.skip(f"the installed peft has no field {field!r}")
    if how == "peft":
        path = tmp_path / "adapter"
        theirs = _peft_adapter(path, kind, **{field: value})
    else:
        source, theirs = saved[kind]
        path = tmp_path / "adapter"
        shutil.copytree(source, path)
        _patch_config(path, **{field: value})
    model = MODELS[kind](seed=0)
    if expect == REFUSED:
        snap = model_snapshot(model)
        with pytest.raises(AdapterError) as err:
            load_adapter(model, path)
        assert field in str(err.value) and repr(value)[:20] in str(err.value)
        assert unchanged_since(model, snap)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(model, path)
    unmatched = [str(w.message) for w in caught if "matches no module" in str(w.message)]
    if field == "target_modules" and isinstance(value, list):  # PEFT accepts it; the unmatched name is reported
        assert len(unmatched) == 1 and "the adapter's target 'q_proj' matches no module" in unmatched[0], unmatched
    else:
        assert not unmatched
    torch.testing.assert_close(_logits(model), theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(model), _logits(MODELS[kind](seed=0)), atol=1e-3)  # the adapter acts


@pytest.mark.parametrize(
    "kind, feature",
    [
        ("gpt2", {"init_lora_weights": "pissa"}),
        ("llama", {"init_lora_weights": "olora"}),
        ("gpt2", {"use_dora": True}),
        ("llama", {"alora_invocation_tokens": [5, 17], "task_type": "CAUSAL_LM"}),
        ("gpt2", {"layers_to_transform": [1]}),
        ("gpt2", {"rank_pattern": {"c_proj": 2}}),
    ],
    ids=["pissa", "olora", "dora", "alora", "layers_to_transform", "rank_pattern"],
)
def test_real_peft_adapters_we_do_not_implement_are_refused(tmp_path, kind, feature):
    """Adapters PEFT really saved with a feature that changes the math (logits off by 0.07-0.9 when read as LoRA)."""
    _peft_adapter(tmp_path / "adapter", kind, **feature)
    field = next(k for k in feature if k != "task_type")
    with pytest.raises(AdapterError, match=field):
        load_adapter(MODELS[kind](), tmp_path / "adapter")


# ---------------------------------------------------------------- tied weights


def test_lora_on_a_tied_weight_is_refused(tmp_path):
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    snap = model_snapshot(model)
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to \['transformer.wte.weight'\]"):
        apply_lora(model, ["c_attn", "lm_head"], r=4, alpha=8)
    assert unchanged_since(model, snap) and all(p.requires_grad for p in model.parameters())
    # A PEFT adapter on lm_head of a tied model: refused at load as well.
    _peft_adapter(tmp_path / "adapter", "gpt2", target_modules=["lm_head"])
    with pytest.raises(AdapterError, match="tied"):
        load_adapter(_gpt2(), tmp_path / "adapter")
    # Untied, lm_head takes LoRA, and merging it leaves the embedding alone.
    untied = apply_lora(_gpt2(tie_word_embeddings=False), ["lm_head"], r=4, alpha=8)
    _randomise_lora(untied)
    wte = untied.transformer.wte.weight.clone()
    lora_fast.merge_lora(untied)
    assert torch.equal(untied.transformer.wte.weight, wte)


# ---------------------------------------------------------------- merge_and_unload, save_pretrained


def test_merge_and_unload_saves_and_reloads_as_a_plain_model(tmp_path):
    model = apply_lora(_gpt2(), ["c_attn", "c_proj"], r=4, alpha=8)
    _randomise_lora(model)
    tuned = _logits(model)
    plain = lora_fast.merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules()) and not hasattr(plain, "lora_config")
    assert set(plain.state_dict()) == set(_gpt2().state_dict())
    torch.testing.assert_close(_logits(plain), tuned, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path / "merged")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(_logits(reloaded), _logits(plain))


def test_wrapped_model_state_dict_keeps_the_original_keys(tmp_path):
    model = apply_lora(_gpt2(), ["c_attn"], r=4, alpha=8)
    _randomise_lora(model)
    keys = set(model.state_dict())
    assert keys == set(_gpt2().state_dict()) | {
        f"transformer.h.{i}.attn.c_attn.lora_{ab}" for i in (0, 1) for ab in "AB"
    }
    # state_dict -> load_state_dict into another wrapped model: the same model.
    other = apply_lora(_gpt2(seed=5), ["c_attn"], r=4, alpha=8)
    other.load_state_dict(model.state_dict())
    assert torch.equal(_logits(other), _logits(model))
    # A merged model saved with save_pretrained reloads (plain) as the merged model: its weights, original keys.
    lora_fast.merge_lora(model)
    model.save_pretrained(tmp_path / "wrapped")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "wrapped").eval()
    assert torch.equal(_logits(reloaded), _logits(model))
    # ... but a merged state_dict never goes under LoRA again (the update would count twice), neither from memory nor
    # from the safetensors file save_pretrained wrote (which keeps no state_dict metadata: the flag is a key).
    with pytest.raises(RuntimeError, match="saved from a merged LoRA layer"):
        apply_lora(_gpt2(), ["c_attn"], r=4, alpha=8).load_state_dict(model.state_dict())
    from_file = load_file(str(tmp_path / "wrapped" / "model.safetensors"))
    assert all(bool(from_file[f"transformer.h.{i}.attn.c_attn.lora_merged"]) for i in (0, 1))
    with pytest.raises(RuntimeError, match="saved from a merged LoRA layer"):
        apply_lora(_gpt2(), ["c_attn"], r=4, alpha=8).load_state_dict(from_file, strict=False)
    with pytest.raises(RuntimeError, match="unmerge_lora before load_state_dict"):
        model.load_state_dict(other.state_dict())
    lora_fast.unmerge_lora(model)
    assert set(model.state_dict()) == keys  # unmerged: no flag key


# ---------------------------------------------------------------- saving beside other files, crashes


def _tuned(seed, alpha=8):
    model = apply_lora(_gpt2(), ["c_attn", "c_proj"], r=4, alpha=alpha)
    _randomise_lora(model, seed)
    return model


def test_save_adapter_leaves_other_files_alone_and_refuses_a_file(tmp_path):
    folder = tmp_path / "run"
    (folder / "plots").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / "README.md").write_text("notes")
    (folder / "plots" / "loss.png").write_bytes(b"png")
    model = _tuned(1)
    save_adapter(model, folder)
    save_adapter(_tuned(2), folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "plots",
    ]
    assert (folder / "metrics.jsonl").read_text() == '{"step": 1}\n' and (folder / "plots" / "loss.png").is_file()
    target = tmp_path / "a_file"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_adapter(model, target)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("crash_at", [1, 2], ids=["old_folder_aside", "new_folder_in"])
def test_a_crash_during_save_leaves_the_previous_adapter_whole(tmp_path, monkeypatch, crash_at):
    """The pair is swapped in as one folder: a kill at either rename leaves the previous adapter (put back from its
    hidden holder by the loader), with its own config (alpha 8, not the new save's 32), for us and for PEFT."""
    path = tmp_path / "adapter"
    old, new = _tuned(1, alpha=8), _tuned(2, alpha=32)
    save_adapter(old, path)
    kill_at_rename(monkeypatch, crash_at)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(new, path)
    monkeypatch.undo()
    assert torch.equal(_logits(load_adapter(_gpt2(), path)), _logits(old))
    assert json.loads((path / "adapter_config.json").read_text())["lora_alpha"] == 8


def test_weights_from_another_save_than_the_config_are_refused_not_misread(tmp_path):
    """Two files of different saves (copied by hand, or written by an older version one at a time) are refused."""
    one, two = tmp_path / "one", tmp_path / "two"
    save_adapter(_tuned(1, alpha=8), one)
    save_adapter(_tuned(2, alpha=32), two)
    (two / "adapter_config.json").write_bytes((one / "adapter_config.json").read_bytes())
    with pytest.raises(AdapterError, match="come from different saves .*lora_alpha=8 in the config but 32"):
        load_adapter(_gpt2(), two)


def test_stale_temporaries_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "adapter"
    save_adapter(_tuned(1), path)
    # What killed saves leave: per-file temporaries inside, former whole-folder temporaries beside.
    stale = [path / ".adapter_model.safetensors.k2j4h1x9.tmp", path / ".adapter_config.json.a0b1c2d3.tmp"]
    for f in stale:
        f.write_bytes(b"partial")
    (tmp_path / ".adapter.q1w2e3r4.old" / "adapter").mkdir(parents=True)
    (tmp_path / ".adapter.z9y8x7w6.tmp").mkdir()
    keep = [path / ".adapter_model.safetensors.tmp", tmp_path / ".adapter.notours"]  # not our naming
    for f in keep:
        f.write_bytes(b"user file")
    save_adapter(_tuned(2), path)
    assert not any(f.exists() for f in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.notours", "adapter"]
    assert all(f.read_bytes() == b"user file" for f in keep)


def test_a_kill_between_a_folder_swaps_renames_is_put_back(tmp_path, monkeypatch):
    from lora_fast.io import atomic_directory, recover_directory

    path = tmp_path / "best"
    with atomic_directory(path) as tmp:
        (tmp / "weights.bin").write_bytes(b"old")
    kill_at_rename(monkeypatch, 2)  # 1: the old folder into its hidden holder, 2: the new one into place
    with pytest.raises(KeyboardInterrupt), atomic_directory(path) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    monkeypatch.undo()
    holders = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert not path.exists() and len(holders) == 1 and (holders[0] / "best" / "weights.bin").read_bytes() == b"old"
    (tmp_path / ".best.not-ours.old" / "best").mkdir(parents=True)  # not our naming: "-" is never drawn
    assert recover_directory(path) is True
    assert (path / "weights.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.not-ours.old", "best"]  # its holder is gone
    assert recover_directory(path) is False  # there already: nothing to do
    assert recover_directory(tmp_path / "never") is False and not (tmp_path / "never").exists()


def test_a_folder_write_after_a_kill_starts_from_the_old_folder(tmp_path):
    from lora_fast.io import atomic_directory

    path = tmp_path / "best"
    (tmp_path / ".best.a1b2c3d4.old" / "best").mkdir(parents=True)
    (tmp_path / ".best.a1b2c3d4.old" / "best" / "weights.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="failed"), atomic_directory(path):
        raise RuntimeError("the write failed")
    assert (path / "weights.bin").read_bytes() == b"old"  # a failed write keeps the old folder, put back first
    with atomic_directory(path) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    assert (path / "weights.bin").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_lora_adapter_left_aside_by_a_kill_loads(tmp_path):
    model = _tuned(1)
    save_adapter(model, tmp_path / "stash")
    (tmp_path / ".adapter.k2j4h1x9.old").mkdir()
    (tmp_path / "stash").rename(tmp_path / ".adapter.k2j4h1x9.old" / "adapter")
    assert torch.equal(_logits(load_adapter(_gpt2(), tmp_path / "adapter")), _logits(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ---------------------------------------------------------------- half-precision adapter files


def test_fp16_file_loads_into_fp32_lora_weights_like_peft(tmp_path):
    _peft_adapter(tmp_path / "fp32", "gpt2")
    shutil.copytree(tmp_path / "fp32", tmp_path / "fp16")
    weights = tmp_path / "fp16" / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, str(weights))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _logits(peft.PeftModel.from_pretrained(_gpt2(), str(tmp_path / "fp16")).eval())
    fresh = load_adapter(_gpt2(), tmp_path / "fp16")
    with_lora = load_adapter(apply_lora(_gpt2(), TARGETS["gpt2"], r=4, alpha=8), tmp_path / "fp16")
    for model in (fresh, with_lora):
        assert {layer.lora_A.dtype for _, layer in lora_fast.lora_modules(model)} == {torch.float32}
        torch.testing.assert_close(_logits(model), theirs, rtol=1e-5, atol=1e-5)
    # A half-precision base gets fp32 LoRA weights too (PEFT's autocast_adapter_dtype), from apply_lora and on load.
    half = load_adapter(_gpt2().to(torch.bfloat16), tmp_path / "fp16")
    assert {layer.lora_A.dtype for _, layer in lora_fast.lora_modules(half)} == {torch.float32}
    assert apply_lora(_gpt2().half(), ["c_attn"], r=4, alpha=8).transformer.h[0].attn.c_attn.lora_B.dtype == (
        torch.float32
    )
    # Narrowing is refused on both paths: fp32 file, LoRA weights made bf16 by hand.
    narrow = apply_lora(_gpt2(), TARGETS["gpt2"], r=4, alpha=8).to(torch.bfloat16)
    with pytest.raises(AdapterError, match="holds dtype torch.float32, the model's LoRA weight is torch.bfloat16"):
        load_adapter(narrow, tmp_path / "fp32")


# ---------------------------------------------------------------- merge / unmerge exactness


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_the_weights_bit_for_bit(dtype):
    model = apply_lora(_gpt2().to(dtype), ["c_attn", "c_proj"], r=4, alpha=8)
    _randomise_lora(model)
    before = {n: layer.base.weight.clone() for n, layer in lora_fast.lora_modules(model)}
    base = _logits(model)
    for _ in range(3):
        lora_fast.merge_lora(model)
        assert not torch.equal(model.transformer.h[0].attn.c_attn.base.weight, before["transformer.h.0.attn.c_attn"])
        with lora_fast.disable_lora(model):
            assert all(torch.equal(layer.base.weight, before[n]) for n, layer in lora_fast.lora_modules(model))
        lora_fast.unmerge_lora(model)
    assert all(torch.equal(layer.base.weight, before[n]) for n, layer in lora_fast.lora_modules(model))
    assert all(layer.premerge_weight is None for _, layer in lora_fast.lora_modules(model))  # no copy once unmerged
    assert torch.equal(_logits(model), base)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_fp64_merge_stays_fp64(conv1d):
    # The update is computed in the weight's own precision: an fp64 layer merged through fp32 would move by ~1e-8.
    torch.manual_seed(0)
    base = Conv1D(48, 64) if conv1d else nn.Linear(64, 48)
    layer = LoRALinear(base.double(), r=8, alpha=16).eval()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    x = torch.randn(5, 64, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)
    assert layer.delta_weight().dtype == torch.float64


# ---------------------------------------------------------------- bad arguments, partial targets


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": True}, "rank r must be an integer >= 1, got True"),
        ({"r": 2.0}, "rank r must be an integer"),
        ({"alpha": math.nan}, r"alpha must be a finite non-zero real number .*, got nan"),
        ({"alpha": math.inf}, r"alpha must be a finite non-zero real number .*, got inf"),
        ({"alpha": "8"}, r"alpha must be a finite non-zero real number .*, got '8'"),
        ({"alpha": 0}, r"alpha must be a finite non-zero real number \(alpha 0 makes the scaling 0.*got 0"),
        ({"dropout": 1.5}, r"dropout must be a real number in \[0, 1\), got 1.5"),
        ({"dropout": math.nan}, "dropout must be a real number"),
        ({"dropout": "0.1"}, "dropout must be a real number"),
        ({"use_rslora": 1}, "use_rslora must be a bool"),
    ],
)
def test_bad_lora_arguments_are_refused_by_name(kwargs, message):
    args = {"r": 4, "alpha": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        LoRALinear(nn.Linear(8, 8), **args)
    model = _gpt2()
    snap = model_snapshot(model)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, ["c_attn"], **args)
    assert unchanged_since(model, snap)


def test_apply_lora_follows_peft_on_partly_matching_targets():
    model = _gpt2()
    with pytest.warns(UserWarning, match=r"target 'q_proj' matches no module of GPT2LMHeadModel"):
        apply_lora(model, ["c_attn", "q_proj"], r=4, alpha=8)
    assert [n for n, _ in lora_fast.lora_modules(model)] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]
    with pytest.raises(ValueError, match=r"'q_proj' matches no module.*'v_proj' matches no module"):
        apply_lora(_gpt2(), ["q_proj", "v_proj"], r=4, alpha=8)


def test_an_unreadable_weights_file_is_named_as_such(tmp_path, monkeypatch):
    """Permission denied is not "corrupt or truncated" (as root, the denial is simulated at open)."""
    import builtins

    save_adapter(_tuned(1), tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if str(file) == str(weights):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(AdapterError, match="cannot be read: permission denied") as err:
        load_adapter(_gpt2(), tmp_path / "adapter")
    assert "corrupt" not in str(err.value)
