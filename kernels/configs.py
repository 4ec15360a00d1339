"""Pinned launch configurations: one short, ordered candidate list per kernel and shape class, and a launch helper
that takes the first candidate the device can hold.

No autotuning. A candidate list depends only on the kernel's compile-time switches, the compute dtypes, the padded
rank and, for the skinny kernels, on how many row blocks fill the GPU; :func:`launch` walks it in order and skips a
candidate only when Triton refuses to load it for want of shared memory (``OutOfResources``, raised before anything
runs). The last candidate of every list is a small tile that fits any CUDA GPU Triton supports. So the chosen
configuration, and with it every bit of every result, is the same in every process on the same GPU model and
Triton version; across models or versions the tile can differ (``bench/compile_check.py`` records which is chosen
on sm_90 and sm_80).

Under Triton's interpreter one small tile serves every kernel (each program there costs milliseconds).

``bench/compile_check.py`` runs the very same launchers on ``meta`` tensors with :func:`capture_launches`: each
:func:`launch` then hands its kernel, arguments and candidates to a callback that compiles them offline for a chosen
GPU instead of running them, so the compile tier sees exactly the signatures and configurations the launchers use.

:data:`INT32_LIMIT` bounds the offsets the kernels form in int32; the launchers check their operands against it
(:func:`check_int32_offsets`) and size the partial buffers by it (:func:`kernels.partials.max_partials`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
import triton
from triton.runtime.errors import OutOfResources

from .utils import interpreting


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Meta-parameters (``BLOCK_*``, ``GROUP_M``) plus warps and pipeline stages of one launch."""

    meta: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2

    def __getitem__(self, name: str) -> int:
        return dict(self.meta)[name]

    def kwargs(self) -> dict:
        return {**dict(self.meta), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def __str__(self) -> str:
        tiles = "x".join(str(v) for k, v in self.meta if k.startswith("BLOCK_"))
        return f"{tiles} w{self.num_warps} s{self.num_stages}"


def cfg(num_warps: int = 4, num_stages: int = 2, **meta: int) -> KernelConfig:
    return KernelConfig(tuple(meta.items()), num_warps, num_stages)


# ---------------------------------------------------------------- device facts


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the launchers need to know about the GPU: SM count (grid sizing) and capability (config tables)."""

    num_sms: int
    capability: tuple[int, int]


_DEVICE_OVERRIDE: DeviceInfo | None = None


def device_info(device: torch.device) -> DeviceInfo:
    """The facts of ``device``; under the interpreter a small stand-in; for ``meta`` tensors the compile tier's."""
    if _DEVICE_OVERRIDE is not None and device.type == "meta":
        return _DEVICE_OVERRIDE
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo(props.multi_processor_count, (props.major, props.minor))
    return DeviceInfo(2, (0, 0))


# ---------------------------------------------------------------- candidate lists


def dtype_class(dtype: torch.dtype, input_precision: str) -> str:
    """``"16"`` (bf16/fp16: tensor cores), ``"tf32"`` or ``"ieee"`` (fp32 dots on FMA units)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16"
    return "tf32" if input_precision == "tf32" else "ieee"


_INTERPRET_GEMM = cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)

# A tile that fits every CUDA GPU Triton runs on (well under 99 KB of shared memory, fp32 and R = 256 included).
_FALLBACK_GEMM = cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)

# Forward GEMM: tile of y (BLOCK_M, BLOCK_N), loop over K in BLOCK_K steps. Key: (dtype class, rank work fused into
# the loop, dropout mask drawn in the loop). A wide N tile divides the fused rank work (R/BLOCK_N extra FLOPs).
_FORWARD = {
    ("16", False, False): [cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)],
    ("16", True, False): [cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)],
    ("16", True, True): [cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)],
    ("tf32", False, False): [cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)],
    ("tf32", True, False): [cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)],
    ("tf32", True, True): [cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)],
    # fp32 "ieee" dots run on the FMA units with their operands in registers: smaller tiles, more warps.
    ("ieee", False, False): [cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)],
    ("ieee", True, False): [cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=2)],
    ("ieee", True, True): [cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=2)],
}

# Before Hopper (no wgmma: mma.sync keeps its operand fragments in registers) the widest tiles spill; these replace
# the forward entries above there.
_FORWARD_PRE_HOPPER = {
    ("16", fused, dropout): [cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)]
    for fused in (False, True)
    for dropout in (False, True)
}


# dx GEMM: tile of dx (BLOCK_M, BLOCK_K), loop over N in BLOCK_N steps. A wide K tile divides the fused rank work
# (R/BLOCK_K extra FLOPs); the fused epilogue with dropout holds a second (BLOCK_M, BLOCK_K) fp32 tile (the masked
# LoRA term), and a padded rank above 16 holds larger u, h and dA tiles, so both narrow the tile. Chosen so that no
# configuration spills on sm_90 or sm_80 for R <= 64 (bench/compile_check.py checks it).
def _dx_tile(cls: str, fused: bool, dropout: bool, wide_rank: bool, hopper: bool) -> KernelConfig:
    def gemm(m: int, n: int, k: int, warps: int = 8, stages: int = 3) -> KernelConfig:
        return cfg(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=warps, num_stages=stages)

    if cls == "ieee":  # fp32 on the FMA units, operands in registers
        return gemm(32, 16, 32, 4, 2) if fused else gemm(64, 32, 64, 4, 2)
    if cls == "tf32":
        if not fused:
            return gemm(128, 32, 64 if dropout else 128)
        if hopper:
            return gemm(128, 32, 64 if (dropout or wide_rank) else 128)
        return gemm(64 if wide_rank else 128, 32, 64)
    if not fused:
        return gemm(128, 64, 128 if (dropout or not hopper) else 256)
    if hopper:
        return gemm(128, 64, 64 if dropout else (128 if wide_rank else 256))
    if wide_rank:
        return gemm(64, 32, 64) if dropout else gemm(128, 32, 64)
    return gemm(128, 32, 64, 4, 4) if dropout else gemm(128, 32, 128, 8, 4)


def _gemm_table(hopper_table: dict, older: dict, key: tuple, info: DeviceInfo | None) -> list[KernelConfig]:
    if info is not None and info.capability < (9, 0) and key in older:
        return older[key]
    return hopper_table[key]


def _forward_key(dtype: torch.dtype, input_precision: str, fused: bool, dropout: bool) -> tuple[str, bool, bool]:
    # The split forward GEMM draws no mask (the skinny kernel does).
    return dtype_class(dtype, input_precision), fused, fused and dropout


def forward_configs(
    dtype: torch.dtype, input_precision: str, fused: bool, dropout: bool, info: DeviceInfo | None = None
) -> list[KernelConfig]:
    """Candidates for the forward GEMM on ``info``'s GPU (an H100 when None), best first, the fallback last."""
    if interpreting():
        return [_INTERPRET_GEMM]
    key = _forward_key(dtype, input_precision, fused, dropout)
    return [*_gemm_table(_FORWARD, _FORWARD_PRE_HOPPER, key, info), _FALLBACK_GEMM]


def dx_configs(
    dtype: torch.dtype, input_precision: str, fused: bool, dropout: bool, block_r: int, info: DeviceInfo | None = None
) -> list[KernelConfig]:
    """Candidates for the dx GEMM on ``info``'s GPU (an H100 when None), best first, the fallback last."""
    if interpreting():
        return [_INTERPRET_GEMM]
    return [dx_tile(dtype, input_precision, fused, dropout, block_r, info), _FALLBACK_GEMM]


def forward_tile(dtype: torch.dtype, input_precision: str, fused: bool, dropout: bool) -> KernelConfig:
    """The forward GEMM's configuration on an H100 (the cost model's tile, under the interpreter too)."""
    return _FORWARD[_forward_key(dtype, input_precision, fused, dropout)][0]


def dx_tile(
    dtype: torch.dtype, input_precision: str, fused: bool, dropout: bool, block_r: int, info: DeviceInfo | None = None
) -> KernelConfig:
    """The dx GEMM's preferred configuration on ``info``'s GPU (an H100 when None: the cost model's tile)."""
    hopper = info is None or info.capability >= (9, 0)
    return _dx_tile(dtype_class(dtype, input_precision), fused, dropout, block_r > 16, hopper)


def skinny_configs(M: int, block_r: int, elem_bytes: int, info: DeviceInfo) -> list[KernelConfig]:
    """Candidates for ``(M, C) @ (C, R)`` with one program per BLOCK_M rows: BLOCK_M is 64, or 32 where that would
    give fewer than two programs per SM (a memory-bound pass keeps every SM streaming); fp32 operands and ranks above
    64 take a narrower C step, and 8 warps hold a rank of 128 or more (no spill, bench/compile_check.py)."""
    if interpreting():
        return [cfg(BLOCK_M=16, BLOCK_C=32, num_warps=4, num_stages=1)]
    block_m = 64 if triton.cdiv(M, 64) >= 2 * info.num_sms else 32
    block_c = 64 if elem_bytes == 2 and block_r <= 64 else 32
    warps = 8 if block_r >= 128 else 4
    return [
        cfg(BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps, num_stages=3),
        cfg(BLOCK_M=16, BLOCK_C=16, num_warps=warps, num_stages=1),
    ]


def reduce_configs(block_r: int, dtype: torch.dtype, input_precision: str) -> list[KernelConfig]:
    """Candidates for the split reduction over M (programs own BLOCK_C columns × the rank, loop over rows); fp32
    takes 32-row steps, fp32 "ieee" and large ranks 32-column blocks (no spill, bench/compile_check.py)."""
    if interpreting():
        return [cfg(BLOCK_M=16, BLOCK_C=32, num_warps=4, num_stages=1)]
    cls = dtype_class(dtype, input_precision)
    narrow = block_r > 64 or cls == "ieee"
    warps = 8 if block_r >= 128 else 4
    return [
        cfg(BLOCK_M=64 if cls == "16" else 32, BLOCK_C=32 if narrow else 64, num_warps=warps, num_stages=3),
        cfg(BLOCK_M=32, BLOCK_C=32, num_warps=warps, num_stages=1),
    ]


def finalize_configs() -> list[KernelConfig]:
    """The split-sum: each program sums the partials of BLOCK_C output rows (of the rank's width)."""
    if interpreting():
        return [cfg(BLOCK_C=32, num_warps=4, num_stages=1)]
    return [cfg(BLOCK_C=32, num_warps=4, num_stages=1), cfg(BLOCK_C=16, num_warps=4, num_stages=1)]


# ---------------------------------------------------------------- int32 offsets

# Rows and most tile offsets are int64 in the kernels, but some offsets are formed in int32 (a program id times a
# size in the partial buffers, a column index times a stride): each must stay below this, or it wraps round and the
# access lands elsewhere, silently. The launchers keep them below it (check_int32_offsets, kernels.partials).
INT32_LIMIT = 2**31


def int32_room(per_item: int) -> int:
    """How many items of ``per_item`` elements a buffer indexed in int32 holds (its elements below INT32_LIMIT)."""
    return (INT32_LIMIT - 1) // per_item if per_item > 0 else sys.maxsize


def check_int32_offsets(name: str, t: torch.Tensor, *dims: int) -> None:
    """Refuse ``t`` when the offset the kernels form in int32 over ``dims``, ``Σ (size - 1) · |stride|`` (the index
    along each dim an int32 position), reaches INT32_LIMIT: say a weight (N, K) of 2³¹ elements read by rows."""
    extent = sum((t.shape[d] - 1) * abs(t.stride(d)) for d in dims if t.shape[d] > 0)
    if extent >= INT32_LIMIT:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} and strides {t.stride()} needs offsets up to {extent} along dims "
            f"{dims}, which the kernels form in int32 (below {INT32_LIMIT}); the torch backend has no such limit"
        )


# ---------------------------------------------------------------- launching

# (kernel, device, candidates, compile-time switches) -> index of the first candidate that loaded, once per process.
_CHOSEN: dict[tuple, int] = {}

LaunchHook = Callable[[object, Callable, Callable, dict, Sequence[KernelConfig]], KernelConfig]
_HOOK: LaunchHook | None = None


def launch(
    kernel,
    grid: Callable[[KernelConfig], tuple[int, ...]],
    args: tuple | Callable[[KernelConfig], tuple],
    constexprs: dict,
    candidates: Sequence[KernelConfig],
) -> KernelConfig:
    """Launch ``kernel[grid(config)](*args, **constexprs, **config)`` with the first candidate the device can hold.

    ``args`` may be a function of the configuration (buffers sized by the tile); it is called before ``grid``.
    Returns the configuration used. A candidate Triton refuses (``OutOfResources``: more shared memory than the
    device's per-block limit) is skipped and remembered, so later calls start at the one that worked.
    """
    arguments = args if callable(args) else (lambda config: args)
    if _HOOK is not None:
        return _HOOK(kernel, grid, arguments, constexprs, candidates)
    device = torch.cuda.current_device() if torch.cuda.is_available() else -1  # Triton launches on this one
    key = (kernel, device, tuple(candidates), tuple(sorted(constexprs.items(), key=str)))
    start = _CHOSEN.get(key, 0)
    for i in range(start, len(candidates)):
        config = candidates[i]
        call_args = arguments(config)
        try:
            kernel[grid(config)](*call_args, **constexprs, **config.kwargs())
        except OutOfResources:
            continue
        _CHOSEN[key] = i
        return config
    raise RuntimeError(
        f"{kernel.__name__ if hasattr(kernel, '__name__') else kernel}: no configuration fits this GPU "
        f"(tried {', '.join(map(str, candidates))})"
    )


@contextlib.contextmanager
def capture_launches(hook: LaunchHook, info: DeviceInfo) -> Iterator[None]:
    """Within the block, :func:`launch` calls ``hook`` instead of running anything, and ``meta`` tensors report
    ``info`` as their device: the compile tier runs the launchers on ``meta`` tensors this way."""
    global _HOOK, _DEVICE_OVERRIDE
    saved = (_HOOK, _DEVICE_OVERRIDE)
    _HOOK, _DEVICE_OVERRIDE = hook, info
    try:
        yield
    finally:
        _HOOK, _DEVICE_OVERRIDE = saved
