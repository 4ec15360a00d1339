"""``python -m lora_fast.kernels`` prints the cost model's H100 estimate (:func:`kernels.cost.estimate_markdown`).

The entry point is the package's, not ``kernels.cost``'s: the package imports that module (its launchers choose their
design with it), so ``python -m lora_fast.kernels.cost`` would run a second copy of it, which runpy warns about.
"""

from .cost import estimate_markdown

print(estimate_markdown())
