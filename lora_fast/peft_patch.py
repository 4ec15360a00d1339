"""Speed up an existing HF PEFT model in place: ``patch_peft(model)`` runs its LoRA layers through :func:`lora_linear`.

    model = get_peft_model(model, LoraConfig(...))
    lora_fast.patch_peft(model)          # prints which layers now run through lora_linear, and why the others do not

Every PEFT ``lora.Linear`` whose base layer is an ``nn.Linear`` or a transformers ``Conv1D`` computes, for its one
active adapter, ``y = base(x) + s · B(A(drop(x)))``: exactly ``lora_linear(x, W, bias, A, B, s, p, training)`` with
``W`` the base weight (``conv1d.weight.t()``, a view, for GPT-2's ``Conv1D``), ``A = lora_A[name].weight``,
``B = lora_B[name].weight``, ``s = scaling[name]`` and ``p`` the adapter's dropout probability. The patched layer
reads these from PEFT's own modules at every call: nothing is copied, so optimizers, ``save_pretrained``,
``merge_and_unload``, ``disable_adapter()``, ``set_adapter``, ``set_scale``, ``state_dict`` keys, ``.to()`` and
``deepcopy`` see PEFT's parameters and behave as before.

Mechanism: each patched layer's ``__class__`` is swapped to :class:`LoraFastLinear`, a subclass of PEFT's
``lora.Linear`` whose only change is ``forward``: it checks the fast-path conditions and otherwise calls
``super().forward``, PEFT's own code. ``unpatch_peft`` swaps the class back. This is per instance: PEFT's classes are
not modified, other PEFT models in the process are untouched, and ``isinstance(layer, lora.Linear)`` stays true for
PEFT's own methods. The subclass is an ordinary module-level class (built on first use, so this module imports without
peft), hence deepcopy, pickling / ``torch.save`` of the whole model and ``torch.compile`` (which traces it like any
``nn.Module``) work. The alternatives do less well: replacing the child module changes ``state_dict`` keys and what
PEFT's ``merge``/``unload`` find; a ``forward`` bound on the instance is what accelerate's hooks use and does not
survive pickling; a forward hook cannot skip PEFT's computation.

Fallback (PEFT's own forward), decided at every call because the state can change at run time: merged or disabled
adapters, mixed-batch ``adapter_names`` or any other extra argument, zero or several active adapters, a LoRA variant
(DoRA, aLoRA, ...), ``lora_bias``, a dropout other than ``nn.Dropout``/``nn.Identity`` or whose p the mask cannot
draw (p has a resolution of 1/65536: a nonzero p that rounds to 0 or 1), a base layer that is not
exactly ``nn.Linear``/``Conv1D`` (quantized layers, for instance) or whose weight trains (the fast path is for frozen
bases), hooks on the base or LoRA modules (DeepSpeed ZeRO-3 gathers parameters in hooks), mismatched dtypes or
devices. The fast path is an allow-list of what the op computes exactly; anything else keeps PEFT's answer. Only
PEFT's exact ``lora.Linear`` class is patched; its subclasses (torchao, INC) and the other LoRA layers (Embedding,
Conv2d, bitsandbytes) are reported and left alone.

Numerics: in fp32/fp64 the op computes PEFT's formula with its own (fused) order of operations; in bf16/fp16 with fp32
adapters PEFT adds the LoRA term in fp32 and rounds once, the op rounds the term to the output dtype first (one rounding
step apart). With ``backend="auto"`` on CUDA the triton backend is used where its precision matches what PEFT would do:
fp16/bf16 compute, or fp32 when the kernels round fp32 as torch's own matmuls do (their default, ``"auto"``) or run
exact fp32; otherwise the ``torch`` backend (cuBLAS, torch's precision setting).

Dropout masks come from a key drawn from torch's generator at each call (on the CPU for the ``torch`` backend, on the
GPU for ``triton``), so ``torch.utils.checkpoint`` (which restores the generators' states before recomputing)
regenerates the same mask; a different mask than PEFT's ``nn.Dropout`` would draw, with p rounded to a multiple of
1/65536 (within 7.6e-6) and kept elements scaled by the inverse of that rounded keep rate, so that the expectation is
PEFT's exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from lora_fast.checks import compute_dtypes
from lora_fast.functional import check_backend, lora_linear, resolve_backend
from lora_fast.reference import dropout_threshold

__all__ = ["PatchReport", "patch_peft", "unpatch_peft"]  # and LoraFastLinear, built on first use

FAST = "lora_fast"
PEFT = "PEFT forward"
NOT_PATCHED = "not patched"

# Keyword arguments PEFT's lora.Linear.forward takes for itself; with value None they change nothing. Any other
# argument goes to PEFT (which passes it to the base layer).
_PEFT_KWARGS = ("adapter_names", "alora_offsets")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = tuple("_global" + d for d in _HOOK_DICTS)  # torch.nn.modules.module's hooks on every module


# ---------------------------------------------------------------- the per-instance subclass


class _FastForward:
    """``forward`` of :class:`LoraFastLinear`: lora_linear where it is exact, PEFT's forward otherwise."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or any(k not in _PEFT_KWARGS or v is not None for k, v in kwargs.items()) or _why_peft(self, x):
            return super().forward(x, *args, **kwargs)
        name = _active_adapter(self)
        base = self.base_layer
        dropout = self.lora_dropout[name]
        lora_A = self.lora_A[name].weight
        return lora_linear(
            x,
            base.weight if type(base) is nn.Linear else base.weight.t(),  # Conv1D stores (K, N): a view
            base.bias,
            lora_A,
            self.lora_B[name].weight,
            self.scaling[name],
            dropout_p=dropout.p if type(dropout) is nn.Dropout else 0.0,
            training=dropout.training,
            backend=_backend_for(self._lora_fast_backend, x, lora_A),
        )


@functools.cache
def _fast_class() -> type:
    from peft.tuners.lora.layer import Linear

    return type(
        "LoraFastLinear",
        (_FastForward, Linear),
        {"__module__": __name__, "__doc__": "PEFT's lora.Linear with lora_fast's forward (see lora_fast.peft_patch)."},
    )


def __getattr__(name: str) -> type:
    # PEP 562: ``lora_fast.peft_patch.LoraFastLinear`` is built on first use (pickle finds it by this name), so the
    # module imports without peft.
    if name == "LoraFastLinear":
        return _fast_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- fast-path conditions


def _active_adapter(layer) -> str | None:
    """The one active adapter the layer holds, or None when it holds zero or several."""
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    return names[0] if len(names) == 1 else None


@functools.cache
def _base_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, d, None) for d in _HOOK_DICTS) or "forward" in module.__dict__


def _why_peft(layer, x: torch.Tensor | None = None) -> str | None:
    """Why ``layer`` must run PEFT's forward now (None: lora_linear computes PEFT's answer exactly).

    Without ``x``, the checks that do not depend on the input (what the report shows)."""
    base = layer.base_layer
    if type(base) not in _base_types():
        return f"base layer is {type(base).__name__}, not exactly nn.Linear or Conv1D"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged into the base weight"
    name = _active_adapter(layer)
    if name is None:
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        return f"{len(active)} active adapters on this layer (lora_linear computes one)"
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None:
        return f"adapter {name!r} is a LoRA variant ({type(variant).__name__})"
    if getattr(layer, "use_dora", {}).get(name, False):
        return f"adapter {name!r} uses DoRA"
    lora_A, lora_B, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        return f"adapter {name!r}: lora_A/lora_B are not bias-free nn.Linear"
    if lora_B.bias is not None:
        return f"adapter {name!r} has lora_bias"
    if not (type(dropout) is nn.Identity or (type(dropout) is nn.Dropout and not dropout.inplace)):
        return f"adapter {name!r}: dropout {type(dropout).__name__} is not nn.Dropout/nn.Identity"
    if type(dropout) is nn.Dropout:
        try:
            dropout_threshold(dropout.p)
        except ValueError as e:  # outside [0, 1), or finer than the mask's 1/65536 resolution
            return f"adapter {name!r}: {e}"
    scaling = layer.scaling[name]
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        return f"adapter {name!r}: scaling is a {type(scaling).__name__}, not a number"
    if scaling == 0 or not math.isfinite(scaling):
        return f"adapter {name!r}: scaling {scaling} (lora_linear refuses a zero or non-finite one)"
    if base.weight.requires_grad:
        return "base weight trains (the fast path is for frozen base weights)"
    for what, module in (("base layer", base), ("lora_A", lora_A), ("lora_B", lora_B), ("dropout", dropout)):
        if _hooked(module):
            return f"{what} has hooks or a replaced forward"
    if any(getattr(_nn_module, d, None) for d in _GLOBAL_HOOK_DICTS):
        return "global module hooks are registered"
    if lora_A.weight.dtype != lora_B.weight.dtype:
        return f"lora_A ({lora_A.weight.dtype}) and lora_B ({lora_B.weight.dtype}) dtypes differ"
    if x is None:
        return None
    return _why_peft_input(layer, x, base, lora_A.weight)


def _why_peft_input(layer, x: torch.Tensor, base: nn.Module, lora_A: torch.Tensor) -> str | None:
    """The input-dependent checks: where PEFT would compute (or raise) differently from lora_linear."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        return "input is not a floating-point tensor"
    if x.shape[-1] != layer.in_features:
        return "input features do not match the layer"
    w, b = base.weight, base.bias
    if any(t.device != x.device for t in (w, lora_A) + (() if b is None else (b,))):
        return "tensors on different devices"
    if not torch.is_autocast_enabled(x.device.type):
        if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
            return "input and base weight dtypes differ"
        if x.dtype != lora_A.dtype and not getattr(layer, "cast_input_dtype_enabled", True):
            return "input dtype casting disabled"
    return None


def _backend_for(backend: str, x: torch.Tensor, lora_A: torch.Tensor) -> str:
    """``backend``, except that ``auto`` takes triton only where its precision is the one PEFT would compute in."""
    which = resolve_backend(backend, x.device)
    if backend == "auto" and which == "triton" and not _triton_matches_peft(compute_dtypes(x, lora_A)):
        return "torch"
    return which


def _triton_matches_peft(dtypes: tuple[torch.dtype, torch.dtype]) -> bool:
    """Whether the triton backend computes at the precision PEFT's layers would, for (base, LoRA) compute dtypes:
    fp16/bf16, or fp32 when the kernels run exact fp32 or round as torch's own fp32 matmuls do."""
    from lora_fast.kernels.utils import TL_DTYPES
    from lora_fast.triton_backend import fp32_precision, torch_fp32_precision

    if any(dt not in TL_DTYPES for dt in dtypes):
        return False
    return torch.float32 not in dtypes or fp32_precision() in ("ieee", torch_fp32_precision())


# ---------------------------------------------------------------- the report


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch_peft` did: one ``(layer name, forward, reason)`` row per PEFT LoRA layer.

    ``forward`` is ``"lora_fast"`` (patched, runs lora_linear now), ``"PEFT forward"`` (patched, but PEFT's forward
    runs in the current state: merged, disabled, DoRA, ...; re-decided at every call) or ``"not patched"``.
    """

    rows: list[tuple[str, str, str]]
    backend: str

    @property
    def patched(self) -> list[str]:
        return [name for name, forward, _ in self.rows if forward != NOT_PATCHED]

    @property
    def fast(self) -> list[str]:
        return [name for name, forward, _ in self.rows if forward == FAST]

    def __str__(self) -> str:
        groups: dict[tuple[str, str], list[str]] = {}
        for name, forward, reason in self.rows:
            groups.setdefault((forward, reason), []).append(name)
        lines = [
            f"lora_fast.patch_peft (backend {self.backend!r}): {len(self.fast)} of {len(self.rows)} PEFT LoRA layers "
            f"run through lora_linear; {len(self.patched)} patched",
            "| layers | forward | why |",
            "|---|---|---|",
        ]
        for (forward, reason), names in groups.items():
            shown = ", ".join(names[:2]) + (f" (+{len(names) - 2} more)" if len(names) > 2 else "")
            lines.append(f"| {len(names)}: {shown} | {forward} | {reason or 'fast path'} |")
        return "\n".join(lines)


# ---------------------------------------------------------------- public API


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError as e:
        raise ImportError("lora_fast.patch_peft needs peft (pip install peft)") from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a PeftModel, say), got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def patch_peft(model: nn.Module, backend: str = "auto", verbose: bool = True) -> PatchReport:
    """Run every PEFT LoRA layer of ``model`` on an ``nn.Linear``/``Conv1D`` through :func:`lora_linear`, in place.

    ``model``: a ``PeftModel`` (``get_peft_model``, ``PeftModel.from_pretrained``) or any module holding PEFT LoRA
    layers. ``backend``: one of :data:`lora_fast.BACKENDS`. Calling it again updates the backend and patches layers
    added since. Returns (and with ``verbose`` prints) the :class:`PatchReport`. Undo with :func:`unpatch_peft`.
    """
    check_backend(backend)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            f"no PEFT LoRA layers in this {type(model).__name__}; call patch_peft on the model get_peft_model returned"
        )
    from peft.tuners.lora.layer import Linear

    fast_cls = _fast_class()
    rows = []
    for name, layer in layers:
        if type(layer) not in (Linear, fast_cls):
            rows.append((name, NOT_PATCHED, f"{type(layer).__name__} is not PEFT's lora.Linear"))
            continue
        layer.__class__ = fast_cls
        layer._lora_fast_backend = backend
        reason = _why_peft(layer)
        rows.append((name, PEFT if reason else FAST, reason or ""))
    report = PatchReport(rows, backend)
    if verbose:
        print(report)
    return report


def unpatch_peft(model: nn.Module) -> int:
    """Give every layer :func:`patch_peft` patched its PEFT class and forward back; returns how many it restored."""
    from peft.tuners.lora.layer import Linear

    fast_cls = _fast_class()
    restored = 0
    for _, layer in _lora_layers(model):
        if type(layer) is fast_cls:
            layer.__class__ = Linear
            del layer._lora_fast_backend
            restored += 1
    return restored
