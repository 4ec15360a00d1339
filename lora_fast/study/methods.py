"""Two parameter-efficient methods beside LoRA, with small strict checkpoint files: BitFit and bottleneck adapters.

BitFit (Ben Zaken et al., 2022) trains only the bias terms. Here that means the bias of every linear layer (GPT-2's
``Conv1D``: ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) and of every LayerNorm (``ln_1``,
``ln_2``, ``ln_f``); the LayerNorm gains, the embeddings and the LM head stay frozen. For GPT-2 small that is
``12 · (2304 + 768 + 3072 + 768 + 768 + 768) + 768 = 102,144`` of 124,439,808 parameters (0.082%). A model with no
bias term at all (Llama, Mistral: no linear layer has one and RMSNorm has none) gets a zero bias on every ``nn.Linear``
except the LM head, and those train: the model starts exactly equal to its base, and BitFit there means "a trainable
offset on the output of every linear layer". For SmolLM2-135M (30 blocks of q, k, v, o, gate, up, down projections):
``30 · (576 + 192 + 192 + 576 + 1536 + 1536 + 576) = 155,520`` of 134,515,008 + 155,520 parameters (0.115%). A model
with some biases (Qwen2: query, key and value) trains those it has, as on GPT-2.

Bottleneck adapters (Houlsby et al., 2019): on the output ``y (M, N)`` of each block's attention output projection
and MLP output projection (GPT-2: ``attn.c_proj``, ``mlp.c_proj``; Llama, Mistral, Qwen2/3: ``self_attn.o_proj``,
``mlp.down_proj``; see ``BLOCK_OUTPUTS``), ``y + up(gelu(down(y)))`` with ``down: N -> D`` and ``up: D -> N``
(``D = dim``, biases on both). ``up`` starts at zero, so a fresh adapter computes exactly its base model. The adapter
enters by explicit child replacement: ``block.attn.c_proj`` becomes a ``BottleneckAdapterLayer`` that holds the
original projection, and GPT-2's residual dropout then acts on the adapted output, as in Houlsby's code. Only the
adapters train (Houlsby also trained the LayerNorms; we do not). For GPT-2 small with ``D = 4``: ``24 · ((768·4 + 4)
+ (4·768 + 768)) = 165,984`` trainable parameters (0.133%); for SmolLM2-135M, ``60 · (576·4 + 4 + 4·576 + 576) =
311,280`` (0.231%).

Both methods save to their own folder: one safetensors file plus a JSON config, each written atomically as
``save_adapter`` writes LoRA's (the weights first, then the config; other files in the folder are left alone, and the
folder itself is never missing), and loaded strictly through the library's adapter-file checks (a missing or
unexpected key, a wrong shape or dim, a corrupt file: an ``AdapterError`` naming the problem, and the model left
exactly as it was). After a kill between the two renames the new weights sit beside the previous config: they load
when the two agree (names, shapes, dim, added biases: always so for two saves of one run) and are refused otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lora_fast.adapters import AdapterError, base_model_name, check_tensors, read_json_config, read_safetensors
from lora_fast.io import atomic_save_tensors, recover_directory
from lora_fast.layers import in_out_features, is_linear_layer

__all__ = [
    "BottleneckAdapterLayer",
    "prepare_bitfit",
    "bitfit_parameter_names",
    "save_bitfit",
    "load_bitfit",
    "apply_bottleneck_adapters",
    "bottleneck_adapter_modules",
    "save_bottleneck_adapters",
    "load_bottleneck_adapters",
]

BITFIT_CONFIG = "bitfit_config.json"
BITFIT_WEIGHTS = "bitfit_biases.safetensors"
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


# ---------------------------------------------------------------------------------------------------------------
# BitFit
# ---------------------------------------------------------------------------------------------------------------


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
    return _save_files(model, directory, state, "bitfit", BITFIT_WEIGHTS, BITFIT_CONFIG, added_biases=added)


def load_bitfit(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load biases saved by ``save_bitfit`` into ``model`` and make it a BitFit model (``prepare_bitfit``).

    Every check runs before the model is touched: the file's added biases must be exactly the ones
    ``prepare_bitfit`` adds to this model (its bias-free ``nn.Linear`` layers, on a model with no bias at all) or the
    ones it has added already, and the file must hold exactly the model's bias names with its shapes, finite
    floating-point values, and agree with its config."""
    directory = Path(directory)
    config = _read_config(directory, BITFIT_CONFIG, "bitfit")
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
    _check_state(state, expected, config, directory / BITFIT_WEIGHTS)
    if pending:
        _add_zero_biases(model, pending)
    prepare_bitfit(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in expected:
            params[name].copy_(state[name])
    return model


# ---------------------------------------------------------------------------------------------------------------
# Bottleneck adapters
# ---------------------------------------------------------------------------------------------------------------


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
    return _save_files(model, directory, state, "bottleneck_adapter", ADAPTER_WEIGHTS, ADAPTER_CONFIG, **fields)


def load_bottleneck_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load adapters saved by ``save_bottleneck_adapters`` into ``model`` and return it.

    A model without adapters gets them first (``apply_bottleneck_adapters`` on the file's modules with its dim); a
    model with adapters must have the same modules and dim. Everything is checked before the model is touched."""
    directory = Path(directory)
    config = _read_config(directory, ADAPTER_CONFIG, "bottleneck_adapter")
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
    _check_state(state, expected, config, directory / ADAPTER_WEIGHTS)
    if not existing:
        apply_bottleneck_adapters(model, dim, modules=names)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            for key in _adapter_shapes(0, dim):
                params[f"{n}.{key}"].copy_(state[f"{n}.{key}"])
    return model


# ---------------------------------------------------------------------------------------------------------------
# Shared file checks
# ---------------------------------------------------------------------------------------------------------------


def _save_files(
    model: nn.Module, directory, state: dict[str, torch.Tensor], method: str, weights: str, config: str, **fields
) -> Path:
    """``state`` as the safetensors file ``weights`` and its JSON ``config`` (the method, the base model, ``fields``,
    every tensor's shape, the parameter count) in ``directory``, each file written atomically, the weights first."""
    meta = {"method": method, "base_model_name_or_path": base_model_name(model), **fields}
    meta |= {
        "shapes": {k: list(t.shape) for k, t in state.items()},
        "num_parameters": sum(t.numel() for t in state.values()),
    }
    return atomic_save_tensors(directory, state, weights, config, meta)


def _read_config(directory: Path, filename: str, method: str) -> dict:
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


def _check_state(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], config: dict, path: Path
) -> None:
    """The library's checks (keys, shapes, floating point, finite), then the config's shapes against the weights'."""
    check_tensors(state, {key: (tuple(shape), None) for key, shape in expected.items()}, path)
    for key, shape in expected.items():
        if tuple(config["shapes"].get(key, ())) != tuple(shape):
            raise AdapterError(f"{key}: the config says shape {config['shapes'].get(key)}, the weights {shape}")
