"""Small random GPT-2 and Llama models and PEFT-saved adapters on them, for the tests that hold lora-fast's adapters,
models and layers against HF PEFT."""

import json
import warnings

import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from tests.helpers import tiny_gpt2_config, tiny_llama_config

IDS = torch.tensor([[5, 17, 42, 3, 99, 64, 8], [1, 2, 3, 4, 5, 6, 7]])
TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj"]}


def small_gpt2(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(vocab_size=100, bos_token_id=0, eos_token_id=0, **overrides)).eval()


def small_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


MODELS = {"gpt2": small_gpt2, "llama": small_llama}


def randomise_lora(model, seed=1):
    """Non-zero LoRA weights, so that an adapter read wrongly changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def peft_adapter(path, kind="gpt2", **config):
    """A PEFT model (randomised LoRA, eval mode) saved to ``path``; returns its logits on IDS."""
    import peft

    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[kind], **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own notes (fan_in_fan_out flipped for Conv1D, ...)
        model = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(**config)).eval()
    randomise_lora(model)
    model.save_pretrained(str(path))
    with torch.no_grad():
        return model(IDS).logits


def logits_on_ids(model):
    with torch.no_grad():
        return model(IDS).logits


def patch_config(path, **fields):
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(fields)
    config_path.write_text(json.dumps(config))
