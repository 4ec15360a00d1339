"""Adapter files in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A folder written by ``save_adapter`` loads with ``peft.PeftModel.from_pretrained``, and a LoRA adapter saved by PEFT
loads with ``load_adapter``. Loading is strict, unlike PEFT (which only warns on missing keys): a missing or
unexpected key, a shape or dtype mismatch, a truncated or corrupt file, or a config that doesn't fit the model is
refused with an error naming the problem, and the model is left exactly as it was.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from lora_fast.io import atomic_save_tensors
from lora_fast.layers import in_out_features, lora_scaling
from lora_fast.model import (
    PEFT_PREFIX,
    apply_lora,
    find_targets,
    get_lora_config,
    lora_modules,
    lora_state_dict,
    modules_matching_regex,
    target_hits,
)

__all__ = [
    "AdapterError",
    "save_adapter",
    "load_adapter",
    "read_adapter_config",
    "base_model_name",
    "read_json_config",
    "read_safetensors",
    "check_tensors",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded into this model; the message names the problem."""


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith(("LMHeadModel", "ForCausalLM")) else None


def base_model_name(model: nn.Module) -> str | None:
    """The hub name or folder ``model`` was loaded from (its HF config's ``_name_or_path``), or None."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return name or None


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "auto",
) -> Path:
    """Write ``model``'s LoRA weights and config to ``directory`` in HF PEFT's format, atomically: the folder is
    written whole beside the target and swapped in, so an old adapter there is replaced only by a complete new one."""
    config = get_lora_config(model)
    layers = dict(lora_modules(model))
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(model) if task_type == "auto" else task_type,
        "base_model_name_or_path": base_model_name_or_path or base_model_name(model),
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(config.targets),
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": config.use_rslora,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "revision": None,
    }
    return atomic_save_tensors(directory, lora_state_dict(model), WEIGHTS_NAME, CONFIG_NAME, peft_config)


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """Read and check ``adapter_config.json``: a LoRA adapter this package can represent, or an AdapterError."""
    path = Path(directory) / CONFIG_NAME
    config = read_json_config(path, "an adapter")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise AdapterError(f"{path}: the required field {key!r} is missing")
    if not isinstance(config["r"], int) or config["r"] < 1:
        raise AdapterError(f"{path}: r must be an integer >= 1, got {config['r']!r}")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "layers_to_transform": config.get("layers_to_transform") is not None,
        "bias": config.get("bias", "none") != "none",
        "lora_bias": bool(config.get("lora_bias")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise AdapterError(f"{path}: the adapter uses {bad}, which lora-fast does not support")
    if config["target_modules"] == "all-linear":
        raise AdapterError(f"{path}: target_modules 'all-linear' is not supported; list the module names")
    return config


def read_json_config(path: Path, kind: str) -> dict:
    """The JSON object in a folder's config file ``path``; AdapterError when it is missing (not ``kind`` folder),
    unreadable or not an object."""
    if not path.is_file():
        raise AdapterError(f"no {path.name} in {path.parent}: not {kind} folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON ({exc}); the file is corrupt or truncated") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``; AdapterError when it is missing, truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise AdapterError(f"no {path.name} in {path.parent}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{path} cannot be read ({exc}); the file is corrupt or truncated") from exc


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    legacy = directory / "adapter_model.bin"
    if not (directory / WEIGHTS_NAME).is_file() and legacy.is_file():
        raise AdapterError(f"no {WEIGHTS_NAME} in {directory} ({legacy.name} is there: re-save it as safetensors)")
    return read_safetensors(directory / WEIGHTS_NAME)


def _target_names(model: nn.Module, targets) -> list[str]:
    """Module names a PEFT ``target_modules`` hits: a string is a full-match regex, a list uses the suffix rule."""
    if isinstance(targets, str):
        names = modules_matching_regex(model, targets)
        if not names:
            raise AdapterError(
                f"target_modules regex {targets!r} matches no Linear/Conv1D module of {type(model).__name__}"
            )
        return names
    try:
        return find_targets(model, targets)
    except (ValueError, TypeError) as exc:
        raise AdapterError(f"the adapter's target_modules do not fit {type(model).__name__}: {exc}") from exc


def check_tensors(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]], path: Path
) -> None:
    """Refuse (AdapterError) a ``state`` read from ``path`` unless it holds exactly the ``expected`` keys, each with
    its shape, a floating-point dtype (the expected one where one is given) and finite values."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{path} does not fit the model: missing keys {missing[:6]}"
            f"{' …' if len(missing) > 6 else ''} ({len(missing)} in all), unexpected keys "
            f"{unexpected[:6]}{' …' if len(unexpected) > 6 else ''} ({len(unexpected)} in all)"
        )
    for key, (shape, dtype) in expected.items():
        t = state[key]
        if tuple(t.shape) != shape:
            raise AdapterError(f"{key}: the file holds shape {tuple(t.shape)}, the model expects {shape}")
        if not t.is_floating_point():
            raise AdapterError(f"{key}: the file holds dtype {t.dtype}; weights must be floating point")
        if dtype is not None and t.dtype != dtype:
            raise AdapterError(
                f"{key}: the file holds dtype {t.dtype}, the model's LoRA weight is {dtype}; convert one of them first"
            )
        if not torch.isfinite(t).all():
            raise AdapterError(f"{key}: the file holds NaN or inf values")


def load_adapter(model: nn.Module, directory: str | os.PathLike, backend: str = "auto") -> nn.Module:
    """Load a PEFT-format LoRA adapter into ``model`` and return it.

    When ``model`` has no LoRA yet, LoRA is applied per the adapter's config (r, lora_alpha, lora_dropout,
    target_modules, use_rslora) with ``backend``. Everything is checked before the model is touched.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter folder {directory} does not exist")
    config = read_adapter_config(directory)
    state = _read_weights(directory)
    r = config["r"]
    existing = dict(lora_modules(model))
    if existing:
        if any(layer.merged for layer in existing.values()):
            raise AdapterError("the model's LoRA is merged into its weights; call unmerge_lora before load_adapter")
        lora_cfg = get_lora_config(model)
        if lora_cfg.r != r or lora_scaling(r, lora_cfg.alpha, lora_cfg.use_rslora) != lora_scaling(
            r, config["lora_alpha"], bool(config.get("use_rslora"))
        ):
            raise AdapterError(
                f"the model has LoRA with r={lora_cfg.r}, alpha={lora_cfg.alpha}, but the adapter "
                f"has r={r}, lora_alpha={config['lora_alpha']}"
            )
        targets = config["target_modules"]
        hit = sorted(
            n
            for n in existing
            if (re.fullmatch(targets, n) if isinstance(targets, str) else any(target_hits(n, t) for t in targets))
        )
        if hit != sorted(existing):
            raise AdapterError(
                f"the adapter's target_modules {targets!r} hit {hit} but the model has LoRA on {sorted(existing)}"
            )
        expected = {}
        for name, layer in existing.items():
            expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = ((r, layer.in_features), layer.lora_A.dtype)
            expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = ((layer.out_features, r), layer.lora_B.dtype)
        check_tensors(state, expected, directory / WEIGHTS_NAME)
        targets_layers = existing
    else:
        names = _target_names(model, config["target_modules"])
        expected = {}
        for name in names:
            k, n = in_out_features(model.get_submodule(name))
            expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = ((r, k), None)
            expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = ((n, r), None)
        check_tensors(state, expected, directory / WEIGHTS_NAME)
        dtypes = {t.dtype for t in state.values()}
        if len(dtypes) != 1:
            raise AdapterError(f"{directory / WEIGHTS_NAME} mixes dtypes {sorted(map(str, dtypes))}")
        apply_lora(
            model,
            names,
            r=r,
            alpha=config["lora_alpha"],
            dropout=float(config.get("lora_dropout") or 0.0),
            use_rslora=bool(config.get("use_rslora")),
            backend=backend,
        )
        model.lora_config.targets = (
            list(config["target_modules"]) if not isinstance(config["target_modules"], str) else names
        )
        targets_layers = dict(lora_modules(model))
        file_dtype = dtypes.pop()
        for layer in targets_layers.values():  # new LoRA weights take the file's dtype (fp32 masters, usually)
            layer.lora_A.data = layer.lora_A.data.to(file_dtype)
            layer.lora_B.data = layer.lora_B.data.to(file_dtype)
    with torch.no_grad():
        for name, layer in targets_layers.items():
            layer.lora_A.copy_(state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.copy_(state[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return model
