"""A Hugging Face model built from a GGUF file with its quantised weights kept packed.

:func:`load_gguf_model` builds the model's skeleton on the ``meta`` device (no float weight is ever made), then reads
each tensor of the file once: a weight of a plain ``nn.Linear`` or ``nn.Embedding`` in one of
:data:`lora_fast.gguf.PACKED_TYPES` becomes a :class:`PackedLinear` / :class:`PackedEmbedding` holding the file's
blocks; every other tensor (norms, biases, weights of other formats or of other layer types) is dequantised by the
``gguf`` package into an ordinary float parameter, with a one-line notice for a quantised one. A tied LM head reads
the packed embedding's blocks (one copy). Non-persistent buffers (rotary tables) are computed as transformers
computes them when it loads a model.

Names and layout follow transformers' own GGUF loader (``get_gguf_hf_weights_map`` and the architecture's tensor
processor), so the packed model computes exactly what ``from_pretrained(..., gguf_file=...)`` does. Llama-family files
store q/k projection rows permuted; the processor's inverse permutation is applied to the packed rows, which is exact
since blocks run along a row. Architectures whose processor does more than reorder rows are refused by name.

``transformers`` and ``gguf`` are optional dependencies of the library, imported here inside the function.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lora_fast.gguf.formats import QTYPES
from lora_fast.gguf.packed import PackedEmbedding, PackedLinear, PackedWeight

__all__ = ["load_gguf_model"]

# Tensor processors (transformers.modeling_gguf_pytorch_utils) that leave a weight as it is or only reorder its rows.
_ROW_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor")
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def _row_permutation(processor, name: str, rows: int):
    """The row order the processor gives the tensor ``name`` (``None``: unchanged), found by running it on a probe
    whose rows are their own indices; anything but a pure reordering of rows is refused."""
    import numpy as np

    probe = np.repeat(np.arange(rows, dtype=np.float64)[:, None], 2, axis=1)
    out = processor.process(weights=probe.copy(), name=name, tensor_key_mapping={}, parsed_parameters={})
    w = np.asarray(out.weights)
    if out.name != name or w.shape != probe.shape or not np.array_equal(w[:, 0], w[:, 1]):
        raise ValueError(f"{name}: transformers' tensor processor changes more than the order of its rows")
    perm = w[:, 0].astype(np.int64)
    if not np.array_equal(np.sort(perm), np.arange(rows)):
        raise ValueError(f"{name}: transformers' tensor processor does not only reorder its rows")
    return None if np.array_equal(perm, np.arange(rows)) else torch.from_numpy(perm)


def _fill_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Compute the buffers no file holds (rotary tables) as transformers does after loading: the model's
    ``_init_weights`` on each module that owns one. A buffer left unset is refused by name."""
    for name, module in model.named_modules():
        meta = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.is_meta]
        if not meta:
            continue
        for b in meta:
            module._buffers[b] = torch.full_like(module._buffers[b], float("nan"), device=device)
        model._init_weights(module)
        bad = [b for b in meta if not torch.isfinite(module._buffers[b]).all()]
        if bad:
            raise ValueError(f"{type(model).__name__}: cannot compute the buffers {bad} of {name} outside a file")


def load_gguf_model(
    path: str | os.PathLike,
    config=None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    notice: Callable[[str], None] | None = None,
) -> nn.Module:
    """The ``AutoModelForCausalLM`` of the GGUF file ``path`` with its quantised linear and embedding weights kept
    packed (see the module docstring), in eval mode on ``device``; float tensors in ``dtype``, which the packed
    layers also compute in. ``config`` (default: transformers' config from the file) may be edited first (dropout).
    ``notice`` receives the one-line notices of tensors kept in float (default: ``warnings.warn``)."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

    path = Path(path)
    device = torch.device(device)
    say = notice or (lambda line: warnings.warn(line, stacklevel=3))
    if config is None:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    reader = gguf.GGUFReader(str(path))
    arch = read_field(reader, "general.architecture")[0]
    processor_class = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    if processor_class.__name__ not in _ROW_PROCESSORS:
        raise ValueError(
            f"{path.name}: GGUF architecture {arch!r} is read by transformers' {processor_class.__name__}, which "
            f"changes weights beyond reordering rows; keeping them packed is not supported for it (load it as a "
            f"float model instead)"
        )
    processor = processor_class(config=config.to_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = _tensor_names(model, arch)
    modules = dict(model.named_modules())

    packed: dict[str, PackedWeight] = {}
    floats: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        hf_name = names.get(tensor.name)
        if hf_name is None:
            continue
        qtype = tensor.tensor_type.name
        owner, _, attr = hf_name.rpartition(".")
        layer = modules.get(owner)
        plain = type(layer) in (nn.Linear, nn.Embedding) and attr == "weight"
        if qtype in QTYPES and plain:
            data = torch.from_numpy(tensor.data.copy())  # a private copy: the file's mapping is closed below
            perm = _row_permutation(processor, tensor.name, data.shape[0])
            if perm is not None:
                data = data[perm]
            packed[owner] = PackedWeight(data.to(device), qtype, (data.shape[0], int(tensor.shape[0])), dtype)
            continue
        if qtype not in _FLOAT_TYPES:
            why = f"{type(layer).__name__}.{attr}" if not plain else f"{qtype} is not one of {', '.join(QTYPES)}"
            say(f"GGUF tensor {tensor.name} ({hf_name}, {qtype}) is dequantised to {dtype}: {why}")
        weights = processor.process(weights=gguf.dequantize(tensor.data, tensor.tensor_type), name=tensor.name).weights
        floats[hf_name] = torch.from_numpy(weights.copy()).to(device=device, dtype=dtype)
    del reader  # closes the memory map of the file

    for owner, weight in packed.items():
        layer = modules[owner]
        if isinstance(layer, nn.Embedding):
            new = PackedEmbedding(weight, layer.padding_idx)
        else:
            if layer.bias is not None and f"{owner}.bias" not in floats:
                raise ValueError(f"{path.name} has no tensor for {owner}.bias")
            new = PackedLinear(weight, floats.pop(f"{owner}.bias") if layer.bias is not None else None)
        model.set_submodule(owner, new)
    tied = bool(getattr(config, "tie_word_embeddings", False)) and "lm_head.weight" not in floats
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    for hf_name, value in floats.items():
        owner, _, attr = hf_name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Parameter(value, requires_grad=False))
    if tied and head is not None and not isinstance(head, PackedLinear):
        if isinstance(embedding, PackedEmbedding):
            model.set_submodule(_name_of(model, head), PackedLinear(embedding.weight, None, tied_to=embedding))
        else:
            head.weight = embedding.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path.name} has no tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    _fill_non_persistent_buffers(model, device)
    model.requires_grad_(False)
    return model.eval()


def _tensor_names(model: nn.Module, arch: str) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, by gguf's name map for ``arch`` (what transformers'
    ``get_gguf_hf_weights_map`` finds at the model's top level, where every name of these architectures is)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise ValueError(f"GGUF architecture {arch!r} is unknown to the installed gguf package")
    name_map = get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    names = {}
    for hf_name in model.state_dict():
        base, dot, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(base) if suffix in ("weight", "bias") else None
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
