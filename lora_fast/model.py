"""Putting LoRA into a model and taking it out: ``apply_lora`` and friends.

LoRA enters by explicit child replacement: each targeted ``nn.Linear``/``Conv1D`` is replaced in its parent by a
``LoRALinear`` that holds it. Targets follow HF PEFT's suffix rule: a target ``t`` hits the module named ``n`` when
``n == t`` or ``n`` ends with ``"." + t``, so ``"attn.c_attn"`` hits every ``transformer.h.*.attn.c_attn`` and no MLP
module, while ``"c_proj"`` hits both ``attn.c_proj`` and ``mlp.c_proj``.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lora_fast.layers import LoRALinear, is_linear_layer

__all__ = [
    "LoRAConfig",
    "apply_lora",
    "lora_modules",
    "find_targets",
    "merge_lora",
    "unmerge_lora",
    "disable_lora",
    "set_backend",
    "lora_state_dict",
    "count_parameters",
    "print_trainable_parameters",
    "get_lora_config",
]

PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    """What ``apply_lora`` was asked for; kept on the model as ``model.lora_config`` for ``save_adapter``."""

    targets: list[str]
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    backend: str = "auto"
    modules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def target_hits(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every ``(name, LoRALinear)`` in ``model``, by module path."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def find_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """The names of the modules ``targets`` hits (PEFT's suffix rule), checked: each target must hit something, and
    only ``nn.Linear``/``Conv1D`` may be hit. Errors list close candidates."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one module, e.g. ['attn.c_attn']")
    names = {name: module for name, module in model.named_modules() if name}
    hits: list[str] = []
    for target in targets:
        found = [n for n in names if target_hits(n, target)]
        if not found:
            suffixes = sorted(
                {".".join(n.split(".")[-k:]) for n, m in names.items() if is_linear_layer(m) for k in (1, 2)}
            )
            close = difflib.get_close_matches(target, suffixes, n=5, cutoff=0.4) or suffixes[:8]
            raise ValueError(
                f"target {target!r} matches no module of {type(model).__name__}; close candidates: {close}"
            )
        for n in found:
            m = names[n]
            if isinstance(m, LoRALinear):
                raise ValueError(f"module {n!r} already has LoRA; call apply_lora once per model")
            if not is_linear_layer(m):
                raise TypeError(
                    f"target {target!r} hits {n!r} of type {type(m).__name__}; LoRA wraps nn.Linear "
                    f"and transformers Conv1D only"
                )
            if n not in hits:
                hits.append(n)
    return hits


def apply_lora(
    model: nn.Module,
    targets: str | Sequence[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    backend: str = "auto",
) -> nn.Module:
    """Wrap every module ``targets`` hits in a ``LoRALinear``, freeze everything else, and return ``model``.

    Raises before changing anything when a target matches nothing (listing close candidates), hits a module that is
    not ``nn.Linear``/``Conv1D``, or the model already has LoRA.
    """
    if any(True for _ in lora_modules(model)):
        raise ValueError(f"{type(model).__name__} already has LoRA layers; apply_lora once per model")
    names = find_targets(model, targets)
    # Build every wrapper before replacing any child, so a bad argument leaves the model untouched.
    wrapped = {n: LoRALinear(model.get_submodule(n), r, alpha, dropout, use_rslora, backend) for n in names}
    for param in model.parameters():
        param.requires_grad_(False)
    for n, layer in wrapped.items():
        model.set_submodule(n, layer)
    model.lora_config = LoRAConfig(
        targets=[targets] if isinstance(targets, str) else list(targets),
        r=r,
        alpha=alpha,
        dropout=dropout,
        use_rslora=use_rslora,
        backend=backend,
        modules=names,
    )
    return model


def get_lora_config(model: nn.Module) -> LoRAConfig:
    config = getattr(model, "lora_config", None)
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"{type(model).__name__} has no LoRA: call lora_fast.apply_lora first")
    return config


def _layers(model: nn.Module) -> list[LoRALinear]:
    layers = [m for _, m in lora_modules(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call lora_fast.apply_lora first")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (fp32, then cast)."""
    for layer in _layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged LoRA update out of its base weight again."""
    for layer in _layers(model):
        layer.unmerge()
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every LoRA layer of ``model`` to ``backend`` (``auto``, ``reference``, ``torch``, ``triton``)."""
    for layer in _layers(model):
        layer.backend = backend
    return model


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base output exactly: LoRA layers pass through to the base layer.

    Merged layers are unmerged for the block and merged again after it (both in fp32, so the round trip moves a
    weight by at most one rounding of its dtype). No second copy of the model is held, which makes this the cheap
    reference policy for DPO.
    """
    layers = _layers(model)
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.disabled = was
        for layer in merged:
            layer.merge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights under HF PEFT's keys: ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and
    ``.lora_B.weight`` ``(out, r)`` (detached, contiguous)."""
    state = {}
    for name, layer in lora_modules(model):
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
    return state


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; tied weights are counted once, as PEFT does."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print (and return) PEFT's line: ``trainable params: … || all params: … || trainable%: …``."""
    trainable, total = count_parameters(model)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line


def modules_matching_regex(model: nn.Module, pattern: str) -> list[str]:
    """PEFT's rule for a string ``target_modules``: a full regex match on the module name."""
    return [n for n, m in model.named_modules() if n and re.fullmatch(pattern, n) and is_linear_layer(m)]
