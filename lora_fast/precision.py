"""Whether a device multiplies bf16 natively: the rule behind ``--dtype auto`` (bf16 autocast where it is faster).

On a CPU, torch's bf16 matmuls (``mm``, ``addmm``, ``linear``: what autocast runs in bf16) go to oneDNN, which is
fast only where the CPU has bf16 arithmetic units:

- AMX tiles (Intel Sapphire Rapids and later): ``torch.cpu._is_amx_tile_supported()``;
- ``avx512_bf16``, bf16 dot products in AVX-512 registers (Intel Cooper Lake, AMD Zen 4 and 5):
  ``torch.cpu._is_avx512_bf16_supported()``.

Both read the CPU's feature flags (CPUID, the flags ``lscpu`` prints). Elsewhere oneDNN emulates bf16 (converting to
fp32 around fp32 arithmetic) or torch falls back to its own loops, and a bf16 step is slower than an fp32 one:
docs/TRAINING.md ("bf16 on a CPU") has the measurements, on a Zen 4 EPYC with oneDNN allowed and then denied the bf16
instructions (``ONEDNN_MAX_CPU_ISA``, which this check honours). Other CPUs (Arm's bf16 extensions among them) are
not known fast and count as not native: ``--dtype bf16`` still forces bf16 there.

On CUDA the answer is compute capability 8.0 or later (Ampere on), where the tensor cores take bf16; torch's own
``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import torch

__all__ = ["BF16Support", "bf16_support", "cpu_bf16_support"]

# Values of oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, formerly DNNL_MAX_CPU_ISA) that still let it use the bf16
# instructions; any other value (AVX2, AVX512_CORE, AVX512_CORE_VNNI, or a name this list does not know) keeps
# oneDNN off them, so bf16 would be emulated.
_BF16_ISA_CAPS = frozenset(
    {
        "ALL",
        "DEFAULT",
        "AVX512_CORE_BF16",
        "AVX512_CORE_FP16",
        "AVX512_CORE_AMX",
        "AVX512_CORE_AMX_FP16",
        "AVX10_1_512",
        "AVX10_1_512_AMX",
        "AVX10_1_512_AMX_FP16",
        "AVX10_2_512",
        "AVX10_2_512_AMX_2",
    }
)


@dataclass(frozen=True)
class BF16Support:
    """Whether a device multiplies bf16 natively (``native``), why (``reason``, one line), and on a CPU what was read:
    torch's vector ISA level (``isa``, e.g. ``AVX512``) and the two flags."""

    native: bool
    reason: str
    isa: str | None = None
    amx_tile: bool | None = None
    avx512_bf16: bool | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _isa_cap() -> str | None:
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name)
        if value:
            return f"{name}={value}"
    return None


@functools.cache
def cpu_bf16_support() -> BF16Support:
    """This CPU's answer (cached: the flags do not change while the process runs)."""
    amx, avx512_bf16 = bool(torch.cpu._is_amx_tile_supported()), bool(torch.cpu._is_avx512_bf16_supported())
    flags = {"isa": torch.backends.cpu.get_cpu_capability(), "amx_tile": amx, "avx512_bf16": avx512_bf16}
    if not (amx or avx512_bf16):
        reason = "this CPU has neither AMX tiles nor avx512_bf16: its bf16 matmuls are emulated, slower than fp32"
        return BF16Support(False, reason, **flags)
    units = "AMX tiles" if amx else "avx512_bf16"
    if not torch.backends.mkldnn.is_available():
        return BF16Support(False, f"this CPU has {units}, but torch is built without oneDNN, which uses them", **flags)
    cap = _isa_cap()
    if cap is not None and cap.split("=", 1)[1].upper() not in _BF16_ISA_CAPS:
        return BF16Support(False, f"this CPU has {units}, but {cap} keeps oneDNN off its bf16 instructions", **flags)
    return BF16Support(True, f"this CPU has {units}: torch's bf16 matmuls run natively", **flags)


def bf16_support(device: torch.device | str) -> BF16Support:
    """Whether ``device`` (a CPU or a CUDA device) multiplies bf16 natively, with the reason."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_bf16_support()
    if device.type == "cuda":
        name, (major, minor) = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        if major >= 8:
            return BF16Support(True, f"{name} (compute capability {major}.{minor}) multiplies bf16 natively")
        return BF16Support(False, f"{name} (compute capability {major}.{minor}, below 8.0) has no native bf16")
    return BF16Support(False, f"bf16 autocast is used on CPU and CUDA devices only, not {device.type}")
