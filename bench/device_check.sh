#!/usr/bin/env bash
# One device check (< 5 min on an H100): the CUDA test tier, the quick benchmark, and the kernel timing table.
# Everything goes under $OUT (./device_out when unset). Run from the repository root.
set -u
OUT="${OUT:-device_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

# The GPU image has torch, triton, transformers and peft but no network: install this checkout alone, in place.
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee "$OUT/install.log" || status=1

echo "== CUDA test tier"
python -m pytest tests -m cuda -q -rs 2>&1 | tee "$OUT/pytest_cuda.log" || status=1
# (The CPU-tier tests skip themselves on a GPU machine: they run on CPU tensors under TRITON_INTERPRET=1.)

echo "== bench/run.py --quick"
if [ -f bench/run.py ]; then
    timeout 120 python bench/run.py --quick --device cuda --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" || status=1
else
    echo "bench/run.py is not in this tree yet: skipped" | tee "$OUT/bench.log"
fi

echo "== kernel timing"
timeout 150 python bench/kernel_timing.py --out "$OUT" 2>&1 | tee "$OUT/kernel_timing.log" || status=1
exit $status
