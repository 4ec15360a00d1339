"""The triton backend's dropout key: an int64 ``(seed, offset)`` pair in device memory, drawn on the device from torch's
generator, read by the kernels (no host seed reaches them) and saved for the backward.

CPU tier (kernels under ``TRITON_INTERPRET=1``): the mask is the documented function of ``(key, m, k)`` (checked
against Philox-4x32-10 written out in numpy), every draw advances torch's generator (a new key per call, the same
sequence after ``torch.manual_seed``, the same key after the generator's state is restored, as
``torch.utils.checkpoint`` does), and a checkpointed layer recomputes the very mask it used. CUDA tier: a forward and
backward captured in a CUDA graph draw a new mask at each replay, each matching the reference with its own mask.
"""

import inspect

import numpy as np
import pytest
import torch

from lora_fast import lora_linear, reference
from lora_fast.kernels import configs
from lora_fast.kernels.dropout import dropout_key, dropout_threshold, lora_dropout_mask
from lora_fast.kernels.lora_backward import launch_lora_backward
from lora_fast.kernels.lora_forward import launch_lora_forward
from lora_fast.kernels.utils import interpreting
from lora_fast.triton_backend import config
from tests.helpers import requires_cuda

KERNEL_MODULES = ("lora_forward", "lora_backward", "skinny", "partials", "hybrid", "dropout")
cpu_tier = pytest.mark.skipif(not interpreting(), reason="CPU tier: runs only under TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _ieee(monkeypatch):
    monkeypatch.setattr(config, "fp32_precision", "ieee")


# ---------------------------------------------------------------- the mask as a function of (key, m, k)

_M32 = 0xFFFFFFFF


def _philox(seed: int, c0, c1, c2, c3):
    """Philox-4x32-10 on uint64 arrays holding 32-bit words, key ``(seed & M32, seed >> 32)``."""
    k0, k1 = np.uint64(seed & _M32), np.uint64((seed >> 32) & _M32)
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        pb, pa = b * c2, a * c0  # 64-bit products of 32-bit words
        c0, c1, c2, c3 = (pb >> np.uint64(32)) ^ c1 ^ k0, pb & _M32, (pa >> np.uint64(32)) ^ c3 ^ k1, pa & _M32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _M32, (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0, c1, c2, c3


def _mask_by_spec(M: int, K: int, p: float, seed: int, offset: int) -> np.ndarray:
    """Element (m, k) is kept when bits [16j, 16j + 16) of word w of Philox(seed; counter (m·cdiv(K, 8) + k // 8),
    offset) are >= round(p · 2¹⁶), for k = 8·(k // 8) + 2w + j (docs/KERNELS.md, "Dropout")."""
    groups = -(-K // 8)
    m, k = np.meshgrid(np.arange(M, dtype=np.uint64), np.arange(K, dtype=np.uint64), indexing="ij")
    counter = m * np.uint64(groups) + k // np.uint64(8)
    off = np.uint64(offset & (2**64 - 1))
    words = _philox(seed & (2**64 - 1), counter & _M32, counter >> np.uint64(32), off & _M32, off >> np.uint64(32))
    w, j = (k % np.uint64(8)) // np.uint64(2), k % np.uint64(2)
    word = np.choose(w.astype(np.int64), words)
    lane = (word >> (np.uint64(16) * j)) & np.uint64(0xFFFF)
    return lane >= np.uint64(dropout_threshold(p))


@cpu_tier
@pytest.mark.parametrize("seed, offset", [(5, 5), (-(2**63), 2**62 + 3), (123456789012345, -7)])
def test_mask_is_philox_of_seed_counter_and_offset(seed, offset):
    """The kernels' mask against the spec written out: K = 37 leaves a partial group of eight columns, rows pass one
    Philox counter word into the next only at 2³² groups (the high counter word is checked by the int64 test of the
    CUDA tier)."""
    M, K, p = 6, 37, 0.3
    key = torch.tensor([seed, offset], dtype=torch.int64)
    got = lora_dropout_mask(M, K, p, key) != 0
    assert np.array_equal(got.numpy(), _mask_by_spec(M, K, p, seed, offset))


@cpu_tier
def test_seed_and_offset_each_change_the_mask():
    """(seed, offset) is the whole key: another offset under the same seed draws another stream, and so does another
    seed under the same offset (the offset fills Philox's counter words that the element index leaves free)."""
    masks = [lora_dropout_mask(64, 64, 0.5, torch.tensor(k, dtype=torch.int64)) for k in ((3, 9), (3, 10), (4, 9))]
    assert torch.equal(masks[0], lora_dropout_mask(64, 64, 0.5, torch.tensor([3, 9])))
    for a in range(3):
        for b in range(a + 1, 3):
            assert (masks[a] != masks[b]).double().mean().item() > 0.25  # independent masks: about half differ


def test_kernels_round_and_refuse_p_as_the_specification_does():
    """kernels/ imports torch and triton only (tests/test_layout.py), so it keeps its own copy of the rule for p
    (round(p · 2¹⁶), refusing what rounds to "keep all" or "drop all"): it gives the specification's threshold for
    every p, and refuses the same p with the same message."""
    lanes = reference.DROPOUT_LANES
    ps = [0.0, 0.05, 0.1, 0.5, 0.999, 1 / lanes, 0.5 / lanes, 0.49 / lanes, 0.51 / lanes, 1 - 0.5 / lanes]
    ps += [1 - 0.51 / lanes, 1 - 1 / lanes, 1.0, -0.0, -1e-9, 1.5, float("nan"), float("inf")]
    for p in ps:
        outcomes = []
        for rule in (dropout_threshold, reference.dropout_threshold):
            try:
                outcomes.append(rule(p))
            except ValueError as e:
                outcomes.append(str(e))
        assert outcomes[0] == outcomes[1], p


# ---------------------------------------------------------------- the key comes from torch's generator


@cpu_tier
def test_keys_advance_torch_generator_and_replay_from_its_state():
    """Each draw consumes torch's generator of the device: a new key per call (no pair of 2000 keys equal), the same
    sequence after torch.manual_seed, the same key after the generator's state is restored."""
    torch.manual_seed(0)
    keys = [tuple(dropout_key("cpu").tolist()) for _ in range(2000)]
    assert len(set(keys)) == len(keys)
    torch.manual_seed(0)
    assert [tuple(dropout_key("cpu").tolist()) for _ in range(3)] == keys[:3]
    state = torch.get_rng_state()
    first = dropout_key("cpu")
    torch.set_rng_state(state)
    assert torch.equal(dropout_key("cpu"), first)
    assert torch.equal(dropout_key("cpu", 7), torch.tensor([7, 7]))  # an explicit seed fixes the key


def _layer(M=24, K=48, N=40, R=8):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen, requires_grad=True)
    weight = torch.randn(N, K, generator=gen) / K**0.5
    A = (torch.randn(R, K, generator=gen) / K**0.5).requires_grad_()
    B = torch.randn(N, R, generator=gen).requires_grad_()
    return x, weight, A, B


@cpu_tier
def test_unseeded_calls_draw_new_masks_and_checkpoint_recomputes_the_same_one():
    """seed=None on the triton backend: each call another mask; torch.manual_seed repeats them; under
    torch.utils.checkpoint the recomputed forward draws the key it drew the first time, so the gradients equal the
    plain run's bitwise (a different mask in the recomputation would be a silently wrong gradient)."""
    x, weight, A, B = _layer()

    def f(x, A, B):
        return lora_linear(x, weight, None, A, B, 0.5, dropout_p=0.5, backend="triton")

    torch.manual_seed(3)
    y1, y2 = f(x, A, B), f(x, A, B)
    assert not torch.equal(y1, y2)
    torch.manual_seed(3)
    assert torch.equal(f(x, A, B), y1)

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(4)
        if checkpointed:
            y = torch.utils.checkpoint.checkpoint(f, x, A, B, use_reentrant=False)
        else:
            y = f(x, A, B)
        grads.append((y.detach(), *torch.autograd.grad(y.square().sum(), (x, A, B))))
    for plain, ckpt in zip(*grads, strict=True):
        assert torch.equal(plain, ckpt)


def test_no_kernel_takes_a_host_seed():
    """Every launch that draws the mask reads it from the int64 key on the operands' device; no integer seed argument
    is left on any kernel."""
    import importlib

    kernels = [
        getattr(module, name)
        for module in (importlib.import_module(f"lora_fast.kernels.{m}") for m in KERNEL_MODULES)
        for name in dir(module)
        if name.startswith("_lora_") and name.endswith("_kernel")
    ]
    assert len(kernels) == 7
    for fn in kernels:
        assert "seed" not in inspect.signature(fn.fn).parameters, fn
    launches = []

    def hook(kernel, grid, arguments, constexprs, candidates):
        launches.append((kernel, dict(zip(kernel.arg_names, arguments(candidates[0]), strict=False)), constexprs))
        return candidates[0]

    meta = dict(device="meta", dtype=torch.bfloat16)
    M, K, N, R = 64, 48, 40, 8
    x, g = torch.empty(M, K, **meta), torch.empty(M, N, **meta)
    weight, A, B = torch.empty(N, K, **meta), torch.empty(R, K, **meta), torch.empty(N, R, **meta)
    key = torch.empty(2, device="meta", dtype=torch.int64)
    with configs.capture_launches(hook, configs.DeviceInfo(132, (9, 0))):
        for design in ("fused", "split"):
            _, h = launch_lora_forward(x, weight, None, A, B, 0.5, 0.1, key, design=design)
            launch_lora_backward(g, x, weight, A, B, h, 0.5, 0.1, key, design=design)
    drawing = [(k.__name__, args) for k, args, cx in launches if cx.get("HAS_DROPOUT")]
    assert {name for name, _ in drawing} == {"_lora_skinny_kernel", "_lora_dx_kernel", "_lora_reduce_kernel"}
    for name, args in drawing:
        assert args["key_ptr"] is key, name
    with pytest.raises(ValueError, match=r"dropout needs key, an int64 tensor \(seed, offset\) of shape \(2,\)"):
        launch_lora_forward(x, weight, None, A, B, 0.5, 0.1, None)


# ---------------------------------------------------------------- CUDA tier: graphs


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_replays_draw_new_masks_cuda():
    """Forward and backward captured in one CUDA graph with the key drawn inside it: two replays draw two keys, and
    each replay's y, dx, dA and dB match the fp64 reference with the mask of its own key."""
    dev, p, s = "cuda", 0.3, 0.5
    M, K, N, R = 512, 768, 768, 16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=gen) / K**0.5
    A = torch.randn(R, K, device=dev, dtype=torch.bfloat16, generator=gen) / K**0.5
    B = torch.randn(N, R, device=dev, dtype=torch.bfloat16, generator=gen)
    g = torch.randn(M, N, device=dev, dtype=torch.bfloat16, generator=gen)

    def step():
        key = dropout_key(dev)
        y, h = launch_lora_forward(x, weight, None, A, B, s, p, key)
        dx, dA, dB, _ = launch_lora_backward(g, x, weight, A, B, h, s, p, key)
        return key, y, dx, dA, dB

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and choose the configurations outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append([t.clone() for t in outputs])
    assert not torch.equal(replays[0][0], replays[1][0]) and not torch.equal(replays[0][1], replays[1][1])
    d = lambda t: t.double()  # noqa: E731
    for key, y, dx, dA, dB in replays:
        mask = lora_dropout_mask(M, K, p, key).double()
        y_ref, _ = reference.lora_forward(d(x), d(weight), None, d(A), d(B), s, mask)
        refs = reference.lora_backward(d(g), d(x), d(weight), d(A), d(B), s, mask)
        for got, ref in zip((y, dx, dA, dB), (y_ref, *refs), strict=True):
            assert ((got.double() - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_of_the_autograd_layer_draws_new_masks_cuda():
    """lora_linear forward + backward (autograd, seed None) captured whole: the LoRA gradient differs between two
    replays (a new mask each), as a step of a graph-captured training loop needs."""
    x, weight, A, B = (t.detach().cuda() for t in _layer(M=256, K=64, N=64, R=16))
    A.requires_grad_()
    x.requires_grad_()

    def step():
        lora_linear(x, weight, None, A, B, 0.5, dropout_p=0.5, backend="triton").square().sum().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = A.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    grads = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        grads.append(A.grad.clone())
    assert not torch.equal(grads[0], grads[1])
