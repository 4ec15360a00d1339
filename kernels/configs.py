"""Pinned launch configurations: one short, ordered candidate list per kernel and shape, and a launch helper that
takes the first candidate the device can hold.

No autotuning. A candidate list depends only on the GPU class (:mod:`kernels.tiles`: shared memory and MMA
instructions differ between sm_80, sm_86/89/120, sm_90 and sm_100), the kernel's compile-time switches, the compute
dtypes, the padded rank and the shape (the GEMM tiles are ordered by wave count, the skinny kernels' row blocks by
how many fill the GPU); :func:`launch` walks it in order and skips a candidate only when Triton refuses to load it
for want of shared memory (``OutOfResources``, raised before anything runs), saying so once per kernel and shape in a
warning that names the GPU. The last candidate of every list is a small tile that fits any CUDA GPU Triton supports.
So the chosen configuration, and with it every bit of every result, is the same in every process on the same GPU
model and Triton version for the same shape; across models or versions the tile can differ
(``bench/compile_check.py`` records which is chosen on each target ptxas knows).

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
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import triton
from triton.runtime.errors import OutOfResources

from .tiles import KernelConfig, by_waves, cfg, dx_tiles, forward_tiles, gpu_class
from .utils import interpreting

__all__ = ["KernelConfig", "cfg"]  # re-exported from kernels.tiles


# ---------------------------------------------------------------- device facts


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the launchers need to know about the GPU: SM count (grid sizing, wave counts), capability (tile tables)
    and name (warnings)."""

    num_sms: int
    capability: tuple[int, int]
    name: str = "GPU"

    @property
    def gpu_class(self) -> str:
        return gpu_class(self.capability)


# The cost model's GPU, and the launchers' where no device is given: an H100 SXM.
H100 = DeviceInfo(132, (9, 0), "H100 SXM (assumed)")


_DEVICE_OVERRIDE: DeviceInfo | None = None


def device_info(device: torch.device) -> DeviceInfo:
    """The facts of ``device``; under the interpreter a small stand-in; for ``meta`` tensors the compile tier's."""
    if _DEVICE_OVERRIDE is not None and device.type == "meta":
        return _DEVICE_OVERRIDE
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo(props.multi_processor_count, (props.major, props.minor), props.name)
    return DeviceInfo(2, (0, 0), f"{device.type} (Triton interpreter)")


# ---------------------------------------------------------------- candidate lists


def dtype_class(dtype: torch.dtype, input_precision: str) -> str:
    """``"16"`` (bf16/fp16: tensor cores), ``"tf32"`` or ``"ieee"`` (fp32 dots on FMA units)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16"
    return "tf32" if input_precision == "tf32" else "ieee"


_INTERPRET_GEMM = cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)

# Tiles that fit every CUDA GPU Triton runs on (within 99 KB of shared memory, fp32 and R = 256 included): the fused
# dx holds u, h_s and the dB product of its rows as well, so it takes half the rows.
_FALLBACK_GEMM = cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)
_FALLBACK_DX = cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)


def forward_configs(
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    input_precision: str,
    fused: bool,
    block_r: int = 16,
    info: DeviceInfo | None = None,
    M: int = 0,
    N: int = 0,
) -> list[KernelConfig]:
    """Candidates for the forward GEMM (tile of y) on ``info``'s GPU (an H100 when None), for ``M × N`` outputs at
    padded rank ``block_r``: the GPU class's tiles by wave count, the fallback last (the forward GEMM never draws the
    dropout mask)."""
    if interpreting():
        return [_INTERPRET_GEMM]
    info = info or H100
    base, lora = dtype_class(base_dtype, input_precision), dtype_class(lora_dtype, input_precision)
    tiles = forward_tiles(info.gpu_class, base, lora, fused, block_r)
    # The fused forward repeats h = x Aᵀ per column tile: R_padded/BLOCK_N of the tile's work.
    return [*by_waves(tiles, M, N, "BLOCK_N", info.num_sms, float(block_r) if fused else 0.0), _FALLBACK_GEMM]


def dx_configs(
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    input_precision: str,
    fused: bool,
    dropout: bool,
    block_r: int,
    info: DeviceInfo | None = None,
    M: int = 0,
    K: int = 0,
) -> list[KernelConfig]:
    """Candidates for the dx GEMM (tile of dx) on ``info``'s GPU (an H100 when None), for ``M × K`` outputs: the GPU
    class's tiles by wave count, the fallback last."""
    if interpreting():
        return [_INTERPRET_GEMM]
    info = info or H100
    base, lora = dtype_class(base_dtype, input_precision), dtype_class(lora_dtype, input_precision)
    tiles = dx_tiles(info.gpu_class, base, lora, fused, dropout, block_r > 16)
    # The fused dx repeats u = g B and the dB product per column tile: 2·R_padded/BLOCK_K of the tile's work.
    return [*by_waves(tiles, M, K, "BLOCK_K", info.num_sms, 2.0 * block_r if fused else 0.0), _FALLBACK_DX]


def skinny_configs(M: int, block_r: int, elem_bytes: int, info: DeviceInfo) -> list[KernelConfig]:
    """Candidates for ``(M, C) @ (C, R)`` with one program per BLOCK_M rows: BLOCK_M is 64, or 32 where that would
    give fewer than two programs per SM (a memory-bound pass keeps every SM streaming); fp32 operands and ranks above
    64 take a narrower C step, and 8 warps hold a rank of 64 or more (no spill, bench/compile_check.py)."""
    if interpreting():
        return [cfg(BLOCK_M=16, BLOCK_C=32, num_warps=4, num_stages=1)]
    block_m = 64 if triton.cdiv(M, 64) >= 2 * info.num_sms else 32
    block_c = 64 if elem_bytes == 2 and block_r <= 64 else 32
    warps = 8 if block_r >= 64 else 4
    return [
        cfg(BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps, num_stages=3),
        cfg(BLOCK_M=16, BLOCK_C=16, num_warps=warps, num_stages=1),
    ]


def reduce_configs(
    block_r: int, dtype: torch.dtype, input_precision: str, interpret: bool | None = None
) -> list[KernelConfig]:
    """Candidates for the split reduction over M (programs own BLOCK_C columns × the rank, loop over rows in 32-row
    steps); fp32 "ieee" and ranks from 32 take 32-column blocks, 8 warps hold the rank (no spill on sm_80,
    bench/compile_check.py). ``interpret``: the interpreter's candidate (default: whether it runs); the cost model
    asks for a GPU's."""
    if interpreting() if interpret is None else interpret:
        return [cfg(BLOCK_M=16, BLOCK_C=32, num_warps=4, num_stages=1)]
    cls = dtype_class(dtype, input_precision)
    narrow = block_r >= 32 or cls == "ieee"
    warps = 8
    return [
        cfg(BLOCK_M=32, BLOCK_C=32 if narrow else 64, num_warps=warps, num_stages=3),
        cfg(BLOCK_M=32, BLOCK_C=32, num_warps=warps, num_stages=1),
    ]


def rank_out_configs(lora_dtype: torch.dtype = torch.bfloat16) -> list[KernelConfig]:
    """The hybrid design's LoRA-term writer: a (BLOCK_M, BLOCK_C) tile of the output from a rank-R product (memory
    bound: one write of the output); fp32 rank work (its operands in registers) takes an eighth of the tile."""
    if interpreting():
        return [cfg(BLOCK_M=16, BLOCK_C=32, GROUP_M=4, num_warps=4, num_stages=1)]
    wide = lora_dtype.itemsize == 2
    return [
        cfg(BLOCK_M=64 if wide else 32, BLOCK_C=128 if wide else 32, GROUP_M=8, num_warps=8, num_stages=2),
        cfg(BLOCK_M=32, BLOCK_C=64, GROUP_M=8, num_warps=4, num_stages=1),
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
    info: DeviceInfo | None = None,
    shape: str = "",
) -> KernelConfig:
    """Launch ``kernel[grid(config)](*args, **constexprs, **config)`` with the first candidate the device can hold.

    ``args`` may be a function of the configuration (buffers sized by the tile); it is called before ``grid``.
    Returns the configuration used. A candidate Triton refuses (``OutOfResources``: more shared memory than the
    device's per-block limit) is skipped and remembered, so later calls start at the one that worked; the first time a
    launch runs on a later candidate than the first, a RuntimeWarning names the GPU (``info``), the kernel, the
    ``shape`` and both tiles: the tile tables (:mod:`kernels.tiles`) have no tile sized for this GPU.
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
        if i > 0 and key not in _CHOSEN:
            gpu = info or DeviceInfo(0, (0, 0))
            warnings.warn(
                f"lora_fast: {getattr(kernel, '__name__', kernel)} on {gpu.name} (compute capability "
                f"{gpu.capability[0]}.{gpu.capability[1]}), {shape or 'this shape'}: its tile {candidates[0]} does "
                f"not fit this GPU's shared memory; running the smaller {config}, which is slower",
                RuntimeWarning,
                stacklevel=2,
            )
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
