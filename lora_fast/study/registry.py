"""Each training method's own weight files: ``train_sentiment.py``'s ``adapter_best/`` and ``adapter_last/``.

- ``lora``: an HF PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``, ``lora_fast.adapters``);
- ``full``: the whole model and its tokenizer, a folder usable as ``--model``;
- ``bitfit``: the biases; ``adapter``: the bottleneck adapters (both ``lora_fast.study.methods``' strict files).

Every folder is written atomically, so a run killed mid-save keeps the previous one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["save_weights", "load_weights"]


def save_weights(model: nn.Module, tokenizer, method: str, directory: str | os.PathLike) -> None:
    """Write ``method``'s files for ``model`` to ``directory`` (the tokenizer is saved with ``full`` only)."""
    from lora_fast import save_adapter
    from lora_fast.io import atomic_directory

    if method == "lora":
        save_adapter(model, directory)
    elif method == "full":
        with atomic_directory(directory) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    elif method == "bitfit":
        from lora_fast.study.methods import save_bitfit

        save_bitfit(model, directory)
    else:
        from lora_fast.study.methods import save_bottleneck_adapters

        save_bottleneck_adapters(model, directory)


def load_weights(model: nn.Module, method: str, directory: str | os.PathLike) -> None:
    """Put ``save_weights``' files back into ``model``: a model prepared for ``method``; for bitfit and adapter also
    the plain model (their loaders add the trainable parts)."""
    from safetensors.torch import load_file

    from lora_fast.model import PEFT_PREFIX

    if method == "lora":
        state = load_file(str(Path(directory) / "adapter_model.safetensors"))
        with torch.no_grad():
            for key, tensor in state.items():
                module, _, which = key[len(PEFT_PREFIX) :].removesuffix(".weight").rpartition(".")
                getattr(model.get_submodule(module), which).copy_(tensor)
    elif method == "full":
        model.load_state_dict(load_file(str(Path(directory) / "model.safetensors")), strict=False)
    elif method == "bitfit":
        from lora_fast.study.methods import load_bitfit

        load_bitfit(model, directory)
    else:
        from lora_fast.study.methods import load_bottleneck_adapters

        load_bottleneck_adapters(model, directory)
