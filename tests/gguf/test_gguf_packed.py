"""GGUF-packed base weights (``lora_fast.gguf``): the dequantisation is the ``gguf`` package's bit for bit (torch and
the Triton kernel, every packed format, random blocks), and LoRA over a packed weight computes what it computes over
the dequantised float weight: outputs and every gradient equal in fp64 (``torch.equal``), and in fp32 within 1e-6
relative (the same GEMMs on the same values; blocked the same way they agree exactly, which is not promised).

Shapes are small and odd (M = 5, N = 7, three blocks per row) so every tile edge is crossed; the Triton cases run
under the interpreter on CPU. The CUDA tier repeats the Triton checks at a training size (M = 2048, 4096 → 1536).
"""

import numpy as np
import pytest
import torch
from torch import nn

from lora_fast import apply_lora, count_parameters, lora_linear, lora_modules, merge_and_unload, merge_lora
from lora_fast.gguf import PACKED_TYPES, QTYPES, PackedEmbedding, PackedLinear, PackedWeight
from tests.gguf_files import random_blocks
from tests.helpers import requires_cuda

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf) is the reference dequantiser")
FP32 = {"rtol": 1e-6, "atol": 1e-6}


def _packed(qtype: str, n: int = 7, blocks: int = 3, seed: int = 0) -> PackedWeight:
    data = random_blocks(qtype, n, blocks, np.random.default_rng(seed))
    return PackedWeight(torch.from_numpy(data), qtype, (n, blocks * QTYPES[qtype].block))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.mark.parametrize("qtype", PACKED_TYPES)
def test_dequantize_is_gguf_bit_for_bit(qtype):
    w = _packed(qtype)
    ref = torch.from_numpy(gguf.dequantize(w.data.numpy(), gguf.GGMLQuantizationType[qtype]))
    ours = w.dequantize()
    assert ours.shape == ref.shape == (7, 3 * QTYPES[qtype].block) and ours.dtype == torch.float32
    assert torch.equal(_bits(ours), _bits(ref))
    assert ours.std() > 0  # the random blocks hold varied weights, not a constant
    index = torch.tensor([5, 0, 5])
    assert torch.equal(_bits(w.rows(index)), _bits(ref[index]))


@pytest.mark.parametrize("qtype", PACKED_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_dequantize_is_the_torch_one(qtype, dtype):
    from lora_fast.gguf.triton_op import triton_dequantize

    w = _packed(qtype, n=19, blocks=2, seed=1)  # 19 rows: a partial BLOCK_N tile
    got = triton_dequantize(w, dtype)
    assert got.dtype == dtype and torch.equal(_bits(got), _bits(w.dequantize().to(dtype)))


def test_packed_weight_refuses_a_mismatched_shape_or_type():
    data = torch.zeros(4, 40, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"Q4_1 data of a \(4, 64\) weight must be uint8 \(4, 40\), got shape \(4, 4"):
        PackedWeight(torch.zeros(4, 41, dtype=torch.uint8), "Q4_1", (4, 64))
    with pytest.raises(ValueError, match="in_features must be a multiple of 32, got 48"):
        PackedWeight(data, "Q4_1", (4, 48))
    with pytest.raises(ValueError, match="'Q5_1' is not kept packed; supported: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K"):
        PackedWeight(data, "Q5_1", (4, 64))
    with pytest.raises(ValueError, match=r"x has 10 features .* expects 64"):
        lora_linear(torch.randn(2, 10), PackedWeight(data, "Q4_1", (4, 64)), None, torch.randn(2, 10),
                    torch.randn(4, 2), 1.0)  # fmt: skip


# ---------------------------------------------------------------- LoRA over a packed weight


def _lora_case(qtype: str, dtype: torch.dtype, bias: bool, seed: int = 0):
    w = _packed(qtype, seed=seed)
    n, k = w.shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, k, generator=gen, dtype=dtype)
    b = torch.randn(n, generator=gen, dtype=dtype) if bias else None
    A = torch.randn(4, k, generator=gen, dtype=dtype) * 0.1
    B = torch.randn(n, 4, generator=gen, dtype=dtype) * 0.1
    g = torch.randn(5, n, generator=gen, dtype=dtype)
    return w, x, b, A, B, g


def _run(backend, x, weight, bias, A, B, g, p):
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)] + (
        [] if bias is None else [bias.detach().clone().requires_grad_()]
    )
    y = lora_linear(leaves[0], weight, leaves[3] if bias is not None else None, leaves[1], leaves[2], 2.0,
                    dropout_p=p, seed=7, backend=backend)  # fmt: skip
    y.backward(g)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("qtype", PACKED_TYPES)
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_over_packed_equals_lora_over_the_float_weight_fp64(qtype, backend, p):
    w, x, b, A, B, g = _lora_case(qtype, torch.float64, bias=True)
    packed = _run(backend, x, PackedWeight(w.data, qtype, w.shape, torch.float64), b, A, B, g, p)
    dense = _run(backend, x, w.dequantize().double(), b, A, B, g, p)
    for got, want in zip(packed, dense, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_over_packed_fp32_and_bf16_autocast(qtype, backend):
    w, x, b, A, B, g = _lora_case(qtype, torch.float32, bias=False, seed=3)
    packed = _run(backend, x, w, b, A, B, g, 0.1)
    dense = _run(backend, x, w.dequantize(), b, A, B, g, 0.1)
    for got, want in zip(packed, dense, strict=True):
        torch.testing.assert_close(got, want, **FP32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = _run(backend, x, w, b, A, B, g, 0.0)
        dense = _run(backend, x, w.dequantize(), b, A, B, g, 0.0)
    assert packed[0].dtype == torch.bfloat16
    for got, want in zip(packed, dense, strict=True):  # the same bf16-rounded weight on both sides
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_packed_layers_compute_their_float_layers_fp64():
    w = _packed("Q8_0", n=11)
    bias = torch.randn(11, dtype=torch.float64)
    layer = PackedLinear(w, bias).double()
    linear = layer.to_float().double()
    assert type(linear) is nn.Linear and torch.equal(linear.weight, w.dequantize().double())
    x = torch.randn(3, 5, w.shape[1], dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [layer(xs[0]), linear(xs[1])]
    for y in ys:
        y.square().sum().backward()
    assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad)
    emb = PackedEmbedding(w).double()
    ids = torch.tensor([[3, 0, 10], [3, 3, 1]])
    assert torch.equal(emb(ids), emb.to_float().double()(ids)) and emb(ids).dtype == torch.float64


class _TinyTied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = PackedEmbedding(_packed("Q8_0", n=13, blocks=8))
        self.proj = PackedLinear(_packed("Q4_K", n=256, blocks=1))
        self.head = PackedLinear(self.embed.weight, tied_to=self.embed)

    def forward(self, ids):
        return self.head(self.proj(self.embed(ids)).tanh())


def test_apply_lora_merge_and_unload_and_counts_on_a_packed_model():
    model = _TinyTied()
    assert count_parameters(model) == (0, 13 * 256 + 256 * 256)  # packed weights count their N·K; the tie once
    with pytest.raises(ValueError, match=r"head.weight is tied to \['embed.qweight'\]"):
        apply_lora(model, ["head"], r=2, alpha=4)
    apply_lora(model, ["proj"], r=2, alpha=4)
    layer = dict(lora_modules(model))["proj"]
    assert layer.packed
    nn.init.normal_(layer.lora_B)
    with pytest.raises(TypeError, match="cannot merge LoRA into a GGUF-packed Q4_K weight"):
        merge_lora(model)
    ids = torch.tensor([[1, 12, 5]])
    with torch.no_grad():
        before = model(ids)
        merged = merge_and_unload(model)
        after = merged(ids)
    assert type(merged.proj) is nn.Linear and type(merged.embed) is nn.Embedding and type(merged.head) is nn.Linear
    assert merged.head.weight is merged.embed.weight  # still tied, now in float
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("qtype", PACKED_TYPES)
def test_packed_triton_on_cuda_is_the_float_path(qtype):
    from lora_fast.gguf.triton_op import triton_dequantize

    w = _packed(qtype, n=1536, blocks=4096 // QTYPES[qtype].block, seed=5)
    w = PackedWeight(w.data.cuda(), qtype, w.shape)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(_bits(triton_dequantize(w, dtype)), _bits(w.dequantize().to(dtype)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2048, 4096, device="cuda", generator=gen)
    A = torch.randn(16, 4096, device="cuda", generator=gen) * 0.02
    B = torch.randn(1536, 16, device="cuda", generator=gen) * 0.02
    g = torch.randn(2048, 1536, device="cuda", generator=gen)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed = _run("triton", x, w, None, A, B, g, 0.1)
        dense = _run("triton", x, w.dequantize(), None, A, B, g, 0.1)
    # The same bf16 weight in both; a tile table may differ with W's element size, so bf16's tolerance, not bits.
    for got, want in zip(packed, dense, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
