"""The triton backend against the spec (:mod:`lora_fast.reference`, fp64 on upcast copies of the same inputs).

Two tiers. The CPU tier runs the kernels under ``TRITON_INTERPRET=1`` (set by conftest) at small, odd shapes. What it
cannot check, the CUDA tier (``-m cuda``, skipped visibly without a GPU) does at realistic sizes: the real bf16
``tl.dot`` (the interpreter widens bf16 tiles to fp32 before its dot, triton #11584, so on CPU bf16 covers the
roundings of loads and stores but not the tensor-core product), TF32 for fp32, the pinned GPU tile shapes, compiled
(not interpreted) dropout, and int64 offsets past 2³¹ elements.
"""

import os

import pytest
import torch

from lora_fast import lora_linear, reference
from lora_fast.kernels import configs
from lora_fast.kernels.dropout import dropout_key, lora_dropout_mask
from lora_fast.kernels.lora_backward import launch_lora_backward
from lora_fast.kernels.lora_forward import launch_lora_forward
from lora_fast.kernels.utils import interpreting
from lora_fast.triton_backend import config
from tests.helpers import requires_cuda

# Relative error by norm, ‖got − ref‖ / ‖ref‖, per compute dtype. fp32 with "ieee" dots is exact up to summation
# order; fp16/bf16 are a few units of their epsilon (2⁻¹¹, 2⁻⁸) after the roundings of y, h and the LoRA dot inputs.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TOL_TF32 = 2e-3  # CUDA tier, fp32 with the default TF32 dots

cpu_tier = pytest.mark.skipif(not interpreting(), reason="CPU tier: runs only under TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _ieee_fused(monkeypatch):
    """Exact fp32 dots and the fused design unless a test says otherwise ("hybrid" runs as "split" where the base
    product is not 16-bit: kernels.designs)."""
    monkeypatch.setattr(config, "fp32_precision", "ieee")
    monkeypatch.setattr(config, "design", "fused")


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _make(M, K, N, R, dtype, bias, layout, contiguous, device, lora_dtype=None, lead=()):
    """Fresh random inputs (never zeros). Conv1D layout: the weight is stored (K, N) and passed as ``.t()``."""
    gen = torch.Generator().manual_seed(M * 1000 + K * 10 + N + R)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    lora_dtype = lora_dtype or dtype
    if contiguous:
        x = rnd(*lead, M, K)
    else:  # every other column of a wider buffer: a strided 2-D view the kernels read as is
        x = rnd(*lead, M, 2 * K)[..., ::2]
    w_store = rnd(K, N) if layout == "conv1d" else rnd(N, K)
    x = x.to(device=device, dtype=dtype).requires_grad_()
    w_store = (w_store / K**0.5).to(device=device, dtype=dtype)
    weight = w_store.t() if layout == "conv1d" else w_store
    b = (rnd(N).to(device=device, dtype=dtype).requires_grad_()) if bias else None
    A = (rnd(R, K) / K**0.5).to(device=device, dtype=lora_dtype).requires_grad_()
    B = rnd(N, R).to(device=device, dtype=lora_dtype).requires_grad_()
    return x, weight, b, A, B


def _check_against_reference(
    M, K, N, R, dtype, bias, layout, contiguous, p, design, device, lora_dtype=None, tol=None, lead=()
):
    config.design = design
    x, weight, b, A, B = _make(M, K, N, R, dtype, bias, layout, contiguous, device, lora_dtype, lead)
    s, seed = 0.75, 1234
    y = lora_linear(x, weight, b, A, B, s, dropout_p=p, seed=seed, backend="triton")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(device=device, dtype=y.dtype)
    y.backward(g)

    d = lambda t: None if t is None else t.detach().double()
    mask = None
    if p > 0:
        mask = lora_dropout_mask(x.numel() // K, K, p, dropout_key(device, seed)).reshape(x.shape).double()
    x64 = d(x).requires_grad_()
    A64, B64 = d(A).requires_grad_(), d(B).requires_grad_()
    b64 = d(b).requires_grad_() if bias else None
    y_ref, _ = reference.lora_forward(x64, d(weight), b64, A64, B64, s, mask)
    dx_ref, dA_ref, dB_ref = reference.lora_backward(
        g.double(), x64.detach(), d(weight), A64.detach(), B64.detach(), s, mask
    )
    tol = tol or TOL[dtype]
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    assert x.grad.dtype == x.dtype and A.grad.dtype == A.dtype and B.grad.dtype == B.dtype
    assert _rel(y, y_ref) <= tol, f"y: {_rel(y, y_ref)}"
    assert _rel(x.grad, dx_ref) <= tol, f"dx: {_rel(x.grad, dx_ref)}"
    assert _rel(A.grad, dA_ref) <= tol, f"dA: {_rel(A.grad, dA_ref)}"
    assert _rel(B.grad, dB_ref) <= tol, f"dB: {_rel(B.grad, dB_ref)}"
    if bias:
        db_ref = g.double().reshape(-1, N).sum(0)
        assert _rel(b.grad, db_ref) <= tol, f"dbias: {_rel(b.grad, db_ref)}"


# ---------------------------------------------------------------- CPU tier: forward and every gradient

# A pruned cross-product: every value of every axis appears, odd sizes throughout.
#        M   K    N    R    dtype           bias   layout     contig  p     design
CASES = [
    (1, 48, 130, 1, torch.float32, True, "linear", True, 0.0, "fused"),
    (7, 130, 5, 8, torch.float32, False, "conv1d", False, 0.1, "fused"),
    (33, 5, 48, 16, torch.float32, True, "linear", False, 0.0, "split"),
    (33, 130, 130, 33, torch.float32, True, "conv1d", True, 0.3, "split"),
    (7, 48, 48, 128, torch.float32, False, "conv1d", True, 0.0, "fused"),  # square: orientation must be right
    (33, 130, 48, 32, torch.float32, True, "linear", True, 0.1, "fused"),  # dbias beside dB in one 64-wide product
    (33, 48, 130, 64, torch.bfloat16, True, "linear", True, 0.1, "fused"),  # dbias: the g tile's column sums
    (7, 130, 48, 128, torch.float32, True, "conv1d", True, 0.0, "fused"),  # the same past the 64-wide product
    (33, 48, 130, 16, torch.bfloat16, True, "linear", True, 0.1, "fused"),
    (7, 130, 48, 8, torch.bfloat16, False, "conv1d", False, 0.0, "split"),
    (33, 130, 5, 33, torch.float16, True, "linear", False, 0.2, "fused"),
    (1, 5, 48, 128, torch.float16, False, "conv1d", True, 0.0, "split"),
    (33, 48, 130, 16, torch.bfloat16, True, "linear", True, 0.1, "hybrid"),
    (7, 130, 48, 8, torch.float16, False, "conv1d", False, 0.2, "hybrid"),
    (7, 130, 48, 33, torch.float32, True, "conv1d", True, 0.1, "hybrid"),  # fp32: runs split
]


@cpu_tier
@pytest.mark.parametrize("M,K,N,R,dtype,bias,layout,contiguous,p,design", CASES)
def test_matches_reference(M, K, N, R, dtype, bias, layout, contiguous, p, design):
    _check_against_reference(M, K, N, R, dtype, bias, layout, contiguous, p, design, "cpu")


@cpu_tier
def test_leading_dims_and_mixed_precision():
    """x (2, 3, K) in bf16 with fp32 LoRA masters: LoRA branch in fp32, dA/dB back in fp32, dx in bf16."""
    _check_against_reference(
        3, 48, 40, 8, torch.bfloat16, True, "linear", True, 0.1, "fused", "cpu", lora_dtype=torch.float32, lead=(2,)
    )


@cpu_tier
def test_autocast_dtypes_match_torch_backend():
    """Under bf16 autocast with fp32 tensors: y in bf16 like nn.Linear, dx/dA/dB in the tensors' fp32."""
    x, weight, b, A, B = _make(9, 48, 40, 8, torch.float32, True, "linear", True, "cpu")
    outs = {}
    for backend in ("torch", "triton"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lora_linear(x, weight, b, A, B, 0.5, backend=backend)
        y.float().square().sum().backward()
        outs[backend] = (y.detach(), x.grad, A.grad, B.grad)
        x.grad = A.grad = B.grad = b.grad = None
    for got, ref in zip(outs["triton"], outs["torch"], strict=True):
        assert got.dtype == ref.dtype
        assert _rel(got, ref) <= 1e-2


@cpu_tier
@pytest.mark.parametrize(
    "design, dtype", [("fused", torch.float32), ("split", torch.float32), ("hybrid", torch.bfloat16)]
)
def test_launchers_write_every_element(design, dtype):
    """Outputs poisoned with NaN before the launch: any element the kernels (or cuBLAS, hybrid) skip stays NaN."""
    M, K, N, R, s = 33, 130, 48, 8, 0.5
    x, weight, b, A, B = (
        t.detach() if t is not None else t for t in _make(M, K, N, R, dtype, True, "linear", True, "cpu")
    )
    y = torch.full((M, N), float("nan"), dtype=dtype)
    h = torch.full((M, R), float("nan"))
    key = dropout_key("cpu", 99)
    launch_lora_forward(x, weight, b, A, B, s, 0.2, key, design=design, input_precision="ieee", out=y, h_s_out=h)
    mask = lora_dropout_mask(M, K, 0.2, key).double()
    d = lambda t: t.double()  # noqa: E731
    y_ref, h_ref = reference.lora_forward(d(x), d(weight), d(b), d(A), d(B), s, mask)
    g = torch.randn(M, N).to(dtype)
    dx = torch.full((M, K), float("nan"), dtype=dtype)
    _, dA, dB, dbias = launch_lora_backward(
        g, x, weight, A, B, h, s, 0.2, key, need_dbias=True, design=design, input_precision="ieee", dx_out=dx
    )
    dx_ref, dA_ref, dB_ref = reference.lora_backward(d(g), d(x), d(weight), d(A), d(B), s, mask)
    pairs = ((y, y_ref), (h, s * h_ref), (dx, dx_ref), (dA, dA_ref), (dB, dB_ref), (dbias, d(g).sum(0)))
    for got, ref in pairs:  # h_s: the scaling folded in
        assert torch.isfinite(got).all()
        assert _rel(got, ref) <= TOL[dtype]


@cpu_tier
@pytest.mark.parametrize("R", [5, 16])
def test_fused_backward_reads_any_layout_of_B(R):
    """The fused dx reads B in whole padded rows: a B of R columns (padded to 16 in a copy) or a transposed view
    (made contiguous) gives the bits a contiguous B gives, right against the reference, and B is left as it was."""
    x, weight, _, A, B = (
        t if t is None else t.detach() for t in _make(33, 48, 40, R, torch.float32, False, "linear", True, "cpu")
    )
    key, p = dropout_key("cpu", 11), 0.1
    _, h = launch_lora_forward(x, weight, None, A, B, 0.5, p, key, design="split", input_precision="ieee")
    g = torch.randn(33, 40, generator=torch.Generator().manual_seed(3))
    run = lambda b: launch_lora_backward(g, x, weight, A, b, h, 0.5, p, key, design="fused", input_precision="ieee")  # noqa: E731
    want = run(B.contiguous())
    transposed = B.t().contiguous().t()  # (N, R) with strides (1, N)
    kept = transposed.clone()
    for got, ref in zip(run(transposed), want, strict=True):
        assert (got is None and ref is None) or torch.equal(got, ref)
    assert torch.equal(transposed, kept) and transposed.stride() == (1, 40)
    mask = lora_dropout_mask(33, 48, p, key).double()
    refs = reference.lora_backward(g.double(), x.double(), weight.double(), A.double(), B.double(), 0.5, mask)
    for got, ref in zip(want[:3], refs, strict=True):
        assert _rel(got, ref) <= TOL[torch.float32]


@cpu_tier
def test_partial_gradients_skip_work_but_stay_right():
    """Only dA asked for (x and B frozen): u must still come from the skinny kernel; dx/dB stay None."""
    x, weight, _, A, B = _make(17, 48, 40, 8, torch.float32, False, "linear", True, "cpu")
    x.requires_grad_(False)
    B.requires_grad_(False)
    y = lora_linear(x, weight, None, A, B, 0.5, backend="triton")
    g = torch.randn(y.shape)
    y.backward(g)
    _, dA_ref, _ = reference.lora_backward(
        g.double(), x.double(), weight.double(), A.detach().double(), B.double(), 0.5
    )
    assert x.grad is None and B.grad is None
    assert _rel(A.grad, dA_ref) <= TOL[torch.float32]


@cpu_tier
def test_empty_batch_returns_without_launching():
    x, weight, b, A, B = _make(1, 48, 40, 8, torch.float32, True, "linear", True, "cpu")
    x0 = torch.randn(2, 0, 48, requires_grad=True)
    y = lora_linear(x0, weight, b, A, B, 0.5, backend="triton")
    assert y.shape == (2, 0, 40)
    y.sum().backward()
    assert x0.grad.shape == x0.shape
    assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))
    assert torch.equal(b.grad, torch.zeros_like(b))


@cpu_tier
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("design", ["fused", "split"])
def test_trainable_base_weight_and_bias_match_reference(layout, design):
    """W unfrozen by the user: dW = gᵀ x reaches the stored parameter (through Conv1D's .t() view); dbias from the
    kernels' partials. Both against the reference backend's autograd in fp64."""
    config.design = design
    x, weight, b, A, B = _make(9, 48, 40, 8, torch.float32, True, layout, True, "cpu")
    stored = (weight.t() if layout == "conv1d" else weight).detach().clone().requires_grad_()
    grads, g = {}, torch.randn(9, 40)
    for backend in ("triton", "reference"):
        d = (lambda t: t) if backend == "triton" else (lambda t: t.detach().double().requires_grad_())
        xs, ws, bs, As, Bs = d(x), d(stored), d(b), d(A), d(B)
        w = ws.t() if layout == "conv1d" else ws
        y = lora_linear(xs, w, bs, As, Bs, 0.5, dropout_p=0.0, backend=backend)
        y.backward(g.to(y.dtype))
        grads[backend] = (ws.grad, bs.grad, xs.grad)
    for got, ref in zip(grads["triton"], grads["reference"], strict=True):
        assert got is not None
        assert _rel(got, ref) <= TOL[torch.float32]


# ---------------------------------------------------------------- CPU tier: dropout and determinism


@cpu_tier
@pytest.mark.parametrize("p", [0.3, 0.999])
def test_dropout_mask_statistics_and_values(p):
    """Kept with the mask's real probability keep = (2¹⁶ - round(p·2¹⁶)) / 2¹⁶ and scaled by 1/keep, so E[mask] = 1
    (at p = 0.999, 1/(1-p) would be 1.0071× too large)."""
    mask = lora_dropout_mask(256, 257, p, dropout_key("cpu", 5))
    kept = (mask != 0).double().mean().item()
    keep = reference.keep_probability(p)
    # Binomial(n, keep): 6 standard deviations of the kept fraction.
    assert abs(kept - keep) <= 6 * ((keep * (1 - keep)) / mask.numel()) ** 0.5
    values = set(mask.unique().tolist())
    assert values == {0.0, torch.tensor(1 / keep, dtype=torch.float32).item()}
    assert torch.equal(mask, lora_dropout_mask(256, 257, p, dropout_key("cpu", 5)))
    other = lora_dropout_mask(256, 257, p, dropout_key("cpu", 6))
    # Independent masks disagree on a fraction 2·keep·(1 - keep); half of that is many deviations away.
    assert (other != mask).double().mean().item() > keep * (1 - keep)


@cpu_tier
def test_dropout_same_seed_same_results_different_seed_differs():
    x, weight, b, A, B = _make(9, 48, 40, 8, torch.float32, True, "linear", True, "cpu")

    def run(seed):
        y = lora_linear(x, weight, b, A, B, 0.5, dropout_p=0.5, seed=seed, backend="triton")
        y.square().sum().backward()
        out = (y.detach().clone(), x.grad.clone(), A.grad.clone(), B.grad.clone())
        x.grad = A.grad = B.grad = b.grad = None
        return out

    first, again, other = run(11), run(11), run(12)
    for a, b_ in zip(first, again, strict=True):
        assert torch.equal(a, b_)
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[2], other[2])


@cpu_tier
@pytest.mark.parametrize(
    "design, dtype", [("fused", torch.float32), ("split", torch.float32), ("hybrid", torch.bfloat16)]
)
def test_backward_is_bitwise_deterministic(design, dtype):
    """dA/dB/dbias sum fp32 partials over row blocks in a fixed order: two runs agree bitwise."""
    config.design = design
    x, weight, b, A, B = _make(40, 48, 40, 16, dtype, True, "conv1d", True, "cpu")
    g = torch.randn(40, 40).to(dtype)
    _assert_two_runs_bitwise_equal(x, weight, b, A, B, g)


def _assert_two_runs_bitwise_equal(x, weight, b, A, B, g):
    """Two backwards of one seeded call give the same dx, dA and dB bit for bit (fixed-order sums, no atomics)."""
    grads = []
    for _ in range(2):
        lora_linear(x, weight, b, A, B, 0.5, dropout_p=0.1, seed=3, backend="triton").backward(g)
        grads.append((x.grad.clone(), A.grad.clone(), B.grad.clone()))
        x.grad = A.grad = B.grad = b.grad = None
    for a, b_ in zip(*grads, strict=True):
        assert torch.equal(a, b_)


# ---------------------------------------------------------------- CPU tier: errors, torch.library, torch.compile


@cpu_tier
def test_clear_errors_before_launch(monkeypatch):
    x, weight, b, A, B = _make(4, 48, 40, 8, torch.float32, True, "linear", True, "cpu")
    with pytest.raises(ValueError, match="conv1d.weight.t"):
        lora_linear(x, weight.t(), b, A, B, 0.5, 0.0, seed=None, backend="triton")  # Conv1D weight passed without .t()
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        lora_linear(x, weight, b, A[:0], B[:, :0], 0.5, 0.0, seed=None, backend="triton")
    with pytest.raises(ValueError, match="lora_B must be"):
        lora_linear(x, weight, b, A, B[:, :4], 0.5, 0.0, seed=None, backend="triton")
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        lora_linear(x.double(), weight.double(), b.double(), A, B, 0.5, 0.0, seed=None, backend="triton")
    with pytest.raises(ValueError, match=r"seed must be None \(drawn from torch's generator\) or an integer.*got 1.5"):
        lora_linear(x, weight, b, A, B, 0.5, 0.1, seed=1.5, backend="triton")
    monkeypatch.setattr(config, "fp32_precision", "tf64")
    with pytest.raises(ValueError, match="fp32_precision"):
        lora_linear(x, weight, b, A, B, 0.5, 0.0, seed=None, backend="triton")
    monkeypatch.setattr(config, "fp32_precision", "ieee")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lora_linear(x, weight, b, A, B, 0.5, 0.0, seed=None, backend="triton")


@cpu_tier
def test_fp32_precision_follows_torch(monkeypatch):
    """config "auto": the kernels get torch's own fp32 matmul precision at each call ("highest" -> exact "ieee",
    "high"/"medium" -> "tf32", the newer per-backend setting too); "tf32" or "ieee" force one."""
    from lora_fast import triton_backend

    x, weight, b, A, B = _make(4, 48, 40, 8, torch.float32, True, "linear", True, "cpu")
    seen = []
    monkeypatch.setattr(
        triton_backend._TritonLoRAFunction, "apply", lambda *args: seen.append(args[-2])
    )  # (..., prec, packed)
    monkeypatch.setattr(config, "fp32_precision", "auto")
    saved = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision
    try:
        for setting, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32"), ("highest", "ieee")):
            torch.set_float32_matmul_precision(setting)
            lora_linear(x, weight, b, A, B, 0.5, 0.0, seed=None, backend="triton")
            assert seen[-1] == want, setting
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # torch.get_float32_matmul_precision() raises now
        lora_linear(x, weight, b, A, B, 0.5, 0.0, seed=None, backend="triton")
        assert seen[-1] == "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        for forced in ("tf32", "ieee"):
            monkeypatch.setattr(config, "fp32_precision", forced)
            lora_linear(x, weight, b, A, B, 0.5, 0.0, seed=None, backend="triton")
            assert seen[-1] == forced
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.fp32_precision = saved[1]
    assert torch.get_float32_matmul_precision() == saved[0]


@cpu_tier
def test_inputs_checked_once_per_call(monkeypatch):
    """lora_linear checks the shared conditions once and the triton ones once, then runs the backend unchecked; a
    LoRALinear checks its input tensors once per call and its numbers only when they are set."""
    from lora_fast import checks, functional, layers, triton_backend

    x, weight, b, A, B = _make(4, 48, 40, 8, torch.float32, True, "linear", True, "cpu")
    calls = []

    def counted(name, check):
        return lambda *args: (calls.append(name), check(*args))[1]

    monkeypatch.setattr(functional, "check_lora_inputs", counted("lora", functional.check_lora_inputs))
    monkeypatch.setattr(triton_backend, "check_supported", counted("triton", triton_backend.check_supported))
    monkeypatch.setattr(checks, "dropout_threshold", counted("p", checks.dropout_threshold))
    monkeypatch.setattr(triton_backend._TritonLoRAFunction, "apply", lambda *args: None)
    lora_linear(x, weight, b, A, B, 0.5, dropout_p=0.1, seed=3, backend="triton")
    assert sorted(calls) == ["lora", "p", "triton"]
    calls.clear()
    monkeypatch.setattr(layers, "check_lora_tensors", counted("tensors", layers.check_lora_tensors))
    layer = layers.LoRALinear(torch.nn.Linear(48, 40), r=8, alpha=16, dropout=0.1, backend="triton")
    assert calls == ["p"]  # the dropout probability, checked once when the layer is built
    calls.clear()
    layer(x)
    layer(x)
    assert calls == ["tensors", "triton", "tensors", "triton"]
    with pytest.raises(ValueError, match="LoRA dropout must be in"):
        layer.dropout = 1.5  # a new value is checked when set
    assert layer.dropout == 0.1


@cpu_tier
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) impls against the real kernels, and AOT dispatch, by torch.library.opcheck."""
    x, weight, b, A, B = (t.detach() for t in _make(6, 48, 40, 8, torch.float32, True, "conv1d", True, "cpu"))
    key = dropout_key("cpu", 3)
    fwd_args = (x, weight, b, A, B, 0.5, 0.1, key, torch.float32, torch.float32, "fused", "ieee")
    torch.library.opcheck(torch.ops.lora_fast.triton_lora_forward.default, fwd_args)
    _, h = torch.ops.lora_fast.triton_lora_forward(*fwd_args)
    g = torch.randn(6, 40)
    for design, needs in (("fused", (True, True, False, True)), ("split", (False, True, True, True))):
        bwd_args = (g, x, weight, A, B, h, 0.5, 0.1, key, torch.float32, torch.float32, torch.float32, design, "ieee")
        torch.library.opcheck(torch.ops.lora_fast.triton_lora_backward.default, (*bwd_args, *needs))
        dx, dA, dB, dbias = torch.ops.lora_fast.triton_lora_backward(*bwd_args, *needs)
        assert [t.numel() > 0 for t in (dx, dA, dB, dbias)] == list(needs)


@cpu_tier
def test_torch_compile_traces_without_graph_break():
    """fullgraph=True raises on any graph break; the compiled result must equal eager bitwise (same kernels)."""
    x, weight, b, A, B = _make(5, 48, 40, 8, torch.float32, True, "conv1d", True, "cpu")

    def f(x, weight, b, A, B):
        return lora_linear(x, weight, b, A, B, 0.5, dropout_p=0.1, seed=21, backend="triton").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    eager_loss = f(x, weight, b, A, B)
    eager_loss.backward()
    eager = (eager_loss.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone())
    x.grad = A.grad = B.grad = b.grad = None
    loss = compiled(x, weight, b, A, B)
    loss.backward()
    for got, ref in zip((loss.detach(), x.grad, A.grad, B.grad), eager, strict=True):
        assert torch.equal(got, ref)


# ---------------------------------------------------------------- CUDA tier: the same checks at realistic sizes

CUDA_CASES = [
    (4096, 768, 2304, 16, torch.bfloat16, True, "conv1d", True, 0.1, "fused"),
    (4096, 768, 2304, 16, torch.bfloat16, True, "conv1d", True, 0.1, "split"),
    (4096, 768, 768, 128, torch.bfloat16, True, "conv1d", True, 0.0, "fused"),
    (2048, 3072, 768, 8, torch.float16, True, "linear", False, 0.1, "fused"),
    (1000, 1000, 1000, 33, torch.bfloat16, False, "linear", True, 0.0, "split"),
    (1, 768, 3072, 16, torch.bfloat16, True, "conv1d", True, 0.1, "fused"),
    (2048, 768, 768, 16, torch.float32, True, "conv1d", True, 0.1, "fused"),
    (4096, 768, 2304, 16, torch.bfloat16, True, "conv1d", True, 0.1, "hybrid"),
]
# LORA_FAST_CUDA_QUICK=1 (bench/device_check.sh): the cases that compile distinct kernels for the headline dtypes,
# so one device check stays within its time; odd shapes, fp16 and M = 1 run in the full tier.
if os.environ.get("LORA_FAST_CUDA_QUICK") == "1":
    CUDA_CASES = [CUDA_CASES[i] for i in (0, 1, 2, 6, 7)]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("M,K,N,R,dtype,bias,layout,contiguous,p,design", CUDA_CASES)
def test_matches_reference_cuda(M, K, N, R, dtype, bias, layout, contiguous, p, design):
    tol = TOL_TF32 if dtype == torch.float32 else TOL[dtype]
    config.fp32_precision = "tf32" if dtype == torch.float32 else "ieee"
    _check_against_reference(M, K, N, R, dtype, bias, layout, contiguous, p, design, "cuda", tol=tol)


@pytest.mark.cuda
@requires_cuda
def test_ieee_fp32_exact_cuda():
    _check_against_reference(512, 768, 768, 16, torch.float32, True, "conv1d", True, 0.1, "fused", "cuda")


@pytest.mark.cuda
@requires_cuda
def test_mixed_precision_and_determinism_cuda():
    _check_against_reference(
        1024,
        768,
        2304,
        16,
        torch.bfloat16,
        True,
        "conv1d",
        True,
        0.1,
        "fused",
        "cuda",
        lora_dtype=torch.float32,
        lead=(4,),
    )
    x, weight, b, A, B = _make(8192, 768, 768, 16, torch.bfloat16, True, "conv1d", True, "cuda")
    g = torch.randn(8192, 768, device="cuda", dtype=torch.bfloat16)
    _assert_two_runs_bitwise_equal(x, weight, b, A, B, g)


@pytest.mark.cuda
@requires_cuda
def test_dropout_statistics_cuda():
    p = 0.1
    mask = lora_dropout_mask(8192, 4096, p, dropout_key("cuda", 17))
    kept = (mask != 0).double().mean().item()
    assert abs(kept - (1 - p)) <= 6 * ((p * (1 - p)) / mask.numel()) ** 0.5


@pytest.mark.cuda
@requires_cuda
def test_int64_offsets_cuda():
    """M·K > 2³¹: the pointer and dropout offsets of the last rows overflow int32 unless they are int64."""
    M, K, N, R = (2**31) // 1024 + 64, 1024, 16, 16
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / 32
    A = torch.randn(R, K, device="cuda", dtype=torch.bfloat16) / 32
    B = torch.randn(N, R, device="cuda", dtype=torch.bfloat16)
    key = dropout_key("cuda", 9)
    y, _ = launch_lora_forward(x, weight, None, A, B, 0.5, 0.1, key)
    tail = slice(M - 128, M)
    mask = lora_dropout_mask(M, K, 0.1, key)[tail].double()
    y_ref, _ = reference.lora_forward(x[tail].double(), weight.double(), None, A.double(), B.double(), 0.5, mask)
    assert _rel(y[tail], y_ref) <= TOL[torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="CUDA tier: needs two CUDA devices")
def test_second_device_while_first_is_current_cuda():
    """Tensors on cuda:1 while cuda:0 is current: the ops launch on the tensors' device and stream, not the current
    one (whose kernels would read cuda:1's memory), forward and every gradient, both designs."""
    assert torch.cuda.current_device() == 0
    _check_against_reference(512, 768, 768, 16, torch.bfloat16, True, "conv1d", True, 0.0, "fused", "cuda:1")
    # With dropout (the reference's mask would itself launch on the current device): cuda:1 against cuda:0.
    config.design = "split"
    results = []
    for device in ("cuda:0", "cuda:1"):
        x, weight, b, A, B = _make(512, 768, 768, 16, torch.bfloat16, True, "linear", False, device)
        y = lora_linear(x, weight, b, A, B, 0.5, dropout_p=0.1, seed=11, backend="triton")
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=y.dtype))
        results.append([t.detach().cpu() for t in (y, x.grad, A.grad, B.grad, b.grad)])
    for got, ref in zip(*reversed(results), strict=True):
        assert _rel(got, ref) <= TOL[torch.bfloat16]
    assert torch.cuda.current_device() == 0


@pytest.mark.cuda
@requires_cuda
def test_without_dx_and_first_candidates_fit_cuda():
    """x frozen (split path without dx), then: every configuration chosen so far in this process was its list's
    first, as the offline compile tier predicts for this GPU (sm_90: nothing fell back to a smaller tile)."""
    x, weight, b, A, B = _make(2048, 768, 2304, 16, torch.bfloat16, True, "conv1d", True, "cuda")
    x.requires_grad_(False)
    y = lora_linear(x, weight, b, A, B, 0.5, dropout_p=0.1, seed=5, backend="triton")
    g = torch.randn_like(y)
    y.backward(g)
    mask = lora_dropout_mask(2048, 768, 0.1, dropout_key("cuda", 5)).double()
    d = lambda t: t.detach().double()  # noqa: E731
    _, dA_ref, dB_ref = reference.lora_backward(g.double(), d(x), d(weight), d(A), d(B), 0.5, mask)
    assert x.grad is None
    assert _rel(A.grad, dA_ref) <= TOL[torch.bfloat16] and _rel(B.grad, dB_ref) <= TOL[torch.bfloat16]
    if torch.cuda.get_device_capability() >= (9, 0):
        assert configs._CHOSEN and set(configs._CHOSEN.values()) == {0}, configs._CHOSEN
