"""lora-fast: LoRA layers with fused Triton kernels, injection into HF models, and HF PEFT adapter files."""

from lora_fast.functional import BACKENDS, lora_linear

__all__ = ["BACKENDS", "lora_linear"]
__version__ = "0.1.0"
