"""BitFit: train only the bias terms, with a small strict checkpoint file.

BitFit (Ben Zaken et al., 2022) trains only the bias terms. Here that means the bias of every linear layer (GPT-2's
``Conv1D``: ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) and of every LayerNorm (``ln_1``,
``ln_2``, ``ln_f``); the LayerNorm gains, the embeddings and the LM head stay frozen. For GPT-2 small that is
``12 · (2304 + 768 + 3072 + 768 + 768 + 768) + 768 = 102,144`` of 124,439,808 parameters (0.082%). A model with no
bias term at all (Llama, Mistral: no linear layer has one and RMSNorm has none) gets a zero bias on every ``nn.Linear``
except the LM head, and those train: the model starts exactly equal to its base, and BitFit there means "a trainable
offset on the output of every linear layer". For SmolLM2-135M (30 blocks of q, k, v, o, gate, up, down projections):
``30 · (576 + 192 + 192 + 576 + 1536 + 1536 + 576) = 155,520`` of 134,515,008 + 155,520 parameters (0.115%). A model
with some biases (Qwen2: query, key and value) trains those it has, as on GPT-2.

Saved to their own folder by ``save_bitfit`` and loaded strictly by ``load_bitfit`` (``lora_fast.study.method_files``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lora_fast.adapters import AdapterError, read_safetensors
from lora_fast.study.method_files import check_method_state, read_method_config, save_method_files

__all__ = ["BITFIT_CONFIG", "BITFIT_WEIGHTS", "bitfit_parameter_names", "load_bitfit", "prepare_bitfit", "save_bitfit"]

BITFIT_CONFIG = "bitfit_config.json"
BITFIT_WEIGHTS = "bitfit_biases.safetensors"


def _head(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _bias_names(model: nn.Module) -> list[str]:
    head = {id(p) for p in _head(model).parameters()} if _head(model) is not None else set()
    return [n for n, p in model.named_parameters() if n.rpartition(".")[2] == "bias" and id(p) not in head]


def bitfit_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters BitFit trains: every parameter called ``bias``, except the LM head's."""
    names = _bias_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no bias parameters: BitFit has nothing to train")
    return names


def _bias_free_linears(model: nn.Module) -> list[str]:
    """The ``nn.Linear`` modules without a bias, the LM head excepted: where BitFit adds one on a bias-free model."""
    head = _head(model)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and m.bias is None and m is not head]


def _add_zero_biases(model: nn.Module, names: Sequence[str]) -> None:
    for name in names:
        linear = model.get_submodule(name)
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=w.dtype, device=w.device))
    model.bitfit_added_biases = list(names)


def prepare_bitfit(model: nn.Module) -> nn.Module:
    """Freeze every parameter, then let only the bias terms train (see the module docstring for which); a model with
    no bias term at all first gets zero biases on its linear layers (recorded in ``model.bitfit_added_biases``)."""
    if not _bias_names(model):
        _add_zero_biases(model, _bias_free_linears(model))
    names = set(bitfit_parameter_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    model.peft_method = "bitfit"
    return model


def save_bitfit(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the bias terms (``bitfit_biases.safetensors``) and their names and shapes (``bitfit_config.json``, with
    ``added_biases``: the linear layers that got a bias from ``prepare_bitfit``) to ``directory``, atomically. The
    biases are stored whole, so loading needs the same base model."""

    params = dict(model.named_parameters())
    state = {name: params[name].detach().contiguous() for name in bitfit_parameter_names(model)}
    added = list(getattr(model, "bitfit_added_biases", []))
    return save_method_files(model, directory, state, "bitfit", BITFIT_WEIGHTS, BITFIT_CONFIG, added_biases=added)


def load_bitfit(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load biases saved by ``save_bitfit`` into ``model`` and make it a BitFit model (``prepare_bitfit``).

    Every check runs before the model is touched: the file's added biases must be exactly the ones
    ``prepare_bitfit`` adds to this model (its bias-free ``nn.Linear`` layers, on a model with no bias at all) or the
    ones it has added already, and the file must hold exactly the model's bias names with its shapes, finite
    floating-point values, and agree with its config."""
    directory = Path(directory)
    config = read_method_config(directory, BITFIT_CONFIG, "bitfit")
    added = config.get("added_biases", [])
    if not isinstance(added, list) or not all(isinstance(n, str) for n in added):
        raise AdapterError(f"{directory / BITFIT_CONFIG}: added_biases must be a list of module names")
    state = read_safetensors(directory / BITFIT_WEIGHTS)
    params = dict(model.named_parameters())
    expected = {name: tuple(params[name].shape) for name in _bias_names(model)}
    have = list(getattr(model, "bitfit_added_biases", []))
    pending = []  # the file's added biases that the model does not have yet
    if added != have:
        if have:
            raise AdapterError(
                f"{directory / BITFIT_CONFIG}: the file adds biases to {len(added)} layers, the model has added "
                f"biases to {len(have)} others already"
            )
        free = _bias_free_linears(model)
        if _bias_names(model) or sorted(added) != sorted(free):
            raise AdapterError(
                f"{directory / BITFIT_CONFIG}: the file adds biases to {len(added)} linear layers ({added[:2]}, ...), "
                f"but {type(model).__name__} has {len(_bias_names(model))} biases and {len(free)} bias-free linear "
                f"layers ({free[:2]}, ...): not the base model the file was trained on"
            )
        pending = added
        modules = dict(model.named_modules())
        expected |= {f"{n}.bias": (modules[n].out_features,) for n in added}
    check_method_state(state, expected, config, directory / BITFIT_WEIGHTS)
    if pending:
        _add_zero_biases(model, pending)
    prepare_bitfit(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in expected:
            params[name].copy_(state[name])
    return model
