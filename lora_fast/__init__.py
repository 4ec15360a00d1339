"""lora-fast: LoRA layers with fused Triton kernels, injection into HF models, and HF PEFT adapter files.

Three levels: the functional op :func:`lora_linear` (backends ``reference``, ``torch``, ``triton``, ``auto``), the
module :class:`LoRALinear`, and the model API (:func:`apply_lora`, :func:`save_adapter`, :func:`load_adapter`, ...).
The Triton kernels are ``lora_fast.kernels``; the sentiment study built on the library is ``lora_fast.study``, which
the library never imports (docs/ARCHITECTURE.md).
"""

from lora_fast.adapters import AdapterError, load_adapter, read_adapter_config, save_adapter
from lora_fast.functional import BACKENDS, lora_linear
from lora_fast.layers import LoRALinear
from lora_fast.model import (
    LoRAConfig,
    apply_lora,
    count_parameters,
    disable_lora,
    find_targets,
    get_lora_config,
    lora_modules,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    print_trainable_parameters,
    set_backend,
    unmerge_lora,
)
from lora_fast.peft_patch import patch_peft, unpatch_peft
from lora_fast.precision import bf16_support

__all__ = [
    "BACKENDS",
    "AdapterError",
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "bf16_support",
    "count_parameters",
    "disable_lora",
    "find_targets",
    "get_lora_config",
    "load_adapter",
    "lora_linear",
    "lora_modules",
    "lora_state_dict",
    "merge_and_unload",
    "merge_lora",
    "patch_peft",
    "print_trainable_parameters",
    "read_adapter_config",
    "save_adapter",
    "set_backend",
    "unmerge_lora",
    "unpatch_peft",
]
__version__ = "0.1.0"
