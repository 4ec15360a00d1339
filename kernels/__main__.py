"""``python -m lora_fast.kernels [--table designs.json]`` prints the cost model's estimate
(:func:`kernels.designs.estimate_markdown`), what the targets need (:func:`kernels.designs.targets_markdown`) and
what a stored dropout mask would change (:func:`kernels.designs.stored_mask_markdown`), on the data-sheet H100 or,
with ``--table``, on the machine a device run's design table calibrated.

The entry point is the package's, not ``kernels.designs``'s: the package imports that module (its launchers choose
their design with it), so ``python -m lora_fast.kernels.designs`` would run a second copy of it, which runpy warns
about.
"""

import argparse

from .cost import CALIBRATED, H100
from .designs import estimate_markdown, load_table, stored_mask_markdown, targets_markdown

parser = argparse.ArgumentParser(prog="python -m lora_fast.kernels", description=__doc__.split("\n\n")[0])
parser.add_argument("--table", help="a device run's designs.json: its calibrated figures instead of the data sheet's")
args = parser.parse_args()
machine = H100
if args.table:
    try:
        machine = load_table(args.table)["machine"]
    except ValueError as e:
        parser.error(str(e))
    if machine is None:
        parser.error(f"{args.table}: this design table holds no calibration (written before calibration existed)")
    print(", ".join(f"{k} = {getattr(machine, k):.4g}" for k in CALIBRATED), f"({machine.name})\n")
print(estimate_markdown(machine=machine))
print(targets_markdown(machine=machine))
print(stored_mask_markdown(machine=machine))
