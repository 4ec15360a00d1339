"""Fused Triton kernels for LoRA (installed as ``lora_fast.kernels``); launchers only, no autograd."""

from .cost import backward_design, forward_design
from .dropout import dropout_threshold, lora_dropout_mask
from .lora_backward import lora_backward
from .lora_forward import lora_forward
from .utils import INPUT_PRECISIONS, TL_DTYPES, interpreting

__all__ = [
    "INPUT_PRECISIONS",
    "TL_DTYPES",
    "backward_design",
    "dropout_threshold",
    "forward_design",
    "interpreting",
    "lora_backward",
    "lora_dropout_mask",
    "lora_forward",
]
