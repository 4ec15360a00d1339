"""Putting LoRA into a model and taking it out: ``apply_lora`` and friends.

LoRA enters by explicit child replacement: each targeted ``nn.Linear``/``Conv1D`` is replaced in its parent by a
``LoRALinear`` that holds it. Targets follow HF PEFT's suffix rule: a target ``t`` hits the module named ``n`` when
``n == t`` or ``n`` ends with ``"." + t``, so ``"attn.c_attn"`` hits every ``transformer.h.*.attn.c_attn`` and no MLP
module, while ``"c_proj"`` hits both ``attn.c_proj`` and ``mlp.c_proj``. As in PEFT, a list of targets is accepted
when some of them hit nothing (each is reported with ``warnings.warn``, with close candidates); nothing hit at all is an
error. A weight tied to another parameter (GPT-2's ``lm_head`` is ``wte``) is refused: merging LoRA into it would
change the other one too.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lora_fast.functional import check_backend
from lora_fast.gguf.convert import dequantize_model, packed_modules
from lora_fast.gguf.packed import PackedWeight
from lora_fast.layers import LoRALinear, is_linear_layer

__all__ = [
    "LoRAConfig",
    "apply_lora",
    "lora_modules",
    "find_targets",
    "merge_lora",
    "unmerge_lora",
    "merge_and_unload",
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


def _close_candidates(model: nn.Module, target: str) -> list[str]:
    suffixes = sorted(
        {".".join(n.split(".")[-k:]) for n, m in model.named_modules() if n and is_linear_layer(m) for k in (1, 2)}
    )
    return difflib.get_close_matches(target, suffixes, n=5, cutoff=0.4) or suffixes[:8]


def match_targets(model: nn.Module, targets: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """``(names hit, targets that hit nothing)``. A list follows PEFT's suffix rule, a string is a full-match regex on
    the module name (PEFT's rule for a string ``target_modules``). A LoRA layer counts under its own name; the layer
    it wraps (``<name>.base``) is never a candidate."""
    wrapped = {f"{n}.base" for n, _ in lora_modules(model)}
    names = [n for n, _ in model.named_modules() if n and n not in wrapped]
    if isinstance(targets, str):
        hits = [n for n in names if re.fullmatch(targets, n)]
        return hits, [] if hits else [targets]
    hits: list[str] = []
    unmatched: list[str] = []
    for target in targets:
        found = [n for n in names if target_hits(n, target)]
        if not found:
            unmatched.append(target)
        hits += [n for n in found if n not in hits]
    return hits, unmatched


def report_unmatched(model: nn.Module, unmatched: Sequence[str], hits: Sequence[str], what: str = "target") -> None:
    """Raise when nothing was hit; warn (``UserWarning``) for each ``unmatched`` target otherwise."""
    lines = [
        f"{what} {t!r} matches no module of {type(model).__name__}; close candidates: {_close_candidates(model, t)}"
        for t in unmatched
    ]
    if not hits:
        raise ValueError("; ".join(lines))
    for line in lines:
        warnings.warn(f"{line}. LoRA goes on the {len(hits)} modules the other targets hit", stacklevel=3)


def find_targets(model: nn.Module, targets: str | Sequence[str], strict: bool = False) -> list[str]:
    """The names of the modules ``targets`` hits (PEFT's suffix rule), checked: only ``nn.Linear``/``Conv1D`` may be
    hit, and something must be. A target that hits nothing while others do is reported with ``warnings.warn`` (PEFT
    accepts such lists), or, with ``strict``, is a ValueError as well; errors and warnings list close candidates."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one module, e.g. ['attn.c_attn']")
    bad = [t for t in targets if not isinstance(t, str) or not t]
    if bad:
        raise TypeError(f"targets must be non-empty module names (str), got {bad}")
    hits, unmatched = match_targets(model, targets)
    report_unmatched(model, unmatched, [] if strict and unmatched else hits)  # with no hits it raises
    for n in hits:
        m = model.get_submodule(n)
        if isinstance(m, LoRALinear):
            raise ValueError(f"module {n!r} already has LoRA; call apply_lora once per model")
        if not is_linear_layer(m):
            target = next(t for t in targets if target_hits(n, t))
            raise TypeError(
                f"target {target!r} hits {n!r} of type {type(m).__name__}; LoRA wraps nn.Linear "
                f"and transformers Conv1D only"
            )
    return hits


def _memory(t: torch.Tensor) -> tuple | None:
    """``(device, first byte, one past the last byte)`` of ``t``'s elements; None where there is no memory."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.device, t.data_ptr(), t.data_ptr() + span * t.element_size()


def check_untied(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse LoRA on a weight whose memory is also another parameter of ``model`` (tied embeddings: GPT-2's
    ``lm_head`` is ``transformer.wte``): merging the update into it would change the other one too. A GGUF-packed
    weight is tied when its bytes are another layer's (a tied head reads the embedding's)."""
    params = [(pname, p, _memory(p)) for pname, p in model.named_parameters(remove_duplicate=False)]
    params += [(bname, b, _memory(b)) for bname, b in model.named_buffers(remove_duplicate=False) if b is not None]
    for n in names:
        w = model.get_submodule(n).weight
        own = {f"{n}.weight"}
        if isinstance(w, PackedWeight):
            w, own = w.data, {f"{n}.qweight"}
        mw = _memory(w)
        others = [
            pname
            for pname, p, mp in params
            if pname not in own and (p is w or (mw and mp and mp[0] == mw[0] and mp[1] < mw[2] and mw[1] < mp[2]))
        ]
        if others:
            raise ValueError(
                f"{n}.weight is tied to {others} (shared memory): LoRA on a tied weight is refused, because merging "
                f"it would change {others} as well. Leave {n!r} out of the targets, or untie the weights first "
                f"(e.g. load the model with tie_word_embeddings=False)"
            )


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

    Raises before changing anything when no target matches anything (listing close candidates), a target hits a
    module that is not ``nn.Linear``/``Conv1D`` or a tied weight, an argument is out of range, or the model already
    has LoRA. A target that matches nothing while others do is reported with ``warnings.warn``, as PEFT accepts it.
    """
    if any(True for _ in lora_modules(model)):
        raise ValueError(f"{type(model).__name__} already has LoRA layers; apply_lora once per model")
    names = find_targets(model, targets)
    check_untied(model, names)
    # Build every wrapper before replacing any child, so a bad argument (LoRALinear checks them) leaves the model
    # untouched.
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
    """Fold every LoRA update into its base weight (fp32, fp64 for fp64 weights, then cast). Each layer keeps its
    pre-merge weight while merged (one extra copy of the targeted weights, on their device) so that ``unmerge_lora``
    is exact; to merge for good without that copy use :func:`merge_and_unload`."""
    for layer in _layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Put every merged layer's pre-merge base weight back, bit for bit."""
    for layer in _layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put the original layers back (HF PEFT's
    ``merge_and_unload``): the result is a plain model whose ``state_dict`` and ``save_pretrained`` use the original
    keys and which reloads with ``from_pretrained`` to the same outputs. No pre-merge copy is kept. Parameters stay
    frozen as ``apply_lora`` left them.

    A model with GGUF-packed layers comes back as a float model: the update cannot be merged into quantised blocks
    without rounding it away, so each packed LoRA base becomes an ``nn.Linear`` holding its dequantised weight plus
    the update (in fp32), and every other packed layer is dequantised too (:func:`lora_fast.gguf.dequantize_model`).
    The memory is then the float model's."""
    if packed_modules(model):
        dequantize_model(model)
    for name, layer in list(lora_modules(model)):
        layer.merge(keep_original=False)
        layer.premerge_weight = None
        model.set_submodule(name, layer.base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every LoRA layer of ``model`` to ``backend`` (``auto``, ``reference``, ``torch``, ``triton``); another
    name raises before any layer changes."""
    check_backend(backend)
    for layer in _layers(model):
        layer.backend = backend
    return model


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base output exactly: LoRA layers pass through to the base layer.

    Merged layers are unmerged for the block (their pre-merge weights put back exactly) and merged again after it.
    No second copy of the model is held, which makes this the cheap reference policy for DPO.
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
    """``(trainable, total)`` parameter counts; tied weights are counted once, as PEFT does. A GGUF-packed weight
    (frozen) counts its ``N · K`` weights, so a packed model counts what its float model does."""
    trainable = 0
    total = sum(m.weight.numel() for _, m in packed_modules(model) if m.tied_to is None)
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
