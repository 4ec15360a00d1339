"""SmolLM2-135M-Instruct, a real pretrained model: the GGUF file loads as a plain tied fp32 model and converts to a
model folder that gives the same logits; LoRA with our ``torch`` backend gives HF PEFT's logits and LoRA gradients on
the same weights; an adapter we trained loads in PEFT with the same logits; full fine-tuning keeps the tied
embeddings through a save and a load; a short training run lowers the label token's validation loss; and
``train_sentiment.py`` runs on the converted folder.

Tolerances (fp32 on CPU, the same weights, GEMMs blocked differently): logits (magnitude ~10-30) within 1e-4
absolute + 1e-4 relative; LoRA gradients as stated in the PEFT comparison's docstring.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from lora_fast import apply_lora, count_parameters, load_adapter, lora_modules, merge_and_unload, save_adapter
from lora_fast.study.causal_lm import LastTokenLM, default_targets, load_causal_lm
from lora_fast.study.data import load_splits, subset
from lora_fast.study.errors import ModelLoadError
from lora_fast.study.evaluate import predict_split, val_loss
from lora_fast.study.gguf import save_model_folder
from lora_fast.study.methods import METHODS
from lora_fast.study.prompts import INSTRUCTIONS, encode_prompt, encode_split, label_token_ids
from lora_fast.study.training import collate, make_optimizer, step_batches, train_step
from tests.helpers import run_script

pytestmark = pytest.mark.real

TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "the story is lame and the acting is worse .",
    "if you sometimes like to go to the movies to have fun , wasabi is a good place to start .",
]
LOGITS = {"atol": 1e-4, "rtol": 1e-4}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _batch(tokenizer, labels=(1, 0, 1)):
    """The three reviews as right-padded prompts ending at "Label:", and their label tokens."""
    split = encode_split(
        [{"text": t, "label": y} for t, y in zip(TEXTS, labels, strict=True)],
        tokenizer,
        INSTRUCTIONS["default"],
        256,
    )
    return collate(split.sequences, tokenizer.pad_token_id, "right"), torch.tensor(split.targets)


def _hf_logits_at_labels(model, batch) -> torch.Tensor:
    """HF's full forward (logits at every position), then each row's last real position."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits
    return logits[torch.arange(len(logits)), batch["last_index"]]


@pytest.fixture(scope="module")
def smollm2_folder(smollm2, tmp_path_factory):
    """The session's model written as a plain model folder (what `python -m lora_fast.study.gguf OUT` writes)."""
    return save_model_folder(*smollm2, tmp_path_factory.mktemp("smollm2") / "model")


def test_gguf_loads_as_a_plain_tied_fp32_model(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model.config, "quantization_config", None)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the file
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert count_parameters(model)[1] == 134_515_008
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert label_token_ids(tokenizer) == (3524, 2731)
    assert default_targets(model.config.model_type) == TARGETS
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :]).startswith(" Paris")  # real weights, not random


def test_converted_folder_gives_the_same_model(smollm2, smollm2_folder):
    model, tokenizer = smollm2
    loaded, loaded_tokenizer = load_causal_lm(str(smollm2_folder))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    batch, _ = _batch(tokenizer)
    assert torch.equal(_batch(loaded_tokenizer)[0]["input_ids"], batch["input_ids"])
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        assert torch.equal(_hf_logits_at_labels(loaded.eval(), batch), _hf_logits_at_labels(model, batch))
    with pytest.raises(ModelLoadError, match="not an empty folder"):
        save_model_folder(model, tokenizer, smollm2_folder)


def _lora_grads(layers: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (a.grad.clone(), b.grad.clone()) for name, (a, b) in layers.items()}


def _assert_grads_close(ours: dict, theirs: dict, of_largest: float) -> None:
    """Every LoRA gradient within ``of_largest`` times its layer's largest gradient (plus 1e-4 relative)."""
    for name, pair in theirs.items():
        for mine, want in zip(ours[name], pair, strict=True):
            scale = float(want.abs().max())
            assert scale > 0, name
            torch.testing.assert_close(
                mine, want, rtol=1e-4, atol=of_largest * scale, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_lora_torch_backend_matches_peft_logits_and_gradients(smollm2):
    """Our LoRA (torch backend) against HF PEFT on the same weights (B non-zero), fp32: through the same forward
    (LastTokenLM, and HF's own) the logits agree to 1e-5 and the LoRA gradients to 1e-4 of each layer's largest
    (measured here: equal logits, 7e-6). Our LastTokenLM against PEFT's HF forward agrees to 1e-4 in the logits and
    to 2e-3 of the largest in the gradients (measured 8e-4): on a CPU the label-row head's backward is a skinny
    (B x 49,152) @ (49,152 x 576) product that MKL sums with ~1e-5 relative error where HF's all-position product has
    ~7e-7, and 30 blocks of backward carry that to the first layers' LoRA gradients; in fp64 the two agree to 1e-15."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = smollm2
    ours = apply_lora(copy.deepcopy(model), TARGETS, r=8, alpha=16, dropout=0.0, backend="torch")
    theirs = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    )
    torch.manual_seed(1)
    ours_layers = {name: (layer.lora_A, layer.lora_B) for name, layer in lora_modules(ours)}
    assert len(ours_layers) == 4 * 30
    theirs_layers = {}
    with torch.no_grad():
        for name, (a, b) in ours_layers.items():
            b.normal_(std=0.02)  # non-zero B, so the LoRA branch changes the logits and A gets gradients
            peft_layer = theirs.get_submodule(f"base_model.model.{name}")
            theirs_layers[name] = (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)
            theirs_layers[name][0].copy_(a)
            theirs_layers[name][1].copy_(b)
    batch, target = _batch(tokenizer)
    with torch.no_grad():
        base = _hf_logits_at_labels(model, batch)
    results = {}
    for who, net, layers in (("ours", ours, ours_layers), ("peft", theirs, theirs_layers)):
        net.train()
        for path in ("label rows", "hf"):
            if path == "hf":
                logits = _hf_logits_at_labels(net, batch)
            else:
                logits = LastTokenLM(net.get_base_model() if who == "peft" else net)(**batch)
            F.cross_entropy(logits, target).backward()
            results[who, path] = (logits.detach(), _lora_grads(layers))
            net.zero_grad(set_to_none=True)
    assert (results["ours", "label rows"][0] - base).abs().max() > 1e-2  # LoRA took part
    for path in ("label rows", "hf"):
        torch.testing.assert_close(results["ours", path][0], results["peft", path][0], atol=1e-5, rtol=1e-5)
        _assert_grads_close(results["ours", path][1], results["peft", path][1], of_largest=1e-4)
    torch.testing.assert_close(results["ours", "label rows"][0], results["peft", "hf"][0], **LOGITS)
    _assert_grads_close(results["ours", "label rows"][1], results["peft", "hf"][1], of_largest=2e-3)


def test_adapter_we_trained_loads_in_peft_with_the_same_logits(smollm2, tmp_path):
    from peft import PeftModel

    model, tokenizer = smollm2
    ours = apply_lora(copy.deepcopy(model), TARGETS, r=8, alpha=16, dropout=0.05, backend="torch")
    optimizer = make_optimizer(ours, 1e-3)
    batch, target = _batch(tokenizer)
    for _ in range(2):
        train_step(LastTokenLM(ours.train()), optimizer, [batch], [target])
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(TARGETS) and config["r"] == 8
    with torch.no_grad():
        want = _hf_logits_at_labels(ours.eval(), batch)
        assert (want - _hf_logits_at_labels(model, batch)).abs().max() > 1e-3  # the adapter moved the logits
        peft = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(_hf_logits_at_labels(peft, batch), want, **LOGITS)
        back = load_adapter(copy.deepcopy(model), tmp_path / "adapter", backend="torch").eval()
        torch.testing.assert_close(_hf_logits_at_labels(back, batch), want, **LOGITS)
        merged = merge_and_unload(back)  # a float model: the dequantised weights plus the LoRA update
        assert not list(lora_modules(merged))
        torch.testing.assert_close(_hf_logits_at_labels(merged, batch), want, **LOGITS)


def test_full_fine_tuning_keeps_the_tie_through_save_and_load(smollm2, smollm2_copy, tmp_path):
    model, tokenizer = smollm2
    full = METHODS["full"]
    trained = full.prepare(smollm2_copy).train()
    embeddings_before = model.model.embed_tokens.weight.detach().clone()
    batch, target = _batch(tokenizer)
    train_step(LastTokenLM(trained), make_optimizer(trained, 1e-4), [batch], [target])
    assert trained.lm_head.weight is trained.model.embed_tokens.weight
    assert not torch.equal(trained.model.embed_tokens.weight, embeddings_before)  # the step moved the embeddings
    full.save(trained, tokenizer, tmp_path / "full")
    loaded = full.load(copy.deepcopy(model), tmp_path / "full")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, trained.model.embed_tokens.weight)
    with torch.no_grad():
        torch.testing.assert_close(
            _hf_logits_at_labels(loaded.eval(), batch), _hf_logits_at_labels(trained.eval(), batch), atol=0, rtol=0
        )


def test_short_training_lowers_the_label_token_validation_loss(smollm2, real_data_dir):
    model, tokenizer = smollm2
    splits = load_splits(str(real_data_dir))
    train = encode_split(subset(splits["train"], 64, 42), tokenizer, INSTRUCTIONS["default"], 256)
    val = encode_split(subset(splits["validation"], 32, 42), tokenizer, INSTRUCTIONS["default"], 256)
    torch.manual_seed(0)
    lora = apply_lora(copy.deepcopy(model), TARGETS, r=8, alpha=16, dropout=0.05, backend="torch")
    pad = tokenizer.pad_token_id
    before = val_loss(lora, val.sequences, val.targets, pad, batch_size=16)
    optimizer, module = make_optimizer(lora, 1e-3), LastTokenLM(lora.train())
    for step in range(6):
        batches, targets = step_batches(train, step, 8, 8, 42, pad)
        train_step(module, optimizer, batches, targets)
    after = val_loss(lora, val.sequences, val.targets, pad, batch_size=16)
    assert after < 0.7 * before, (before, after)


def test_one_forward_scores_as_the_two_passes(smollm2, real_data_dir):
    """``predict_split``'s one forward per prompt (label logits from HF's forward, generation continued from its
    cache) against the two passes (``LastTokenLM``, then ``generate`` over ``prompt + " "``) on 16 test prompts, and
    one prompt ending in a space, which SmolLM2's tokenizer merges with the appended one: it takes the two passes."""
    model, tokenizer = smollm2
    test = subset(load_splits(str(real_data_dir))["test"], 16, 0)
    split = encode_split(test, tokenizer, INSTRUCTIONS["default"], 256)
    split.prompts.append(split.prompts[0] + " ")
    split.sequences.append(encode_prompt(tokenizer, split.prompts[-1], 256))
    split.labels.append(split.labels[0])
    split.targets.append(split.targets[0])
    one = predict_split(model, tokenizer, split, batch_size=8, max_length=256)
    two = predict_split(model, tokenizer, split, batch_size=8, max_length=256, share=False)
    assert one.shared == set(range(16))
    for i in range(17):
        torch.testing.assert_close(one.label_logits[i], two.label_logits[i], **LOGITS)
        assert int(one.label_logits[i].argmax()) == int(two.label_logits[i].argmax()), i
    assert one.generated == two.generated


def test_train_sentiment_runs_on_the_converted_folder(smollm2_folder, real_data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--fused", "--model", smollm2_folder, "--data-dir", real_data_dir, "--out", out, "--max-steps", "2"]
    args += ["--batch-size", "4", "--train-subset", "16", "--max-val", "8", "--max-test", "16", "--eval-every", "1"]
    proc = run_script([*args, "--no-generation"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_test"] == 16 and summary["steps"] == 2 and 0 <= summary["test"]["last"]["label_acc"] <= 1
    config = json.loads((out / "adapter_last" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(TARGETS)  # the Llama default, no --targets given
