"""Bottleneck adapters: a small trainable block after each output projection, with a small strict checkpoint file.

Bottleneck adapters (Houlsby et al., 2019): on the output ``y (M, N)`` of each block's attention output projection
and MLP output projection (GPT-2: ``attn.c_proj``, ``mlp.c_proj``; Llama, Mistral, Qwen2/3: ``self_attn.o_proj``,
``mlp.down_proj``; see ``BLOCK_OUTPUTS``), ``y + up(gelu(down(y)))`` with ``down: N -> D`` and ``up: D -> N``
(``D = dim``, biases on both). ``up`` starts at zero, so a fresh adapter computes exactly its base model. The adapter
enters by explicit child replacement: ``block.attn.c_proj`` becomes a ``BottleneckAdapterLayer`` that holds the
original projection, and GPT-2's residual dropout then acts on the adapted output, as in Houlsby's code. Only the
adapters train (Houlsby also trained the LayerNorms; we do not). For GPT-2 small with ``D = 4``: ``24 · ((768·4 + 4)
+ (4·768 + 768)) = 165,984`` trainable parameters (0.133%); for SmolLM2-135M, ``60 · (576·4 + 4 + 4·576 + 576) =
311,280`` (0.231%).

Saved to their own folder by ``save_bottleneck_adapters`` and loaded strictly by ``load_bottleneck_adapters``
(``lora_fast.study.method_files``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lora_fast.adapters import AdapterError, read_safetensors
from lora_fast.layers import in_out_features, is_linear_layer
from lora_fast.study.method_files import check_method_state, read_method_config, save_method_files

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "BLOCK_LISTS",
    "BLOCK_OUTPUTS",
    "BottleneckAdapterLayer",
    "apply_bottleneck_adapters",
    "bottleneck_adapter_modules",
    "load_bottleneck_adapters",
    "save_bottleneck_adapters",
]

ADAPTER_CONFIG = "bottleneck_config.json"
ADAPTER_WEIGHTS = "bottleneck_adapters.safetensors"

# Where a model keeps its list of transformer blocks, per architecture family.
BLOCK_LISTS = (
    "transformer.h",  # GPT-2, GPT-Neo, GPT-J
    "model.layers",  # Llama, Mistral, Qwen2/3
)
# (attention output, MLP output) inside one block, per architecture family.
BLOCK_OUTPUTS = (
    ("attn.c_proj", "mlp.c_proj"),  # GPT-2
    ("attn.attention.out_proj", "mlp.c_proj"),  # GPT-Neo
    ("attn.out_proj", "mlp.fc_out"),  # GPT-J
    ("self_attn.o_proj", "mlp.down_proj"),  # Llama, Mistral, Qwen2/3
)


class BottleneckAdapterLayer(nn.Module):
    """``y = base(x); y + up(gelu(down(y)))`` around an output projection (``nn.Linear`` or ``Conv1D``).

    ``down (D, N)`` and ``up (N, D)`` are ``nn.Linear`` in the base weight's dtype and device; ``up`` is zero at the
    start, so the layer computes exactly ``base(x)`` until it trains."""

    def __init__(self, base: nn.Module, dim: int):
        super().__init__()
        if not is_linear_layer(base):
            raise TypeError(f"bottleneck adapters wrap nn.Linear or transformers Conv1D, got {type(base).__name__}")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"adapter dim must be an integer >= 1, got {dim!r}")
        self.base = base
        w = base.weight
        self.out_features = in_out_features(base)[1]
        self.dim = dim
        self.down = nn.Linear(self.out_features, dim, dtype=w.dtype, device=w.device)
        self.up = nn.Linear(dim, self.out_features, dtype=w.dtype, device=w.device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.up(nn.functional.gelu(self.down(y)))

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, dim={self.dim}"


def bottleneck_adapter_modules(model: nn.Module) -> dict[str, BottleneckAdapterLayer]:
    """Every ``{name: BottleneckAdapterLayer}`` in ``model``, by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapterLayer)}


def _default_targets(model: nn.Module) -> list[str]:
    """The attention and MLP output projections of every block of the model's block list (``BLOCK_LISTS``)."""
    modules = dict(model.named_modules())
    prefix = next((p for p in BLOCK_LISTS if isinstance(modules.get(p), nn.ModuleList) and len(modules[p])), None)
    if prefix is None:
        raise ValueError(
            f"{type(model).__name__} has none of the known lists of blocks {list(BLOCK_LISTS)}; bottleneck adapters "
            f"know GPT-2-, GPT-Neo-, GPT-J-, Llama-, Mistral- and Qwen-style models only (pass modules=[...] to name "
            f"the output projections yourself)"
        )
    names = []
    for i, block in enumerate(modules[prefix]):
        present = {n for n, _ in block.named_modules()}
        pair = next((p for p in BLOCK_OUTPUTS if p[0] in present and p[1] in present), None)
        if pair is None:
            raise ValueError(
                f"block {prefix}.{i} ({type(block).__name__}) has none of the known (attention, MLP) output "
                f"projections {list(BLOCK_OUTPUTS)}; pass modules=[...] to name them"
            )
        names += [f"{prefix}.{i}.{pair[0]}", f"{prefix}.{i}.{pair[1]}"]
    return names


def _check_targets(model: nn.Module, names: Sequence[str]) -> None:
    modules = dict(model.named_modules())
    for n in names:
        if n not in modules:
            raise ValueError(f"module {n!r} is not in {type(model).__name__}")
        if not is_linear_layer(modules[n]):
            raise TypeError(f"module {n!r} is a {type(modules[n]).__name__}; adapters wrap nn.Linear/Conv1D only")


def apply_bottleneck_adapters(model: nn.Module, dim: int = 4, modules: Sequence[str] | None = None) -> nn.Module:
    """Put a bottleneck adapter of width ``dim`` after the attention and MLP output projections of every block
    (or after each module named in ``modules``), freeze everything else, and return ``model``.

    Raises before changing anything when the model has adapters already, has no known list of blocks
    (``BLOCK_LISTS``) with known output projections (``BLOCK_OUTPUTS``), or ``dim`` is not a positive integer."""
    if bottleneck_adapter_modules(model):
        raise ValueError(f"{type(model).__name__} already has bottleneck adapters; apply them once per model")
    names = list(modules) if modules is not None else _default_targets(model)
    _check_targets(model, names)
    # Build every wrapper before replacing any child, so a bad argument leaves the model untouched.
    wrapped = {n: BottleneckAdapterLayer(model.get_submodule(n), dim) for n in names}
    for param in model.parameters():
        param.requires_grad_(False)
    for n, layer in wrapped.items():
        model.set_submodule(n, layer)
        for param in (*layer.down.parameters(), *layer.up.parameters()):
            param.requires_grad_(True)
    model.peft_method = "bottleneck_adapter"
    return model


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in bottleneck_adapter_modules(model).items():
        for part in ("down", "up"):
            for kind in ("weight", "bias"):
                state[f"{name}.{part}.{kind}"] = getattr(getattr(layer, part), kind).detach().contiguous()
    return state


def _adapter_shapes(out_features: int, dim: int) -> dict[str, tuple[int, ...]]:
    return {"down.weight": (dim, out_features), "down.bias": (dim,), "up.weight": (out_features, dim),
            "up.bias": (out_features,)}  # fmt: skip


def save_bottleneck_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter weights (``bottleneck_adapters.safetensors``) and their config (``bottleneck_config.json``:
    dim, activation, wrapped module names, shapes) to ``directory``, atomically."""

    layers = bottleneck_adapter_modules(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no bottleneck adapters: call apply_bottleneck_adapters first")
    dims = {layer.dim for layer in layers.values()}
    if len(dims) != 1:
        raise ValueError(f"the model's adapters have several dims {sorted(dims)}; one file holds a single dim")
    state = _adapter_state(model)
    fields = {"dim": dims.pop(), "activation": "gelu", "modules": list(layers)}
    return save_method_files(model, directory, state, "bottleneck_adapter", ADAPTER_WEIGHTS, ADAPTER_CONFIG, **fields)


def load_bottleneck_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load adapters saved by ``save_bottleneck_adapters`` into ``model`` and return it.

    A model without adapters gets them first (``apply_bottleneck_adapters`` on the file's modules with its dim); a
    model with adapters must have the same modules and dim. Everything is checked before the model is touched."""
    directory = Path(directory)
    config = read_method_config(directory, ADAPTER_CONFIG, "bottleneck_adapter")
    dim, names = config.get("dim"), config.get("modules")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise AdapterError(f"{directory / ADAPTER_CONFIG}: dim must be an integer >= 1, got {dim!r}")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise AdapterError(f"{directory / ADAPTER_CONFIG}: modules must be a non-empty list of module names")
    if config.get("activation", "gelu") != "gelu":
        raise AdapterError(f"{directory / ADAPTER_CONFIG}: activation {config['activation']!r} is not supported")
    state = read_safetensors(directory / ADAPTER_WEIGHTS)
    existing = bottleneck_adapter_modules(model)
    if existing:
        if sorted(existing) != sorted(names):
            raise AdapterError(
                f"the model's adapters sit on {len(existing)} modules that differ from the file's {len(names)} "
                f"(first differences: {sorted(set(existing) ^ set(names))[:4]})"
            )
        bad = {n: layer.dim for n, layer in existing.items() if layer.dim != dim}
        if bad:
            raise AdapterError(f"the file's adapters have dim {dim}, the model's have {sorted(set(bad.values()))}")
        out_features = {n: layer.out_features for n, layer in existing.items()}
    else:
        try:
            _check_targets(model, names)
        except (ValueError, TypeError) as exc:
            raise AdapterError(f"the file's adapter modules do not fit {type(model).__name__}: {exc}") from exc
        out_features = {n: in_out_features(model.get_submodule(n))[1] for n in names}
    expected = {f"{n}.{key}": shape for n in names for key, shape in _adapter_shapes(out_features[n], dim).items()}
    check_method_state(state, expected, config, directory / ADAPTER_WEIGHTS)
    if not existing:
        apply_bottleneck_adapters(model, dim, modules=names)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            for key in _adapter_shapes(0, dim):
                params[f"{n}.{key}"].copy_(state[f"{n}.{key}"])
    return model
