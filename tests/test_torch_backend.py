"""The `reference` and `torch` backends of lora_linear against the spec (lora_fast.reference), in fp64."""

import pytest
import torch

from lora_fast import lora_linear, reference
from lora_fast.functional import seeded_dropout_mask, seeded_keep_mask


def _inputs(r, bias, layout, lead=(2, 3), k=7, n=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g, dtype=dtype, requires_grad=True)
    if layout == "conv1d":  # stored (K, N) like GPT-2's Conv1D, passed as a transposed view
        weight = torch.randn(k, n, generator=g, dtype=dtype).t()
    else:
        weight = torch.randn(n, k, generator=g, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=dtype, requires_grad=True) if bias else None
    lora_A = torch.randn(r, k, generator=g, dtype=dtype, requires_grad=True)
    lora_B = torch.randn(n, r, generator=g, dtype=dtype, requires_grad=True)
    return x, weight, b, lora_A, lora_B


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck(backend, r, bias, layout, dropout):
    x, weight, b, lora_A, lora_B = _inputs(r, bias, layout)
    args = (x, weight, b, lora_A, lora_B)

    def fn(x, weight, b, lora_A, lora_B):
        return lora_linear(x, weight, b, lora_A, lora_B, 1.7, dropout_p=dropout, seed=123, backend=backend)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_torch_backend_matches_spec(dropout, layout):
    x, weight, b, lora_A, lora_B = _inputs(16, True, layout, lead=(4, 9), k=12, n=10)
    s, seed = 0.5, 7
    # The multiplier in fp64 (the kernels keep 1/keep in fp32; in fp64 the backend uses it exactly).
    keep = seeded_keep_mask(tuple(x.shape), dropout, seed, x.device).double()
    mask = keep / reference.keep_probability(dropout) if dropout else None
    y = lora_linear(x, weight, b, lora_A, lora_B, s, dropout_p=dropout, seed=seed, backend="torch")
    y_ref, _ = reference.lora_forward(x, weight, b, lora_A, lora_B, s, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    dx, dA, dB = torch.autograd.grad(y, (x, lora_A, lora_B), g)
    dx_ref, dA_ref, dB_ref = reference.lora_backward(g, x, weight, lora_A, lora_B, s, mask)
    for got, want in ((dx, dx_ref), (dA, dA_ref), (dB, dB_ref)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_spec_backward_matches_autograd():
    x, weight, b, lora_A, lora_B = _inputs(8, True, "linear", lead=(6,), k=9, n=4)
    mask = reference.dropout_mask(tuple(x.shape), 0.4, torch.Generator().manual_seed(3), device="cpu")
    y, _ = reference.lora_forward(x, weight, b, lora_A, lora_B, 2.0, mask)
    g = torch.randn_like(y)
    got = reference.lora_backward(g, x, weight, lora_A, lora_B, 2.0, mask)
    want = torch.autograd.grad(y, (x, lora_A, lora_B), g)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w)


def test_dropout_is_deterministic_per_seed_and_varies_across_seeds():
    x, weight, b, lora_A, lora_B = _inputs(8, False, "linear", lead=(64,), k=32, n=16, dtype=torch.float32)
    runs = []
    for seed in (5, 5, 6):
        y = lora_linear(x, weight, b, lora_A, lora_B, 1.0, dropout_p=0.5, seed=seed, backend="torch")
        grads = torch.autograd.grad(y.square().sum(), (x, lora_A, lora_B))
        runs.append((y, *grads))
    for a, b_ in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a, b_)
    assert not torch.equal(runs[0][0], runs[2][0])


def test_dropout_kept_fraction():
    mask = seeded_dropout_mask((400, 500), 0.1, 11, torch.device("cpu"))
    kept = (mask > 0).float().mean().item()
    # 200,000 Bernoulli(0.9) draws: standard deviation 6.7e-4, so 5 sigma is 3.4e-3.
    assert abs(kept - 0.9) < 3.4e-3
    assert torch.allclose(mask[mask > 0], torch.tensor(1 / reference.keep_probability(0.1)))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dropout_near_one_scales_by_the_masks_keep_rate(backend):
    """p = 0.999: the mask keeps an element when 16 random bits are >= round(0.999 · 2¹⁶) = 65470, with probability
    66/65536, so kept elements are scaled by 65536/66 (E[mask] = 1), not by 1/(1-p) = 1000 (0.71% too much)."""
    p, seed, s = 0.999, 4, 0.5
    mask = seeded_dropout_mask((400, 500), p, 11, torch.device("cpu"))
    assert set(mask.unique().tolist()) == {0.0, torch.tensor(65536 / 66, dtype=torch.float32).item()}
    x, weight, b, lora_A, lora_B = _inputs(8, True, "linear", lead=(64,), k=64, n=6)
    multiplier = seeded_keep_mask(tuple(x.shape), p, seed, x.device).double() * (65536 / 66)
    assert multiplier.count_nonzero() > 0  # some elements kept: the scale is seen
    y = lora_linear(x, weight, b, lora_A, lora_B, s, dropout_p=p, seed=seed, backend=backend)
    y_ref, _ = reference.lora_forward(x, weight, b, lora_A, lora_B, s, multiplier)
    close = dict(rtol=1e-6, atol=1e-9)  # the reference backend's multiplier is fp32 (3e-8); 1000 would be 7e-3 off
    torch.testing.assert_close(y, y_ref, **close)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, lora_A, lora_B), g)
    for a, w in zip(got, reference.lora_backward(g, x, weight, lora_A, lora_B, s, multiplier), strict=True):
        torch.testing.assert_close(a, w, **close)
    assert reference.keep_probability(p) == 66 / 65536


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize(
    "p, message",
    [
        (0.999995, "dropout_p = 0.999995 rounds to 1 at the dropout mask's resolution of 1/65536"),
        (1e-6, "dropout_p = 1e-06 rounds to 0 at the dropout mask's resolution of 1/65536"),
        (2**-18, "dropout_p = 3.814697265625e-06 rounds to 0"),
    ],
)
def test_dropout_p_the_mask_cannot_draw_is_refused(backend, p, message):
    """round(p · 2¹⁶) of 2¹⁶ would drop everything (and overflowed the 16-bit comparison, keeping everything scaled by
    1/(1-p)); of 0 would drop nothing though p > 0. Every backend refuses both, in training and in eval, before any
    work; p = 0 exactly and the extreme representable values are accepted."""
    x, weight, b, lora_A, lora_B = _inputs(4, True, "linear", lead=(3,), dtype=torch.float32)
    for training in (True, False):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            lora_linear(x, weight, b, lora_A, lora_B, 1.0, dropout_p=p, training=training, seed=1, backend=backend)
    # The triton backend runs on CPU only under its interpreter (tests/kernels/test_triton_kernels.py).
    if backend != "triton":
        for ok in (0.0, 2**-16, 65535 / 65536):
            lora_linear(x, weight, b, lora_A, lora_B, 1.0, dropout_p=ok, seed=1, backend=backend)


def test_eval_mode_has_no_dropout():
    x, weight, b, lora_A, lora_B = _inputs(4, True, "linear", dtype=torch.float32)
    y_eval = lora_linear(x, weight, b, lora_A, lora_B, 1.0, dropout_p=0.5, training=False, backend="torch")
    y_none = lora_linear(x, weight, b, lora_A, lora_B, 1.0, dropout_p=0.0, backend="torch")
    assert torch.equal(y_eval, y_none)


def test_torch_backend_saves_only_x_and_h():
    x, weight, b, lora_A, lora_B = _inputs(8, True, "linear", lead=(3, 50), k=40, n=30, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear(x, weight, b, lora_A, lora_B, 1.0, dropout_p=0.2, seed=1, backend="torch")
    big = [t for t in saved if t.numel() >= x.numel()]
    # Only x itself is saved at the size of x: no dropout mask and no dropped copy of x.
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert any(tuple(t.shape) == (150, 8) for t in saved)  # h = drop(x) Aᵀ


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_mixed_precision_bf16_activations_fp32_lora(backend):
    x, weight, b, lora_A, lora_B = _inputs(8, True, "linear", lead=(5,), k=16, n=12, dtype=torch.float32)
    xb, wb, bb = x.detach().bfloat16().requires_grad_(), weight.bfloat16(), b.detach().bfloat16()
    y = lora_linear(xb, wb, bb, lora_A, lora_B, 1.0, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lora_A.grad.dtype == torch.float32 and lora_B.grad.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    y_ref, _ = reference.lora_forward(xb.double(), wb.double(), bb.double(), lora_A.double(), lora_B.double(), 1.0)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=2e-2)


def test_autocast_cpu():
    x, weight, b, lora_A, lora_B = _inputs(8, True, "linear", lead=(5,), k=16, n=12, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, weight, b, lora_A, lora_B, 1.0, backend="torch")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.randn(3, 6)), "x has 6 features"),
        (dict(weight=torch.randn(5, 7, 1)), "weight must be 2-D"),
        (dict(lora_A=torch.randn(4, 6)), "lora_A must be (r, in_features)"),
        (dict(lora_A=torch.randn(0, 7), lora_B=torch.randn(5, 0)), "rank r must be >= 1"),
        (dict(lora_B=torch.randn(4, 4)), "lora_B must be (out_features, r) = (5, 4)"),
        (dict(bias=torch.randn(4)), "bias must be (out_features,) = (5,)"),
        (dict(weight=torch.randn(5, 7, dtype=torch.float64)), "weight has dtype torch.float64"),
        (dict(lora_B=torch.randn(5, 4, dtype=torch.float64)), "must share a dtype"),
        (dict(x=torch.ones(3, 7, dtype=torch.long)), "x must be a floating-point tensor"),
        (dict(dropout_p=1.0), "dropout_p must be in [0, 1)"),
        (dict(dropout_p=float("nan")), "dropout_p must be in [0, 1), got nan"),
        (dict(dropout_p=0.999995), "dropout_p = 0.999995 rounds to 1"),
        (dict(dropout_p=False), "dropout_p must be a real number (int or float, not bool), got bool False"),
        (dict(dropout_p="0.1"), "dropout_p must be a real number (int or float, not bool), got str '0.1'"),
        (dict(dropout_p=None), "dropout_p must be a real number (int or float, not bool), got NoneType None"),
        (
            dict(scaling=float("nan")),
            "scaling must be finite and non-zero (at 0 the LoRA weights get no gradient), got nan",
        ),
        (
            dict(scaling=float("-inf")),
            "scaling must be finite and non-zero (at 0 the LoRA weights get no gradient), got -inf",
        ),
        (dict(scaling=0.0), "scaling must be finite and non-zero (at 0 the LoRA weights get no gradient), got 0.0"),
        (dict(scaling=True), "scaling must be a real number (int or float, not bool), got bool True"),
        (dict(scaling=torch.tensor(2.0)), "scaling must be a real number (int or float, not bool), got Tensor"),
        (dict(weight=torch.randn(7, 5)), "x has 7 features"),
    ],
)
def test_bad_inputs_are_refused(change, message):
    args = dict(
        x=torch.randn(3, 7),
        weight=torch.randn(5, 7),
        bias=torch.randn(5),
        lora_A=torch.randn(4, 7),
        lora_B=torch.randn(5, 4),
        scaling=1.0,
        dropout_p=0.0,
    )
    args.update(change)
    with pytest.raises((ValueError, TypeError)) as err:
        lora_linear(**args, backend="torch")
    assert message in str(err.value)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        lora_linear(
            torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(2, 3), torch.randn(4, 2), 1.0, backend="cuda"
        )


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_trainable_base_weight_and_bias_get_their_gradients(backend, layout):
    """A user who unfreezes W (and the bias) gets dW = gᵀ x in the stored parameter's layout, never None."""
    x, weight, b, lora_A, lora_B = _inputs(4, True, layout, lead=(3, 5), k=7, n=6)
    stored = weight.t().detach().clone() if layout == "conv1d" else weight.detach().clone()
    stored.requires_grad_()
    w = stored.t() if layout == "conv1d" else stored  # the (N, K) view a Conv1D layer passes
    y = lora_linear(x, w, b, lora_A, lora_B, 0.5, dropout_p=0.2, seed=4, backend=backend)
    g = torch.randn_like(y)
    y.backward(g)
    g2, x2 = g.reshape(-1, 6), x.detach().reshape(-1, 7)
    dW = g2.t() @ x2
    torch.testing.assert_close(stored.grad, dW.t() if layout == "conv1d" else dW, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, g2.sum(0), rtol=1e-12, atol=1e-12)
