"""``LoRALinear``: a frozen ``nn.Linear`` or transformers ``Conv1D`` plus a trainable low-rank update.

The wrapped layer is held by reference: its weight is neither copied nor transposed. ``nn.Linear`` stores
``W (N, K)``; GPT-2's ``Conv1D`` stores ``(K, N)`` and is passed to the op as ``weight.t()``, a view.
Initialisation follows microsoft/LoRA and HF PEFT: ``lora_A (R, K)`` kaiming-uniform(a=√5), ``lora_B (N, R)`` zeros,
so a fresh layer computes exactly its base layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_fast.functional import BACKENDS, lora_linear

__all__ = ["LoRALinear", "in_out_features", "is_conv1d", "is_linear_layer", "lora_scaling"]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2's projection layer, weight stored as ``(in, out)``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def is_linear_layer(module: nn.Module) -> bool:
    """True for the layers LoRA and the bottleneck adapters wrap: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` (weight ``(N, K)``) or a ``Conv1D`` (weight ``(K, N)``)."""
    k, n = module.weight.shape if is_conv1d(module) else module.weight.shape[::-1]
    return k, n


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """``y = base(x) + s · (drop(x) Aᵀ) Bᵀ`` around an existing ``nn.Linear`` or ``Conv1D``.

    ``merge()`` folds ``s · B A`` into the base weight (in fp32, then cast) so inference costs nothing extra;
    ``unmerge()`` takes it out again. Merging is explicit, never a side effect of ``.eval()``.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.fan_in_fan_out = is_conv1d(base)
        if not is_linear_layer(base):
            raise TypeError(f"LoRALinear wraps nn.Linear or transformers Conv1D, got {type(base).__name__}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.base = base
        w = base.weight
        self.in_features, self.out_features = in_out_features(base)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.dropout = float(dropout)
        self.backend = backend
        self.merged = False
        self.disabled = False
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.train(base.training)  # a model in eval mode gets LoRA layers in eval mode (no dropout)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as ``W (N, K)``: the stored tensor, or a transposed view of a Conv1D's ``(K, N)``."""
        return self.base.weight.t() if self.fan_in_fan_out else self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base(x)
        return lora_linear(
            x,
            self.weight,
            self.base.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            dropout_p=self.dropout,
            training=self.training,
            backend=self.backend,
        )

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` in fp32, shaped like the stored base weight (``(K, N)`` for Conv1D)."""
        delta = self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA update into the base weight (computed in fp32, then cast). A merged layer is left alone."""
        if self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take a merged LoRA update out of the base weight again (fp32, then cast)."""
        if not self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        layout = "Conv1D" if self.fan_in_fan_out else "Linear"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:g}{', rslora' if self.use_rslora else ''}, dropout={self.dropout}, "
            f"layout={layout}, backend={self.backend}, merged={self.merged}"
        )
