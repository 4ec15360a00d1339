"""The small strict checkpoint files of BitFit and bottleneck adapters: one safetensors file and its JSON config.

The config records the method, the base model, the method's own fields and every tensor's shape and the parameter
count. The pair is written as ``save_adapter`` writes LoRA's (``lora_fast.io.atomic_save_tensors``): a new folder
holding both, and every other file of the old one, is swapped in, so a save killed at any moment leaves the previous
pair or the new one. Loading goes through the library's adapter-file checks (a missing or unexpected key, a wrong
shape, a corrupt file: an ``AdapterError`` naming the problem, and the model left exactly as it was), then the
config's shapes are held against the weights'.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lora_fast.adapters import AdapterError, base_model_name, check_tensors, read_json_config
from lora_fast.io import atomic_save_tensors, recover_directory

__all__ = ["check_method_state", "read_method_config", "save_method_files"]


def save_method_files(
    model: nn.Module, directory, state: dict[str, torch.Tensor], method: str, weights: str, config: str, **fields
) -> Path:
    """``state`` as the safetensors file ``weights`` and its JSON ``config`` (the method, the base model, ``fields``,
    every tensor's shape, the parameter count) in ``directory``, the two as one change (``atomic_save_tensors``)."""
    meta = {"method": method, "base_model_name_or_path": base_model_name(model), **fields}
    meta |= {
        "shapes": {k: list(t.shape) for k, t in state.items()},
        "num_parameters": sum(t.numel() for t in state.values()),
    }
    return atomic_save_tensors(directory, state, weights, config, meta)


def read_method_config(directory: Path, filename: str, method: str) -> dict:
    recover_directory(directory)  # a folder a killed whole-folder save left aside
    if not directory.is_dir():
        raise AdapterError(f"folder {directory} does not exist")
    path = directory / filename
    config = read_json_config(path, f"a {method}")
    if config.get("method") != method:
        raise AdapterError(f"{path}: method is {config.get('method')!r}, expected {method!r}")
    if not isinstance(config.get("shapes"), dict):
        raise AdapterError(f"{path}: the required field 'shapes' is missing")
    return config


def check_method_state(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], config: dict, path: Path
) -> None:
    """The library's checks (keys, shapes, floating point, finite), then the config's shapes against the weights'."""
    check_tensors(state, {key: (tuple(shape), None) for key, shape in expected.items()}, path)
    for key, shape in expected.items():
        if tuple(config["shapes"].get(key, ())) != tuple(shape):
            raise AdapterError(f"{key}: the config says shape {config['shapes'].get(key)}, the weights {shape}")
