"""The GGUF dequantisation kernel (``kernels/gguf_dequant.py``) in the offline compile tier: compiled for an H100
(sm_90) and an A100 (sm_80) with Triton's bundled ptxas, as its launcher calls it (on ``meta`` tensors inside
:func:`lora_fast.kernels.configs.capture_launches`, like ``bench/compile_check.py``), for every packed format and
output dtype at a 4096 × 4096 weight.

    python -m bench.compile_gguf                 # every format × fp32/fp16/bf16 × sm_90/sm_80 (~1 min of one core)
    python -m bench.compile_gguf --subset ci     # bf16 on sm_90 and fp32 on sm_80 (what CI compiles)

Checked (exit status 1 on failure): every compile fits the target's shared memory and spills nothing. Printed per
compile: shared memory, registers, spills, SASS instruction count.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for real targets, whatever the caller's environment

import torch  # noqa: E402

from bench.compile_check import TARGETS, compile_one  # noqa: E402  (its import sets up a fresh Triton cache)
from lora_fast.kernels import configs  # noqa: E402
from lora_fast.kernels.gguf_dequant import FORMATS, gguf_dequantize  # noqa: E402

N = K = 4096
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CI_SUBSET = [("bf16", 90), ("fp32", 80)]


def compile_case(qtype: str, dtype_name: str, arch: int) -> dict:
    """Compile the launch ``gguf_dequantize`` makes for ``qtype`` into ``dtype_name`` on ``sm_<arch>``."""
    found = []

    def hook(kernel, grid, arguments, constexprs, candidates):
        config = candidates[0]
        found.append(dict(kernel=kernel.__name__, config=str(config),
                          **compile_one(kernel, arguments(config), constexprs, config, arch)))  # fmt: skip
        return config

    _, qk, type_size = FORMATS[qtype]
    q = torch.empty((N, K // qk * type_size), dtype=torch.uint8, device="meta")
    with configs.capture_launches(hook, configs.DeviceInfo(TARGETS[arch]["sms"], (arch // 10, arch % 10))):
        gguf_dequantize(q, qtype, K, DTYPES[dtype_name])
    (launch,) = found
    return dict(qtype=qtype, dtype=dtype_name, arch=arch, **launch)


def check(cases: list[dict]) -> list[str]:
    failures = []
    for c in cases:
        tag = f"{c['qtype']} -> {c['dtype']} sm_{c['arch']}"
        if c["shared"] > TARGETS[c["arch"]]["shared"]:
            failures.append(f"{tag}: {c['shared']} B of shared memory > {TARGETS[c['arch']]['shared']}")
        if c["spill_stores"] or c["spill_loads"]:
            failures.append(f"{tag}: spills {c['spill_stores']} B stores, {c['spill_loads']} B loads")
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=["ci"], help="only bf16 on sm_90 and fp32 on sm_80")
    args = ap.parse_args(argv)
    grid = CI_SUBSET if args.subset else [(d, a) for a in TARGETS for d in DTYPES]
    cases = [compile_case(q, d, a) for d, a in grid for q in FORMATS]
    print("| format | out | target | shared B | registers | spills (st/ld) | SASS |\n|---|---|---|---|---|---|---|")
    for c in cases:
        print(f"| {c['qtype']} | {c['dtype']} | sm_{c['arch']} | {c['shared']} | {c['registers']} "
              f"| {c['spill_stores']}/{c['spill_loads']} | {c['sass']} |")  # fmt: skip
    failures = check(cases)
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    print("gguf compile tier verified" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
