"""The training methods of ``train_sentiment.py``, one entry each: how a model gets the method's trainable parts
(``prepare``), how they are written to a run's ``adapter_best/`` and ``adapter_last/`` (``save``), and how such a
folder is put back into a model (``load``: ``--adapter DIR``, into a fresh model with ``--eval-only`` and into the
prepared one as training's starting point, and the best-checkpoint score).

- ``lora``: an HF PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``), loaded by
  ``lora_fast.load_adapter`` with all of its checks;
- ``full``: the whole model and its tokenizer (``gguf.write_model_folder``: a folder usable as ``--model``), loaded by
  ``from_pretrained`` (sharded files too) and refused unless every weight of the model is in it and nothing else;
- ``bitfit``: the biases (``bitfit``); ``bottleneck``: the bottleneck adapters (``bottleneck``); both strict files
  (``method_files``).

Every save is atomic (a folder swapped in whole), so a run killed mid-save keeps the previous one. Each method takes
its hyper-parameters as keyword arguments, named in ``Method.params`` (LoRA's ``targets``, ``r``, ``alpha``,
``dropout``, ``rslora``, ``backend``; the bottleneck's ``dim``): the script passes them, and nothing here reads its
config. ``lora``'s ``prepare`` checks ``targets`` against the model first: a target list that hits nothing, or hits a
layer LoRA cannot wrap or a tied weight, is a one-line ``UsageError`` naming ``--targets``. A new method is one more
entry here, and its flags in the script.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from lora_fast import AdapterError, apply_lora, load_adapter, save_adapter
from lora_fast.io import recover_directory
from lora_fast.study.bitfit import load_bitfit, prepare_bitfit, save_bitfit
from lora_fast.study.bottleneck import apply_bottleneck_adapters, load_bottleneck_adapters, save_bottleneck_adapters
from lora_fast.study.causal_lm import check_targets
from lora_fast.study.errors import first_line
from lora_fast.study.gguf import write_model_folder

__all__ = ["Method", "METHODS", "METHOD_ALIASES"]

PathLike = str | os.PathLike


class Method(NamedTuple):
    prepare: Callable[..., nn.Module]  # (fresh model, **params) -> the model, only the method's part trains
    save: Callable[[nn.Module, Any, PathLike], Any]  # (model, tokenizer, folder)
    load: Callable[..., nn.Module]  # (fresh or prepared model, folder, **params) -> the model
    params: tuple[str, ...] = ()  # the keyword arguments prepare takes (load takes those it needs of them)


def _load_full(model: nn.Module, directory: PathLike) -> nn.Module:
    """Every weight of ``model`` from the folder ``write_model_folder`` wrote (one file or shards), strictly: a key
    missing, unexpected or of another shape is an AdapterError and ``model`` is left as it was. A folder a killed save
    left aside (``lora_fast.io.recover_directory``) is put back first."""
    recover_directory(directory)
    try:
        saved, info = type(model).from_pretrained(
            str(directory), config=copy.deepcopy(model.config), dtype=model.dtype, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{directory}: not a loadable model folder ({first_line(exc)})") from None
    problems = {kind: sorted(keys)[:6] for kind, keys in info.items() if keys}
    if problems:
        raise AdapterError(f"{Path(directory)} does not fit the model: {problems}")
    model.load_state_dict(saved.state_dict(), strict=True)
    return model


def _prepare_lora(
    model: nn.Module, targets, r: int, alpha: float, dropout: float, rslora: bool, backend: str
) -> nn.Module:
    """``apply_lora`` after the checks of ``targets`` that need the model (``check_targets``: their refusals are
    one-line UsageErrors); anything ``apply_lora`` raises after them is a bug and keeps its traceback."""
    check_targets(model, targets)
    return apply_lora(model, targets, r, alpha, dropout, rslora, backend)


METHODS: dict[str, Method] = {
    "lora": Method(
        prepare=_prepare_lora,
        save=lambda model, tokenizer, directory: save_adapter(model, directory),
        load=lambda model, directory, backend="auto", **params: load_adapter(model, directory, backend=backend),
        params=("targets", "r", "alpha", "dropout", "rslora", "backend"),
    ),
    "full": Method(prepare=lambda model: model, save=write_model_folder, load=_load_full),
    "bitfit": Method(
        prepare=prepare_bitfit,
        save=lambda model, tokenizer, directory: save_bitfit(model, directory),
        load=load_bitfit,
    ),
    "bottleneck": Method(
        prepare=lambda model, dim: apply_bottleneck_adapters(model, dim),
        save=lambda model, tokenizer, directory: save_bottleneck_adapters(model, directory),
        load=lambda model, directory, **params: load_bottleneck_adapters(model, directory),
        params=("dim",),
    ),
}
# Old names that still work, and the name they stand for.
METHOD_ALIASES = {"adapter": "bottleneck"}
