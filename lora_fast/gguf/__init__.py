"""GGUF-quantised weights kept packed: LoRA over the file's 4- to 8-bit blocks instead of a float copy.

:class:`PackedWeight` holds one quantised matrix as the file's bytes; :class:`PackedLinear` and
:class:`PackedEmbedding` are the frozen layers over it (dequantised one layer at a time, just in time);
``lora_linear``, ``LoRALinear`` and ``apply_lora`` take them as they take ``nn.Linear``. :func:`load_gguf_model`
builds a Hugging Face model from a GGUF file with packed layers (it needs ``transformers`` and the ``gguf`` package);
:func:`dequantize_model` turns one back into a float model. Formats: :data:`PACKED_TYPES` (Q4_0, Q4_1, Q5_0, Q8_0,
Q4_K, Q6_K), dequantised bit for bit as the ``gguf`` package does.
"""

from lora_fast.gguf.convert import dequantize_model, packed_modules, weight_bytes
from lora_fast.gguf.formats import PACKED_TYPES, QTYPES, dequantize_rows
from lora_fast.gguf.loader import load_gguf_model
from lora_fast.gguf.packed import PackedEmbedding, PackedLinear, PackedWeight, packed_linear

__all__ = [
    "PACKED_TYPES",
    "QTYPES",
    "PackedEmbedding",
    "PackedLinear",
    "PackedWeight",
    "dequantize_model",
    "dequantize_rows",
    "load_gguf_model",
    "packed_linear",
    "packed_modules",
    "weight_bytes",
]
