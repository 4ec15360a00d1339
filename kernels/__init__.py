"""Fused Triton kernels for LoRA (installed as ``lora_fast.kernels``); launchers only, no autograd."""

__all__: list[str] = []
