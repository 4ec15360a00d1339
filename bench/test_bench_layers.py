"""The CPU layer cases as pytest-benchmark benchmarks: ``pytest bench/ --benchmark-only``.

One benchmark per (shape, R, dropout, variant, phase), grouped by case so pytest-benchmark's table compares the
floor, PEFT-style eager LoRA, HF PEFT's ``lora.Linear`` and lora-fast's ``torch`` backend side by side. FLOPs (the
formulas of :mod:`bench.layer_bench`) and the saved-for-backward bytes go into ``extra_info``.
"""

import pytest
import torch

from bench.layer_bench import LayerCase, PreparedVariant, cases, flops

CASES = cases("cpu", quick=True)
VARIANTS = ("floor", "peft_eager", "hf_peft", "torch")


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c.K}-N{c.N}-R{c.R}-p{c.p}")
def test_layer(benchmark, case: LayerCase, variant: str, phase: str):
    torch.manual_seed(0)
    prepared = PreparedVariant(case, variant, "cpu")
    if not prepared.ok:
        pytest.skip(f"{variant} cannot run here")
    benchmark.group = f"M{case.M} K{case.K}->N{case.N} R{case.R} p{case.p} {phase}"
    benchmark.extra_info.update(flops=flops(case, variant, phase), saved_bytes=prepared.mem)
    benchmark.pedantic(prepared.phases[phase], rounds=10, warmup_rounds=2)
