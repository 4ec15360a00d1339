"""What every backend of :func:`lora_fast.lora_linear` shares before it computes: the input checks and the rule
for the compute dtypes."""

from __future__ import annotations

import math
import numbers

import torch

from lora_fast.gguf.packed import PackedWeight
from lora_fast.reference import dropout_threshold

__all__ = [
    "check_dropout_p",
    "check_lora_inputs",
    "check_lora_tensors",
    "check_scaling",
    "check_seed",
    "compute_dtypes",
]


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_lora_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int | None = None,
) -> None:
    """Raise a clear error naming the tensor or number and the expected/actual value when the inputs of
    :func:`lora_fast.lora_linear` do not fit together: :func:`check_lora_tensors`, then :func:`check_scaling`,
    :func:`check_dropout_p` and :func:`check_seed`."""
    check_lora_tensors(x, weight, bias, lora_A, lora_B)
    check_scaling(scaling)
    check_dropout_p(dropout_p)
    check_seed(seed)


def check_scaling(scaling: float) -> float:
    """``scaling`` as a float; refuses (naming it) anything but a finite non-zero real number (a bool included: True as
    a scale is a mistake, not 1)."""
    _check_real("scaling", scaling)
    if not math.isfinite(scaling) or scaling == 0:
        raise ValueError(f"scaling must be finite and non-zero (at 0 the LoRA weights get no gradient), got {scaling}")
    return float(scaling)


def check_dropout_p(dropout_p: float, name: str = "dropout_p") -> float:
    """``dropout_p`` as a float; refuses (naming ``name``) anything but a real number in [0, 1) that the dropout mask
    can draw: p has a resolution of 1/65536, and a nonzero p that rounds to 0 or 1 is refused
    (:func:`lora_fast.reference.dropout_threshold`)."""
    _check_real(name, dropout_p)
    dropout_threshold(float(dropout_p), name)
    return float(dropout_p)


def check_seed(seed: int | None) -> None:
    """Refuses a dropout seed that is not None (drawn from torch's generator) or an integer in [0, 2**63)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be None (drawn from torch's generator) or an integer in [0, 2**63), got {seed!r}")


def _check_real(name: str, value) -> None:
    # bool is an int to Python, but True as a scale or a probability is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float, not bool), got {type(value).__name__} {value!r}")


def check_lora_tensors(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
) -> None:
    """Raise a clear error naming the tensor and the expected/actual shape, dtype or device unless: ``x (..., K)``,
    ``weight (N, K)``, ``bias (N,)`` or None, ``lora_A (R, K)`` with R ≥ 1, ``lora_B (N, R)``; all on one device;
    ``x``, ``weight`` and ``bias`` of one floating dtype (``lora_A``/``lora_B`` may differ: fp32 masters beside bf16
    activations are the usual mixed-precision set-up). A GGUF-packed ``weight`` (:class:`lora_fast.gguf.PackedWeight`)
    has no dtype to match: it is dequantised to the base GEMM's dtype."""
    packed = isinstance(weight, PackedWeight)
    tensors = {"x": x} if packed else {"x": x, "weight": weight}
    tensors.update(lora_A=lora_A, lora_B=lora_B)
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension (..., in_features), got {_describe(x)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {_describe(weight)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight (out_features, in_features) = {(n, k)} "
            f"expects {k}; for a transformers Conv1D pass conv1d.weight.t() (got x {_describe(x)})"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must be (r, in_features) = (r, {k}), got {_describe(lora_A)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got lora_A {_describe(lora_A)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must be (out_features, r) = ({n}, {r}), got {_describe(lora_B)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias must be (out_features,) = ({n},), got {_describe(bias)}")
    for name, t in (*tensors.items(), *((("weight", weight),) if packed else ())):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    for name in ("weight", "bias"):
        t = tensors.get(name)
        if t is not None and t.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match (or run under torch.autocast)"
            )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a dtype")


def compute_dtypes(x: torch.Tensor, lora_A: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(base dtype, LoRA dtype). Under autocast both are the autocast dtype, as nn.Linear would do; otherwise the base
    GEMM runs in x's dtype and the LoRA branch in A's (PEFT casts x to lora_A's dtype the same way)."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        return dt, dt
    return x.dtype, lora_A.dtype
