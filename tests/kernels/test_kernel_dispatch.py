"""How the kernels are launched: launch counts per pass and design, nothing but allocations between launches, the
shared-memory pruner, and the design choice of the cost model.

Launches are counted where Triton's interpreter runs each grid (CPU tier); every torch op dispatched outside a
launch is recorded with a ``TorchDispatchMode`` and must be an allocation or a view.
"""

import contextlib
import json
import subprocess
import sys
import warnings
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_fast.kernels import configs, cost, designs, tiles
from lora_fast.kernels.designs import backward_design, forward_design
from lora_fast.kernels.dropout import dropout_key
from lora_fast.kernels.lora_backward import launch_lora_backward
from lora_fast.kernels.lora_forward import launch_lora_forward
from lora_fast.kernels.utils import interpreting
from tests.helpers import ROOT

cpu_tier = pytest.mark.skipif(not interpreting(), reason="CPU tier: launches are counted in Triton's interpreter")
KEY = dropout_key("cpu", 7)

# Allocations and views: what may run between two launches.
ALLOWED_OPS = {
    "aten.empty.memory_format",
    "aten.empty_strided.default",
    "aten.new_empty.default",
    "aten.t.default",
    "aten.view.default",
    "aten._reshape_alias.default",
    "aten.transpose.int",
    "aten.as_strided.default",
    "aten.slice.Tensor",
}


@contextlib.contextmanager
def count_launches():
    """Yields ``(launches, ops)``: kernel names in launch order, and the torch ops run outside any launch."""
    from triton.runtime import interpreter

    launches, ops, inside = [], [], []
    original = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        inside.append(True)
        try:
            return original(self, *args, **kwargs)
        finally:
            inside.pop()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside:
                ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with mock.patch.object(interpreter.GridExecutor, "__call__", counted), Ops():
        yield launches, ops


def _inputs(M=40, K=48, N=72, R=8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen)
    weight = torch.randn(K, N, generator=gen).t()  # Conv1D layout
    A, B = torch.randn(R, K, generator=gen), torch.randn(N, R, generator=gen)
    g = torch.randn(M, N, generator=gen)
    return x, weight, torch.randn(N, generator=gen), A, B, g


@cpu_tier
@pytest.mark.parametrize("R", [8, 16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize(
    "design, dtype, forward_launches, backward_launches",
    [("fused", torch.float32, 1, 2), ("split", torch.float32, 2, 3), ("hybrid", torch.bfloat16, 2, 3)],
)
def test_launch_counts_and_nothing_but_allocations_between(design, dtype, forward_launches, backward_launches, p, R):
    """Forward ≤ 1 launch fused (without dropout) / 2 split / 2 + cuBLAS's hybrid; backward with dx, dA, dB and
    dbias ≤ 2 fused / 3 split / 3 + cuBLAS's hybrid, split-sum and casts included. A stray torch op (a .sum, a .to,
    a .contiguous) between launches fails the op check; the hybrid design's one op between them is cuBLAS's addmm_
    per pass, and the fused backward's, at a rank that is not a multiple of 16, the copy of B padded to it."""
    x, weight, bias, A, B, g = (t.to(dtype) for t in _inputs(R=R))
    if design == "fused" and p > 0:
        forward_launches = 2  # the fused forward does not draw the mask: it runs split (kernels.designs)
    allowed = ALLOWED_OPS | ({"aten.addmm_.default"} if design == "hybrid" else set())
    with count_launches() as (launches, ops):
        _, h = launch_lora_forward(x, weight, bias, A, B, 0.5, p, KEY, design=design, input_precision="ieee")
    assert len(launches) == forward_launches, launches
    assert set(ops) <= allowed, sorted(set(ops) - allowed)
    assert ops.count("aten.addmm_.default") == (design == "hybrid")
    with count_launches() as (launches, ops):
        launch_lora_backward(g, x, weight, A, B, h, 0.5, p, KEY, need_dbias=True, design=design, input_precision="ieee")
    assert len(launches) == backward_launches, launches
    padded = design == "fused" and R % 16 != 0
    assert set(ops) <= allowed | ({"aten.constant_pad_nd.default"} if padded else set()), sorted(set(ops) - allowed)
    assert ops.count("aten.addmm_.default") == (design == "hybrid")
    assert ops.count("aten.constant_pad_nd.default") == padded


@cpu_tier
def test_backward_without_dx_launches_at_most_three():
    """x frozen (the first LoRA layer of a model): u, the partials and the split-sum, nothing else."""
    x, weight, bias, A, B, g = _inputs()
    _, h = launch_lora_forward(x, weight, bias, A, B, 0.5, 0.1, KEY, input_precision="ieee")
    with count_launches() as (launches, ops):
        dx, dA, dB, dbias = launch_lora_backward(
            g, x, weight, A, B, h, 0.5, 0.1, KEY, need_dx=False, input_precision="ieee"
        )
    assert dx is None and dA is not None and dB is not None and dbias is None
    assert len(launches) <= 3, launches
    assert set(ops) <= ALLOWED_OPS, sorted(set(ops) - ALLOWED_OPS)


class _FakeKernel:
    """Stands in for a Triton kernel: refuses (OutOfResources) every configuration with BLOCK_M above ``limit``."""

    def __init__(self, limit):
        self.limit, self.tried, self.__name__ = limit, [], "fake"

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.tried.append(kwargs["BLOCK_M"])
            if kwargs["BLOCK_M"] > self.limit:
                raise configs.OutOfResources(kwargs["BLOCK_M"] * 1024, self.limit * 1024, "shared memory")

        return run


def test_pruner_skips_what_does_not_fit_and_remembers_the_choice(monkeypatch):
    monkeypatch.setattr(configs, "_CHOSEN", {})
    candidates = [configs.cfg(BLOCK_M=b) for b in (256, 128, 64)]
    kernel = _FakeKernel(limit=128)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        assert configs.launch(kernel, lambda c: (1,), (), {}, candidates)["BLOCK_M"] == 128
    assert configs.launch(kernel, lambda c: (1,), (), {}, candidates)["BLOCK_M"] == 128
    assert kernel.tried == [256, 128, 128]  # the second call starts at the configuration that loaded
    with pytest.raises(RuntimeError, match="no configuration fits"):
        configs.launch(_FakeKernel(limit=32), lambda c: (1,), (), {}, candidates)


def test_fallback_tile_warns_once_naming_gpu_kernel_and_shape(monkeypatch):
    """A launch that runs on a later candidate than its first (the table has no tile sized for this GPU) says so once
    per kernel and shape, naming the GPU, the kernel, the shape and both tiles; a launch on its first says nothing."""
    monkeypatch.setattr(configs, "_CHOSEN", {})
    candidates = [configs.cfg(BLOCK_M=b) for b in (256, 128, 64)]
    info = configs.DeviceInfo(170, (12, 0), "NVIDIA GeForce RTX 5090")
    kernel = _FakeKernel(limit=128)
    with pytest.warns(RuntimeWarning) as caught:
        configs.launch(kernel, lambda c: (1,), (), {}, candidates, info, "M=8192 N=2304 K=768 R=16")
    (warning,) = caught
    for part in ("fake", "NVIDIA GeForce RTX 5090", "12.0", "M=8192 N=2304 K=768 R=16", "256 w4 s2", "128 w4 s2"):
        assert part in str(warning.message), part
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        configs.launch(kernel, lambda c: (1,), (), {}, candidates, info, "M=8192 N=2304 K=768 R=16")  # once only
        configs.launch(_FakeKernel(limit=256), lambda c: (1,), (), {}, candidates, info, "M=1")  # first fits


GPUS = [None, configs.DeviceInfo(108, (8, 0)), configs.DeviceInfo(84, (8, 6)), configs.DeviceInfo(142, (8, 9)),
        configs.DeviceInfo(148, (10, 0)), configs.DeviceInfo(170, (12, 0))]  # fmt: skip


def test_every_candidate_list_ends_with_the_fallback(monkeypatch):
    """On every GPU class each GEMM list ends with the small tile that fits everywhere (the compile tier checks it
    does), after the class's own tiles."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    dtypes = [(torch.bfloat16, torch.bfloat16, "tf32"), (torch.bfloat16, torch.float32, "ieee")]
    dtypes += [(torch.float32, torch.float32, "tf32"), (torch.float32, torch.float32, "ieee")]
    for base, lora, prec in dtypes:
        for fused in (False, True):
            for dropout in (False, True):
                for info in GPUS:
                    for lists, fallback in (
                        (
                            configs.forward_configs(base, lora, prec, fused, 16, info, 8192, 2304),
                            configs._FALLBACK_GEMM,
                        ),
                        (
                            configs.dx_configs(base, lora, prec, fused, dropout, 16, info, 8192, 768),
                            configs._FALLBACK_DX,
                        ),
                    ):
                        assert len(lists) >= 2 and lists[-1] == fallback


def test_tile_tables_per_gpu_class():
    """Shared memory differs (sm_80 163 KB, sm_86/89/120 99 KB, sm_90/100 227 KB): each capability maps to its class,
    and the 99 KB class never gets the 128×256 tile that needs 150 KB (what every GEMM fell back from on sm_120)."""
    assert [tiles.gpu_class(c) for c in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (7, 5))] == [
        "sm80", "sm86", "sm86", "sm90", "sm100", "sm86", "sm86"
    ]  # fmt: skip
    small = [t for f in (False, True) for t in tiles.forward_tiles("sm86", "16", "16", f)]
    assert all(t["BLOCK_M"] * t["BLOCK_N"] <= 128 * 128 for t in small)
    assert tiles.forward_tiles("sm90", "16", "16", True)[0]["BLOCK_N"] == 256


def test_tiles_by_wave_count(monkeypatch):
    """On 132 SMs the 768-wide dx of 8192 tokens in 128×256 tiles is 192 CTAs, 1.45 waves (the last wave 45%
    full): 128×128 (384 CTAs, 2.91 waves) comes first; at 4096 wide the 128×256 tile's 7.76 waves stay first."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    h100 = configs.H100
    assert tiles.waves(8192, 768, 128, 256, 132) == (192, 192 / 132)
    narrow = configs.dx_configs(torch.bfloat16, torch.bfloat16, "tf32", True, False, 16, h100, 8192, 768)
    wide = configs.dx_configs(torch.bfloat16, torch.bfloat16, "tf32", True, False, 16, h100, 8192, 4096)
    assert (narrow[0]["BLOCK_M"], narrow[0]["BLOCK_K"]) == (128, 128)
    assert (wide[0]["BLOCK_M"], wide[0]["BLOCK_K"]) == (128, 256)
    assert {str(c) for c in narrow} == {str(c) for c in wide}  # the same tiles, another order


def test_auto_design_is_the_lowest_prediction():
    """auto takes, per pass, the design the cost model predicts fastest (fused, split or hybrid; hybrid only where
    cuBLAS computes the base product as the Triton GEMM would) and "hybrid" asked for where it cannot run is split."""
    bf16 = (torch.bfloat16, "tf32")
    for K, N, R, p in designs.HEADLINE:
        s = cost.Shape(8192, N, K, R, p)
        for choose, plan in ((forward_design, cost.forward_plan), (backward_design, cost.backward_plan)):
            runnable = [d for d in designs.DESIGNS if not (choose is forward_design and d == "fused" and p > 0)]
            times = {d: cost.total_seconds(plan(s, d)) for d in runnable}
            assert choose("auto", 8192, N, K, R, p, *bf16) == min(times, key=times.get)
            no_hybrid = choose("auto", 8192, N, K, R, p, *bf16, hybrid=False)
            assert no_hybrid == min((d for d in runnable if d != "hybrid"), key=times.get)
    shape = (8192, 2304, 768)
    assert forward_design("auto", *shape, 16, 0.1, *bf16) != "fused"  # the mask would be drawn once per N tile
    assert backward_design("auto", *shape, 128, 0.1, *bf16) != "fused"  # u and dB repeated per K tile at R = 128
    assert forward_design("hybrid", *shape, 16, 0.0, torch.float32, "ieee", hybrid=False) == "split"
    with pytest.raises(ValueError, match="design must be"):
        forward_design("fastest", *shape, 16, 0.0, *bf16)


def test_measured_design_table_overrides_the_model(tmp_path, monkeypatch):
    """LORA_FAST_DESIGNS=file.json (bench/device_check.sh writes it): its rows decide for their shapes on the GPU
    they were measured on (nearest M); another GPU's table, or a corrupt one, is refused naming the file."""
    path = tmp_path / "designs.json"
    rows = [dict(K=768, N=2304, R=16, p=0.1, dtype="bf16", M=8192, forward="hybrid", backward="split"),
            dict(K=768, N=2304, R=16, p=0.1, dtype="bf16", M=512, forward="split", backward="hybrid")]  # fmt: skip
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "rows": rows}))
    monkeypatch.setenv(designs.TABLE_ENV, str(path))
    bf16 = (torch.bfloat16, "tf32")
    gpu = dict(device="NVIDIA H100 80GB HBM3")
    assert forward_design("auto", 8192, 2304, 768, 16, 0.1, *bf16, **gpu) == "hybrid"
    assert backward_design("auto", 6000, 2304, 768, 16, 0.2, *bf16, **gpu) == "split"
    assert backward_design("auto", 256, 2304, 768, 16, 0.1, *bf16, **gpu) == "hybrid"
    model = backward_design("auto", 8192, 2304, 768, 16, 0.0, *bf16)  # no row for p = 0: the model decides
    assert backward_design("auto", 8192, 2304, 768, 16, 0.0, *bf16, **gpu) == model
    assert forward_design("split", 8192, 2304, 768, 16, 0.1, *bf16, **gpu) == "split"  # a forced design stays
    with pytest.raises(ValueError, match=r"designs.json was measured on NVIDIA H100 80GB HBM3, but this GPU is A100"):
        forward_design("auto", 8192, 2304, 768, 16, 0.1, *bf16, device="A100")
    path.write_text('{"device": "NVIDIA H100 80GB HBM3", "rows": [{"K": 768}')
    with pytest.raises(ValueError, match=r"LORA_FAST_DESIGNS=.*designs.json: not a design table"):
        forward_design("auto", 8192, 2304, 768, 16, 0.1, *bf16, **gpu)


def test_estimate_table_prints_without_a_runpy_warning():
    """``python -m lora_fast.kernels`` prints the estimate table docs/KERNELS.md quotes; run as the module that the
    package itself imports (kernels.designs), runpy warned of a second copy."""
    proc = subprocess.run(
        [sys.executable, "-m", "lora_fast.kernels"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("H100 SXM, bf16, M = 8192") and "Per launch of `auto`:" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------- int32 offsets

PARTIALS = ("part_a_ptr", "part_b_ptr", "part_bias_ptr")


def _captured(run) -> list[tuple[str, dict]]:
    """``run()`` with every launch handed to a hook instead of running (meta tensors: nothing is allocated, so shapes
    past 2³¹ elements cost nothing): per launch, the kernel's name and its arguments by parameter name."""
    launches = []

    def hook(kernel, grid, arguments, constexprs, candidates):
        config = candidates[0]
        launches.append((kernel.__name__, dict(zip(kernel.arg_names, arguments(config), strict=False), **constexprs)))
        return config

    with configs.capture_launches(hook, configs.DeviceInfo(132, (9, 0))):
        run()
    return launches


def _meta_backward(M, N, K, R, design="fused", layout="conv1d"):
    """``lora_backward`` on meta tensors (bf16, every gradient), ready to run inside :func:`_captured`."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, g = torch.empty(M, K, **meta), torch.empty(M, N, **meta)
    weight = torch.empty(K, N, **meta).t() if layout == "conv1d" else torch.empty(N, K, **meta)
    A, B = torch.empty(R, K, **meta), torch.empty(N, R, **meta)
    h = torch.empty(M, R, device="meta", dtype=torch.float32)
    key = torch.empty(2, device="meta", dtype=torch.int64)
    return lambda: launch_lora_backward(g, x, weight, A, B, h, 0.5, 0.1, key, need_dbias=True, design=design)


def _largest_partial(launches) -> int:
    return max(args[name].numel() for _, args in launches for name in PARTIALS if name in args)


def test_fused_backward_hands_over_to_split_where_partials_pass_int32():
    """One fp32 partial per row block: 2²² tokens of a 4096→4096 layer at R = 16 make dB's partials (S, N, R) 2³²
    elements, which the kernels index in int32. The split design's few row splits run instead; 2¹⁶ tokens stay fused."""
    launches = _captured(_meta_backward(2**16, 4096, 4096, 16))
    assert [name for name, _ in launches] == ["_lora_dx_kernel", "_lora_finalize_kernel"]
    launches = _captured(_meta_backward(2**22, 4096, 4096, 16))
    assert [name for name, _ in launches] == ["_lora_skinny_kernel", "_lora_reduce_kernel", "_lora_dx_kernel"]
    assert not launches[-1][1]["FUSE_U"]
    assert _largest_partial(launches) < 2**31


def test_operands_past_int32_offsets_are_refused_by_name():
    """A 16384 → 262144 projection (W holds 2³² elements): the dx GEMM reads W's rows at int32 offsets
    n · stride_wn, the forward reads the Conv1D view's columns at k · stride_wk."""
    with pytest.raises(ValueError, match=r"weight of shape \(262144, 16384\) .* int32"):
        _captured(_meta_backward(64, 262144, 16384, 16, layout="linear"))
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, weight = torch.empty(64, 16384, **meta), torch.empty(16384, 262144, **meta).t()
    A, B = torch.empty(16, 16384, **meta), torch.empty(262144, 16, **meta)
    with pytest.raises(ValueError, match=r"weight of shape \(262144, 16384\) and strides \(1, 262144\)"):
        _captured(lambda: launch_lora_forward(x, weight, None, A, B, 0.5))


@cpu_tier
def test_int32_limit_picks_the_path_caps_the_splits_and_refuses(monkeypatch):
    """The same guard at a small limit (interpreter tiles: BLOCK_M 32 for dx, 16 for the reduction). M = 40, N = 72,
    R = 8: one partial of dB is N·R = 576 elements, the largest operand offset (B's) 575."""
    monkeypatch.setattr(configs, "INT32_LIMIT", 1153)  # two partials fit, not three
    launches = _captured(_meta_backward(40, 72, 48, 8))  # fused would keep cdiv(40, 32) = 2 partials: fits
    assert [name for name, _ in launches] == ["_lora_dx_kernel", "_lora_finalize_kernel"]
    launches = _captured(_meta_backward(40, 72, 48, 8, design="split"))  # three splits of 16 rows would not
    reduce = dict(launches)["_lora_reduce_kernel"]
    assert reduce["part_b_ptr"].shape == (2, 72, 8) and reduce["rows_per_split"] == 32
    monkeypatch.setattr(configs, "INT32_LIMIT", 1000)  # one partial fits: the fused design's two do not
    launches = _captured(_meta_backward(40, 72, 48, 8))
    assert [name for name, _ in launches] == ["_lora_skinny_kernel", "_lora_reduce_kernel", "_lora_dx_kernel"]
    assert _largest_partial(launches) == 576
    monkeypatch.setattr(configs, "INT32_LIMIT", 576)  # not even one
    with pytest.raises(ValueError, match=r"dB \(S, N, R\) = \(1, 72, 8\).* past int32.*at most 0 partials"):
        _captured(_meta_backward(40, 72, 48, 8))
    monkeypatch.setattr(configs, "INT32_LIMIT", 575)  # B itself
    with pytest.raises(ValueError, match=r"lora_B of shape \(72, 8\) and strides \(8, 1\) needs offsets up to 575"):
        _captured(_meta_backward(40, 72, 48, 8))
