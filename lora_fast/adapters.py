"""Adapter files in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A folder written by ``save_adapter`` loads with ``peft.PeftModel.from_pretrained``, and a LoRA adapter saved by PEFT
loads with ``load_adapter``. Loading is strict, unlike PEFT (which only warns on missing keys): a missing or
unexpected key, a shape mismatch, a narrowing dtype, a truncated or corrupt file, or a config that doesn't fit the model
is refused with an error naming the problem, and the model is left exactly as it was.

The config is read against an allow-list of PEFT's ``LoraConfig`` fields (:data:`PEFT_LORA_FIELDS`): each field is
either bookkeeping, implemented exactly, or accepted only with the value that switches its feature off. Anything else,
including a field a newer PEFT adds, is refused by name: an adapter whose math lora-fast does not implement (PiSSA,
DoRA, aLoRA, rank patterns, ...) must not load as plain LoRA.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_fast.io import atomic_save_tensors, recover_directory
from lora_fast.layers import in_out_features, is_linear_layer, lora_dtype, lora_scaling
from lora_fast.model import (
    PEFT_PREFIX,
    apply_lora,
    check_untied,
    get_lora_config,
    lora_modules,
    lora_state_dict,
    match_targets,
    report_unmatched,
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
    "PEFT_LORA_FIELDS",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# The weights' safetensors metadata records the config fields that give them their meaning, so a weights file beside
# a config from another save (a save interrupted between its two renames) is refused instead of loaded wrongly.
BINDING_KEY = "lora_fast.adapter_config"
BOUND_FIELDS = ("r", "lora_alpha", "use_rslora", "target_modules")


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded into this model; the message names the problem."""


def _is(*values: Any) -> Callable[[Any], bool]:
    """Accepted only as one of ``values``, type included (so ``0`` is not ``False`` and ``{}`` is not ``None``)."""
    return lambda v: any(type(v) is type(x) and v == x for x in values)


def _anything(_: Any) -> bool:
    return True


def _targets_ok(v: Any) -> bool:
    if isinstance(v, str):
        return bool(v) and v != "all-linear"
    return isinstance(v, list) and bool(v) and all(isinstance(t, str) and t for t in v)


_OFF = "its default (the feature off)"

# field -> (accepts(value), what is accepted). Every field of peft 0.21's LoraConfig is here; see the module docstring.
PEFT_LORA_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    # Bookkeeping: no effect on what the adapter computes.
    "peft_type": (_is("LORA"), "'LORA'"),
    "task_type": (_anything, "any"),
    "auto_mapping": (_anything, "any"),
    "peft_version": (_anything, "any"),
    "base_model_name_or_path": (_anything, "any"),
    "revision": (_anything, "any"),
    "inference_mode": (_anything, "any"),
    "runtime_config": (_anything, "any (runtime only)"),
    "fan_in_fan_out": (_anything, "any (the layer type decides, as in PEFT)"),
    "megatron_core": (_anything, "any (read only with megatron_config)"),
    "qalora_group_size": (_anything, "any (read only with use_qalora)"),
    "ensure_weight_tying": (_anything, "any (LoRA on a tied weight is refused)"),
    # Plain LoRA, implemented exactly.
    "r": (lambda v: type(v) is int and v >= 1, "an integer >= 1"),
    "lora_alpha": (lambda v: type(v) in (int, float) and math.isfinite(v) and v != 0, "a finite non-zero number"),
    "lora_dropout": (lambda v: v is None or (type(v) in (int, float) and 0 <= v < 1), "a number in [0, 1)"),
    "use_rslora": (_is(True, False), "true or false"),
    "target_modules": (_targets_ok, "a list of module names or a regex string, not 'all-linear'"),
    # Initialisation only: the saved A and B are plain LoRA. PiSSA, OLoRA, CorDA, LoftQ, EVA and LoRA-GA change the
    # base weight, MiCA is a variant: refused.
    "init_lora_weights": (_is(True, False, "gaussian", "orthogonal"), "true, false, 'gaussian' or 'orthogonal'"),
    # Features lora-fast does not implement: accepted only switched off.
    "bias": (_is("none"), "'none'"),
    "lora_bias": (_is(False), _OFF),
    "use_dora": (_is(False), _OFF),
    "use_qalora": (_is(False), _OFF),
    "exclude_modules": (_is(None, []), _OFF),
    "modules_to_save": (_is(None, []), _OFF),
    "layers_to_transform": (_is(None), _OFF),
    "layers_pattern": (_is(None, [], ""), _OFF),
    "rank_pattern": (_is({}, None), _OFF),
    "alpha_pattern": (_is({}, None), _OFF),
    "megatron_config": (_is(None), _OFF),
    "trainable_token_indices": (_is(None), _OFF),
    "target_parameters": (_is(None, []), _OFF),
    "layer_replication": (_is(None), _OFF),
    "alora_invocation_tokens": (_is(None), _OFF),
    "loftq_config": (_is({}, None), _OFF),
    "eva_config": (_is(None), _OFF),
    "corda_config": (_is(None), _OFF),
    "lora_ga_config": (_is(None), _OFF),
    "velora_config": (_is(None), _OFF),
    "monteclora_config": (_is(None), _OFF),
    "use_bdlora": (_is(None), _OFF),
    "arrow_config": (_is(None), _OFF),
    "kasa_config": (_is(None), _OFF),
    # Fields of early PEFT releases still found in adapter files.
    "enable_lora": (_is(None), _OFF),
    "merge_weights": (_anything, "any (merging is a runtime choice)"),
}


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
    """Write ``model``'s LoRA weights and config into the folder ``directory`` in HF PEFT's format.

    Like PEFT, only ``adapter_config.json`` and ``adapter_model.safetensors`` are written; other files in the folder
    are kept, and a path that is a file is refused. The two change together (``lora_fast.io.atomic_save_tensors``:
    the folder is swapped whole), so a save killed at any moment leaves the previous adapter or the new one, never
    a mix, for this package and for PEFT alike; the weights' metadata also records the config fields they depend on,
    and ``load_adapter`` refuses a pair where they disagree.
    """
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
    binding = json.dumps({k: peft_config[k] for k in BOUND_FIELDS}, sort_keys=True)
    return atomic_save_tensors(
        directory,
        lora_state_dict(model),
        WEIGHTS_NAME,
        CONFIG_NAME,
        peft_config,
        metadata={BINDING_KEY: binding},
    )


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """Read and check ``adapter_config.json``: a LoRA adapter this package implements exactly, or an AdapterError
    naming every field (and its value) that it does not (see :data:`PEFT_LORA_FIELDS`)."""
    recover_directory(directory)
    path = Path(directory) / CONFIG_NAME
    config = read_json_config(path, "an adapter")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise AdapterError(f"{path}: the required field {key!r} is missing")
    problems = []
    for key, value in config.items():
        rule = PEFT_LORA_FIELDS.get(key)
        if rule is None:
            problems.append(f"unknown field {key!r} = {value!r} (from a newer PEFT?)")
        elif not rule[0](value):
            problems.append(f"{key}={value!r} (lora-fast implements: {rule[1]})")
    if problems:
        raise AdapterError(
            f"{path}: the adapter uses what lora-fast does not implement exactly, so it would load as a different "
            f"model: {'; '.join(problems)}"
        )
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
        with open(path, "rb"):
            pass
    except PermissionError:
        raise AdapterError(
            f"{path} cannot be read: permission denied (the file is there, this user may not read it)"
        ) from None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{path} cannot be read ({exc}); the file is corrupt or truncated") from exc


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    legacy = directory / "adapter_model.bin"
    if not (directory / WEIGHTS_NAME).is_file() and legacy.is_file():
        raise AdapterError(f"no {WEIGHTS_NAME} in {directory} ({legacy.name} is there: re-save it as safetensors)")
    return read_safetensors(directory / WEIGHTS_NAME)


def _check_binding(directory: Path, config: dict) -> None:
    """Refuse weights whose metadata records config fields other than the config's (see ``save_adapter``)."""
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        raw = (f.metadata() or {}).get(BINDING_KEY)
    if raw is None:  # written by PEFT or by an older lora-fast: nothing recorded
        return
    try:
        bound = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{directory / WEIGHTS_NAME}: its metadata {BINDING_KEY!r} is corrupt ({exc})") from exc
    differ = [k for k in BOUND_FIELDS if bound.get(k) != config.get(k)]
    if differ:
        detail = ", ".join(f"{k}={config.get(k)!r} in the config but {bound.get(k)!r} for the weights" for k in differ)
        raise AdapterError(
            f"{directory}: {CONFIG_NAME} and {WEIGHTS_NAME} come from different saves ({detail}); a save interrupted "
            f"between its two writes leaves this. Save the adapter again"
        )


def _target_names(model: nn.Module, targets) -> list[str]:
    """Module names a PEFT ``target_modules`` hits (a list: the suffix rule; a string: a full-match regex). As in PEFT,
    names of a list that hit nothing are reported with ``warnings.warn`` unless nothing is hit at all."""
    hits, unmatched = match_targets(model, targets)
    try:
        report_unmatched(model, unmatched, hits, what="the adapter's target")
    except ValueError as exc:
        raise AdapterError(str(exc)) from exc
    wrapped = dict(lora_modules(model))
    bad = {n: type(m).__name__ for n in hits if n not in wrapped and not is_linear_layer(m := model.get_submodule(n))}
    if bad:
        raise AdapterError(
            f"the adapter's target_modules {targets!r} hit {bad}; lora-fast implements LoRA on nn.Linear and "
            f"transformers Conv1D only"
        )
    return hits


# Exact conversions of a file's tensor into the model's LoRA weight: the same dtype, or a wider one.
_PRECISION = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    return src == dst or (src in _PRECISION and dst in _PRECISION and _PRECISION[src] < _PRECISION[dst])


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
        if dtype is not None and not _widens(t.dtype, dtype):
            raise AdapterError(
                f"{key}: the file holds dtype {t.dtype}, the model's LoRA weight is {dtype}; converting would round "
                f"it, so convert one of them first"
            )
        if not torch.isfinite(t).all():
            raise AdapterError(f"{key}: the file holds NaN or inf values")


def load_adapter(model: nn.Module, directory: str | os.PathLike, backend: str = "auto") -> nn.Module:
    """Load a PEFT-format LoRA adapter into ``model`` and return it.

    When ``model`` has no LoRA yet, LoRA is applied per the adapter's config (r, lora_alpha, lora_dropout,
    target_modules, use_rslora) with ``backend``; otherwise the model's LoRA must have the same r, scaling and modules.
    The file's tensors are copied into the LoRA weights, whose dtype is ``apply_lora``'s (fp32 on an fp16/bf16 base,
    as PEFT's ``autocast_adapter_dtype``): an fp16 file loads into fp32 LoRA weights, and a file more precise than the
    LoRA weights is refused. Target names that match nothing are reported with ``warnings.warn`` (PEFT accepts them)
    unless nothing matches. Everything is checked before the model is touched. A folder that a killed whole-folder
    save left aside is put back first (``lora_fast.io.recover_directory``).
    """
    directory = Path(directory)
    recover_directory(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter folder {directory} does not exist")
    config = read_adapter_config(directory)
    state = _read_weights(directory)
    _check_binding(directory, config)
    r, alpha, use_rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
    targets = config["target_modules"]
    existing = dict(lora_modules(model))
    if existing:
        if any(layer.merged for layer in existing.values()):
            raise AdapterError("the model's LoRA is merged into its weights; call unmerge_lora before load_adapter")
        lora_cfg = get_lora_config(model)
        if lora_cfg.r != r or lora_scaling(r, lora_cfg.alpha, lora_cfg.use_rslora) != lora_scaling(
            r, alpha, use_rslora
        ):
            raise AdapterError(
                f"the model has LoRA with r={lora_cfg.r}, alpha={lora_cfg.alpha}, but the adapter "
                f"has r={r}, lora_alpha={alpha}"
            )
        hit = sorted(_target_names(model, targets))
        if hit != sorted(existing):
            raise AdapterError(
                f"the adapter's target_modules {targets!r} hit {hit} but the model has LoRA on {sorted(existing)}"
            )
        shapes = {n: (layer.in_features, layer.out_features, layer.lora_A.dtype) for n, layer in existing.items()}
    else:
        names = _target_names(model, targets)
        try:
            check_untied(model, names)
        except ValueError as exc:
            raise AdapterError(f"the adapter's target_modules {targets!r}: {exc}") from exc
        shapes = {}
        for name in names:
            base = model.get_submodule(name)
            shapes[name] = (*in_out_features(base), lora_dtype(base.weight.dtype))
    expected = {}
    for name, (k, n, dtype) in shapes.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = ((r, k), dtype)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = ((n, r), dtype)
    check_tensors(state, expected, directory / WEIGHTS_NAME)
    if not existing:
        apply_lora(
            model,
            names,
            r=r,
            alpha=alpha,
            dropout=float(config.get("lora_dropout") or 0.0),
            use_rslora=use_rslora,
            backend=backend,
        )
        # Saved again, the adapter names what it was given: the config's list, or the regex's matches.
        model.lora_config.targets = list(targets) if not isinstance(targets, str) else names
    with torch.no_grad():
        for name, layer in lora_modules(model):
            layer.lora_A.copy_(state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.copy_(state[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return model
