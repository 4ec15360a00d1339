"""``python -m lora_fast.kernels`` prints the cost model's H100 estimate (:func:`kernels.designs.estimate_markdown`).

The entry point is the package's, not ``kernels.designs``'s: the package imports that module (its launchers choose
their design with it), so ``python -m lora_fast.kernels.designs`` would run a second copy of it, which runpy warns
about.
"""

from .designs import estimate_markdown

print(estimate_markdown())
