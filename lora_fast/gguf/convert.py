"""Whole-model helpers for GGUF-packed layers: finding them, counting their bytes, and turning them back into float
layers (``merge_and_unload`` does that for a model with packed LoRA bases)."""

from __future__ import annotations

import torch
from torch import nn

from lora_fast.gguf.packed import PackedEmbedding, PackedLinear, _PackedModule

__all__ = ["packed_modules", "dequantize_model", "weight_bytes"]


def packed_modules(model: nn.Module) -> list[tuple[str, _PackedModule]]:
    """Every ``(name, PackedLinear or PackedEmbedding)`` of ``model``, by module path."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _PackedModule)]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held in memory: every parameter and persistent buffer once (tied ones once),
    packed GGUF blocks at their packed size."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *(b for b in model.buffers() if b is not None)):
        if t.device.type != "meta" and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every packed layer of ``model`` by its float layer in place (``nn.Linear``, ``nn.Embedding``, the
    dequantised weights in the dtype each stood for, frozen), keep a tied head tied to its embedding, and return
    ``model``. Layers wrapped by LoRA are replaced inside their wrapper."""
    floats: dict[int, nn.Module] = {}
    found = packed_modules(model)
    for _, module in found:
        if isinstance(module, PackedEmbedding) or module.tied_to is None:
            floats[id(module)] = module.to_float().to(module.dtype_marker.dtype)
    for name, module in found:
        if isinstance(module, PackedLinear) and module.tied_to is not None:
            source = floats.get(id(module.tied_to))
            if source is None:
                raise ValueError(f"{name} is tied to an embedding that is not part of this model")
            head = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            head.weight = source.weight  # tied, as the packed pair was
            if module.bias is not None:
                head.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
            floats[id(module)] = head
    for name, module in found:
        model.set_submodule(name, floats[id(module)])
    return model
