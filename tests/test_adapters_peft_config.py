"""Adapter files against PEFT's config space (``lora_fast.adapters``): every ``LoraConfig`` field decided, real PEFT
adapters with features we do not implement refused, half-precision files, unreadable files named.

The config fuzz enumerates ``dataclasses.fields(peft.LoraConfig)`` itself: every field of the installed PEFT needs a
row in ``CASES``, so a field a new PEFT release adds fails ``test_every_peft_field_is_decided`` until it is decided.
Each row's value either round-trips (our logits = PEFT's within 1e-5) or is refused with the field and value named.
"""

import dataclasses
import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_fast
from lora_fast import AdapterError, apply_lora, load_adapter, save_adapter
from tests.helpers import model_snapshot, unchanged_since
from tests.peft_models import MODELS, TARGETS, logits_on_ids, patch_config, peft_adapter, randomise_lora, small_gpt2

peft = pytest.importorskip("peft", reason="HF PEFT is a dev dependency: pip install -e '.[dev]'")

PEFT_FIELDS = {f.name for f in dataclasses.fields(peft.LoraConfig)}


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
    return {kind: (root / kind, peft_adapter(root / kind, kind)) for kind in MODELS}


@pytest.mark.parametrize("field, value, expect, how, kind", CASES, ids=[f"{c[0]}={c[1]!r}"[:60] for c in CASES])
def test_peft_config_field(tmp_path, saved, field, value, expect, how, kind):
    if field not in PEFT_FIELDS | NOT_PEFT_FIELDS:
        pytest.skip(f"the installed peft has no field {field!r}")
    if how == "peft":
        path = tmp_path / "adapter"
        theirs = peft_adapter(path, kind, **{field: value})
    else:
        source, theirs = saved[kind]
        path = tmp_path / "adapter"
        shutil.copytree(source, path)
        patch_config(path, **{field: value})
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
    torch.testing.assert_close(logits_on_ids(model), theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_on_ids(model), logits_on_ids(MODELS[kind](seed=0)), atol=1e-3)  # the adapter acts


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
    peft_adapter(tmp_path / "adapter", kind, **feature)
    field = next(k for k in feature if k != "task_type")
    with pytest.raises(AdapterError, match=field):
        load_adapter(MODELS[kind](), tmp_path / "adapter")


# ---------------------------------------------------------------- half-precision adapter files


def test_fp16_file_loads_into_fp32_lora_weights_like_peft(tmp_path):
    peft_adapter(tmp_path / "fp32", "gpt2")
    shutil.copytree(tmp_path / "fp32", tmp_path / "fp16")
    weights = tmp_path / "fp16" / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, str(weights))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = logits_on_ids(peft.PeftModel.from_pretrained(small_gpt2(), str(tmp_path / "fp16")).eval())
    fresh = load_adapter(small_gpt2(), tmp_path / "fp16")
    with_lora = load_adapter(apply_lora(small_gpt2(), TARGETS["gpt2"], r=4, alpha=8), tmp_path / "fp16")
    for model in (fresh, with_lora):
        assert {layer.lora_A.dtype for _, layer in lora_fast.lora_modules(model)} == {torch.float32}
        torch.testing.assert_close(logits_on_ids(model), theirs, rtol=1e-5, atol=1e-5)
    # A half-precision base gets fp32 LoRA weights too (PEFT's autocast_adapter_dtype), from apply_lora and on load.
    half = load_adapter(small_gpt2().to(torch.bfloat16), tmp_path / "fp16")
    assert {layer.lora_A.dtype for _, layer in lora_fast.lora_modules(half)} == {torch.float32}
    assert apply_lora(small_gpt2().half(), ["c_attn"], r=4, alpha=8).transformer.h[0].attn.c_attn.lora_B.dtype == (
        torch.float32
    )
    # Narrowing is refused on both paths: fp32 file, LoRA weights made bf16 by hand.
    narrow = apply_lora(small_gpt2(), TARGETS["gpt2"], r=4, alpha=8).to(torch.bfloat16)
    with pytest.raises(AdapterError, match="holds dtype torch.float32, the model's LoRA weight is torch.bfloat16"):
        load_adapter(narrow, tmp_path / "fp32")


def _tuned(seed, alpha=8):
    model = apply_lora(small_gpt2(), ["c_attn", "c_proj"], r=4, alpha=alpha)
    randomise_lora(model, seed)
    return model


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
        load_adapter(small_gpt2(), tmp_path / "adapter")
    assert "corrupt" not in str(err.value)
