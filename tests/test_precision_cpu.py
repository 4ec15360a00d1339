"""The detection behind ``--dtype auto`` on a CPU (``lora_fast.precision``): whether it multiplies bf16 natively, from
torch's CPU flags, oneDNN's ISA cap and whether torch has oneDNN at all."""

import pytest
import torch

from lora_fast import precision as lp


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set the CPU's bf16 flags as torch reports them: ``cpu_flags(amx=..., avx512_bf16=...)``."""

    def set_flags(amx: bool, avx512_bf16: bool):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        lp.cpu_bf16_support.cache_clear()

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    yield set_flags
    lp.cpu_bf16_support.cache_clear()


@pytest.mark.parametrize(
    "amx, avx512_bf16, native, words",
    [
        (True, True, True, "AMX tiles"),
        (False, True, True, "avx512_bf16"),
        (False, False, False, "neither AMX tiles nor avx512_bf16"),
    ],
)
def test_cpu_bf16_support_reads_the_flags(cpu_flags, amx, avx512_bf16, native, words):
    cpu_flags(amx, avx512_bf16)
    support = lp.bf16_support("cpu")
    assert support.native is native and words in support.reason
    assert (support.amx_tile, support.avx512_bf16) == (amx, avx512_bf16)
    assert support.isa == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("var", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
@pytest.mark.parametrize(
    "cap, native",
    [("AVX512_CORE", False), ("avx2", False), ("TYPO", False), ("AVX512_CORE_BF16", True),
     ("avx512_core_amx", True), ("ALL", True)],
)  # fmt: skip
def test_a_onednn_isa_cap_below_bf16_is_not_native(cpu_flags, monkeypatch, var, cap, native):
    """oneDNN capped below its bf16 instructions emulates bf16 (docs/TRAINING.md has the measurement)."""
    cpu_flags(False, True)
    monkeypatch.setenv(var, cap)
    support = lp.cpu_bf16_support()
    assert support.native is native
    assert native or f"{var}={cap} keeps oneDNN off" in support.reason


def test_torch_without_onednn_is_not_native(cpu_flags, monkeypatch):
    cpu_flags(True, True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    support = lp.cpu_bf16_support()
    assert not support.native and "built without oneDNN" in support.reason
