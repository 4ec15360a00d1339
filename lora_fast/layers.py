"""``LoRALinear``: a frozen ``nn.Linear`` or transformers ``Conv1D`` plus a trainable low-rank update.

The wrapped layer is held by reference: its weight is neither copied nor transposed. ``nn.Linear`` stores
``W (N, K)``; GPT-2's ``Conv1D`` stores ``(K, N)`` and is passed to the op as ``weight.t()``, a view.
Initialisation follows microsoft/LoRA and HF PEFT: ``lora_A (R, K)`` kaiming-uniform(a=√5), ``lora_B (N, R)`` zeros,
so a fresh layer computes exactly its base layer.

The LoRA weights' dtype is HF PEFT's (``autocast_adapter_dtype=True``): fp32 when the base weight is fp16 or bf16,
the base weight's dtype otherwise; the op runs the LoRA branch in that dtype (x cast to it, as PEFT does).

In a ``state_dict`` the layer keeps the wrapped layer's keys (``<name>.weight``, ``<name>.bias``) beside
``<name>.lora_A`` and ``<name>.lora_B``, so the base weights of a model with LoRA are saved under the original model's
names (a merged layer's ``weight`` is the merged weight) and load back into a model with or without LoRA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_fast import functional
from lora_fast.checks import check_dropout_p, check_lora_tensors, check_scaling
from lora_fast.functional import check_backend
from lora_fast.gguf.packed import PackedLinear

__all__ = ["LoRALinear", "in_out_features", "is_conv1d", "is_linear_layer", "lora_dtype", "lora_scaling"]

_HALF = (torch.float16, torch.bfloat16)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2's projection layer, weight stored as ``(in, out)``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def is_linear_layer(module: nn.Module) -> bool:
    """True for the layers LoRA and the bottleneck adapters wrap: ``nn.Linear``, transformers' ``Conv1D`` and a
    GGUF-packed :class:`lora_fast.gguf.PackedLinear`."""
    return isinstance(module, (nn.Linear, PackedLinear)) or is_conv1d(module)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` (weight ``(N, K)``) or a ``Conv1D`` (weight ``(K, N)``)."""
    k, n = module.weight.shape if is_conv1d(module) else module.weight.shape[::-1]
    return k, n


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the LoRA weights on a base weight of ``base_dtype``: fp32 for fp16/bf16 (PEFT's
    ``autocast_adapter_dtype``), ``base_dtype`` otherwise."""
    return torch.float32 if base_dtype in _HALF else base_dtype


def check_lora_hyperparameters(r, alpha, dropout, use_rslora=False) -> None:
    """Raise naming the argument unless ``r`` is an int >= 1, ``alpha`` a finite non-zero number, ``dropout`` a number
    in [0, 1) the dropout mask can draw (:func:`lora_fast.checks.check_dropout_p`) and ``use_rslora`` a bool (``bool``
    is refused where a number is meant: ``r=True`` is a mistake). :class:`LoRALinear` runs it once, when it is built;
    its forward checks only the input tensors."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r} ({type(r).__name__})")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0:
        raise ValueError(
            f"LoRA alpha must be a finite non-zero real number (alpha 0 makes the scaling 0: the LoRA weights would "
            f"get no gradient and train nothing), got {alpha!r} ({type(alpha).__name__})"
        )
    check_dropout_p(dropout, "LoRA dropout")
    if not isinstance(use_rslora, bool):
        raise ValueError(f"use_rslora must be a bool, got {use_rslora!r} ({type(use_rslora).__name__})")


def _is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a weight FSDP or tensor parallelism shards: each process holds a piece)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class LoRALinear(nn.Module):
    """``y = base(x) + s · (drop(x) Aᵀ) Bᵀ`` around an existing ``nn.Linear`` or ``Conv1D``.

    ``merge()`` folds ``s · B A`` into the base weight (in fp32, or fp64 for an fp64 weight, then cast) so inference
    costs nothing extra; ``unmerge()`` puts the pre-merge weight back bit for bit. Merging is explicit, never a side
    effect of ``.eval()``.
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
            raise TypeError(
                f"LoRALinear wraps nn.Linear, transformers Conv1D or PackedLinear, got {type(base).__name__}"
            )
        check_lora_hyperparameters(r, alpha, dropout, use_rslora)
        self.base = base
        w = base.weight
        self.in_features, self.out_features = in_out_features(base)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = check_scaling(lora_scaling(r, alpha, use_rslora))  # alpha/r can underflow to 0
        self._dropout = float(dropout)  # checked above; the property checks a value set later
        self.backend = backend
        self.merged = False
        self.disabled = False
        dtype = lora_dtype(w.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # The base weight as it was before merge(), held only while merged (same device, so .to() moves it; not
        # saved): unmerge() restores it bit for bit instead of subtracting the rounded update again.
        self.register_buffer("premerge_weight", None, persistent=False)
        self.register_state_dict_post_hook(_state_dict_base_keys)
        self.register_load_state_dict_pre_hook(_load_state_dict_base_keys)
        self.train(base.training)  # a model in eval mode gets LoRA layers in eval mode (no dropout)

    @property
    def dropout(self) -> float:
        """The LoRA dropout probability; setting it checks the new value (:func:`lora_fast.checks.check_dropout_p`)."""
        return self._dropout

    @dropout.setter
    def dropout(self, p: float) -> None:
        self._dropout = check_dropout_p(p, "LoRA dropout")

    @property
    def backend(self) -> str:
        """The backend of :func:`lora_fast.lora_linear` this layer runs; setting it checks the name."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        check_backend(name)
        self._backend = name

    @property
    def packed(self) -> bool:
        """Whether the base weight is GGUF-packed (a :class:`lora_fast.gguf.PackedLinear`)."""
        return isinstance(self.base, PackedLinear)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as ``W (N, K)``: the stored tensor, a transposed view of a Conv1D's ``(K, N)``, or a
        packed base's :class:`lora_fast.gguf.PackedWeight`."""
        return self.base.weight.t() if self.fan_in_fan_out else self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base(x)
        # The numbers were checked when set; the tensors are checked at every call (x is new, a weight may be swapped).
        weight, bias = self.weight, self.base.bias
        check_lora_tensors(x, weight, bias, self.lora_A, self.lora_B)
        p = self._dropout if self.training else 0.0
        return functional._apply(x, weight, bias, self.lora_A, self.lora_B, self.scaling, p, None, self._backend)

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` in fp32 (fp64 for an fp64 base weight), shaped like the stored base weight (``(K, N)`` for
        Conv1D)."""
        dt = torch.promote_types(self.base.weight.dtype, torch.float32)
        delta = self.scaling * (self.lora_B.detach().to(dt) @ self.lora_A.detach().to(dt))
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold the LoRA update into the base weight (computed in fp32, fp64 for an fp64 weight, then cast). A merged
        layer is left alone.

        With ``keep_original`` (the default) a copy of the pre-merge weight is held until ``unmerge()``, which then
        restores it exactly: one extra copy of this weight, on its device, while merged. ``merge_and_unload`` merges
        without it.
        """
        if self.merged:
            return
        if self.packed:
            raise TypeError(
                f"cannot merge LoRA into a GGUF-packed {self.base.qtype} weight: it would have to be quantised "
                "again, which rounds the update away. merge_and_unload(model) gives a float model with the update "
                "merged; disable_lora(model) gives the base model's output"
            )
        w = self.base.weight
        if _is_sharded(w):
            raise RuntimeError(
                f"merge: the base weight is sharded (a {type(w).__name__}, e.g. FSDP's), and merging needs it whole; "
                "save the adapter (its weights gathered whole), load it into the base model on one process "
                "(load_adapter) and merge there"
            )
        if keep_original:
            self.premerge_weight = w.detach().clone()
        delta = self.delta_weight()
        w.copy_((w.to(delta.dtype) + delta).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the pre-merge base weight back, bit for bit."""
        if not self.merged:
            return
        if self.premerge_weight is None:
            raise RuntimeError(
                "this LoRA layer was merged with keep_original=False: its pre-merge weight is gone, so unmerge "
                "cannot restore it exactly"
            )
        self.base.weight.copy_(self.premerge_weight)
        self.premerge_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        layout = "Conv1D" if self.fan_in_fan_out else "Linear"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:g}{', rslora' if self.use_rslora else ''}, dropout={self.dropout}, "
            f"layout={layout}, backend={self.backend}, merged={self.merged}"
        )


# The state_dict of a LoRALinear named ``p`` holds ``p.weight``/``p.bias`` (the wrapped layer's own keys, not
# ``p.base.weight``) and ``p.lora_A``/``p.lora_B``; while merged also ``p.lora_merged`` (a bool scalar), which says that
# ``p.weight`` holds the merged update, so such a weight is never loaded under LoRA a second time. It is a key, not
# only the state_dict's metadata (also recorded), because safetensors files (``save_pretrained``) drop metadata. A
# model without LoRA ignores it as an unexpected key, as it ignores the LoRA weights, and gets the merged weights.
MERGED_KEY = "lora_merged"


def _state_dict_base_keys(module: LoRALinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    inner = prefix + "base."
    own = [k for k in state_dict if k.startswith(prefix)]
    entries = {(prefix + k[len(inner) :] if k.startswith(inner) else k): state_dict.pop(k) for k in own}
    base_first = sorted(entries, key=lambda k: k.startswith(prefix + "lora_"))
    for key in base_first:
        state_dict[key] = entries[key]
    if module.merged:
        state_dict[prefix + MERGED_KEY] = torch.ones((), dtype=torch.bool)
    local_metadata["lora_merged"] = module.merged


def _load_state_dict_base_keys(
    module: LoRALinear, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    flag = state_dict.pop(prefix + MERGED_KEY, None)  # ours to read: never an unexpected key of a LoRA layer
    if module.merged:
        error_msgs.append(f"{prefix}: the LoRA layer is merged; call unmerge_lora before load_state_dict")
        return
    if local_metadata.get("lora_merged") or (flag is not None and bool(flag)):
        error_msgs.append(
            f"{prefix}: the state_dict was saved from a merged LoRA layer (its weight holds the update); loading it "
            "under LoRA would apply the update twice. Load it into a model without LoRA, or save it unmerged"
        )
        return
    for name in [n for n, _ in module.base.named_parameters(recurse=False)] + [
        n for n, _ in module.base.named_buffers(recurse=False)
    ]:
        if prefix + name in state_dict:
            state_dict[prefix + "base." + name] = state_dict.pop(prefix + name)
