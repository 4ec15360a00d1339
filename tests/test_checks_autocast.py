"""bf16 autocast on a CPU: the ``reference`` and ``torch`` backends and ``patch_peft`` against fp64 (the compute
dtypes of ``lora_fast.checks.compute_dtypes``; the detection behind ``--dtype auto`` is tests/test_precision_cpu.py).

Tolerances. bf16 keeps 8 significant bits: unit roundoff u = 2⁻⁸ ≈ 3.9e-3. Under autocast every matmul rounds its
operands to bf16 once, accumulates in fp32 and rounds its result once, so a product's normwise relative error is a
few u, whatever K; ``BF16_REL = 1e-2`` (≈ 2.5 u) bounds the output and every gradient of one layer against fp64 on
the same fp32 inputs. A whole model rounds every activation to bf16 and compounds that over its layers: its loss and
logits within ``MODEL_REL = 3e-2``, all its trainable gradients together within ``GRADS_REL = 6e-2``. A tiny random
model's gradients are small and cancel partly over the tokens, so one gradient tensor alone moves more (PEFT's own
layers under autocast: up to 7% on the tiny Llama); each is held to ``ONE_GRAD_REL = 0.2``, which a wrong scale, a
lost dropout factor or a transposed Conv1D weight far exceeds (the one-layer tests hold each to 1e-2).

The fp32 accumulation is checked apart, on the saved ``h``: within one bf16 rounding of the exact product of the
rounded operands plus the fp32 sum's own bound (K · 2⁻²⁴ · Σ|x||a|), which a bf16 accumulation over K = 1024 terms
would exceed.
"""

import copy

import pytest
import torch

import lora_fast
from lora_fast import lora_linear, patch_peft, reference
from lora_fast import peft_patch as pp
from lora_fast.functional import seeded_keep_mask
from tests.helpers import tiny_gpt2_config, tiny_llama_config

BF16_REL = 1e-2
MODEL_REL = 3e-2
GRADS_REL = 6e-2
ONE_GRAD_REL = 0.2


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Normwise relative error of ``got`` against the fp64 ``want``."""
    return ((got.double() - want).norm() / want.norm()).item()


def _layer(M, K, N, R, layout, seed=0):
    """fp32 leaves ``x, W, bias, A, B`` (all requiring grad: every gradient is checked) and ``g``; a Conv1D layout
    passes W as the transposed view of a stored ``(K, N)`` tensor, whose gradient is checked in that layout."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    stored = torch.randn(K, N, generator=gen) if layout == "conv1d" else torch.randn(N, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    A = torch.randn(R, K, generator=gen) * K**-0.5
    B = torch.randn(N, R, generator=gen) * R**-0.5  # not zero: the LoRA term and dA count
    g = torch.randn(M, N, generator=gen)
    leaves = [t.requires_grad_() for t in (x, stored * K**-0.5, bias, A, B)]
    return leaves, g


SHAPES = {"small": (5, 16, 12, 8), "long_K": (64, 1024, 96, 16), "wide_N": (33, 96, 1024, 64)}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_backend_under_cpu_autocast_matches_fp64(backend, shape, layout, dropout):
    M, K, N, R = SHAPES[shape]
    leaves, g = _layer(M, K, N, R, layout)
    x, stored, bias, A, B = leaves
    W = stored.t() if layout == "conv1d" else stored
    s, seed = 2.0, 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, bias, A, B, s, dropout_p=dropout, seed=seed, backend=backend)
    assert y.dtype == torch.bfloat16  # as nn.Linear under autocast
    y.backward(g.bfloat16())
    assert all(t.grad.dtype == torch.float32 for t in leaves)  # fp32 leaves get fp32 gradients (master weights)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rstored, rbias, rA, rB = ref_leaves
    keep = seeded_keep_mask((M, K), dropout, seed, x.device) if dropout else None
    # the same mask the backends draw from the seed, scaled by its keep rate
    mask = None if keep is None else keep.double() / reference.keep_probability(dropout)
    y_ref, _ = reference.lora_forward(rx, rstored.t() if layout == "conv1d" else rstored, rbias, rA, rB, s, mask)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, g.bfloat16().double())
    assert _rel(y, y_ref) <= BF16_REL
    for name, t, want in zip(("x", "W", "bias", "A", "B"), leaves, grads_ref, strict=True):
        assert _rel(t.grad, want) <= BF16_REL, name


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_torch_backend_lora_branch_is_bf16_with_fp32_accumulation(dropout):
    """h = drop(x) Aᵀ, saved for backward, is bf16 (half the bytes) and is the bf16 operands' exact product rounded
    once (and, with dropout, once more by the 1/keep scale), up to the fp32 sum's bound."""
    M, K, N, R = SHAPES["long_K"]
    (x, W, bias, A, B), _ = _layer(M, K, N, R, "linear")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lora_linear(x, W, bias, A, B, 1.0, dropout_p=dropout, seed=5, backend="torch")
    (h,) = [t for t in saved if tuple(t.shape) == (M, R)]
    assert h.dtype == torch.bfloat16
    xb, ab = x.detach().bfloat16().double(), A.detach().bfloat16().double()
    if dropout:
        xb = xb * seeded_keep_mask((M, K), dropout, 5, x.device)
    exact = xb @ ab.t()
    fp32_sum_bound = K * 2.0**-24 * (xb.abs() @ ab.abs().t())
    want = exact.bfloat16().double()
    slack = 2.0**-8 * exact.abs() + fp32_sum_bound
    if dropout:
        keep = reference.keep_probability(dropout)
        want, slack = (want / keep).bfloat16().double(), 2 * slack / keep
    assert bool(((h.double() - want).abs() <= slack).all())


# ---------------------------------------------------------------- patch_peft under CPU autocast


def _gpt2():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config())


def _llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


MODELS = {  # (model, PEFT targets, fan_in_fan_out, vocabulary)
    "gpt2": (_gpt2, ["c_attn", "c_proj", "c_fc"], True, 50257),
    "llama": (_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False, 100),
}


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_patch_peft_under_cpu_autocast_matches_fp64(family, dropout, monkeypatch):
    """An fp32 PEFT model, patched, under CPU bf16 autocast: every LoRA layer runs lora_linear's torch backend, and the
    loss, the logits and every trainable gradient match fp64: PEFT's own model without dropout; with dropout (whose
    masks are lora_linear's, not nn.Dropout's) the patched model in fp64 drawing the same masks from the same seed."""
    peft = pytest.importorskip("peft", reason="HF PEFT is a dev dependency: pip install -e '.[dev]'")
    build, targets, fan_in_fan_out, vocab = MODELS[family]
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                             target_modules=targets, fan_in_fan_out=fan_in_fan_out)  # fmt: skip
    peft_model = peft.get_peft_model(build(), config).train()
    fast = copy.deepcopy(peft_model)
    patch_peft(fast, verbose=False)
    ref = copy.deepcopy(fast if dropout else peft_model).double()
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return lora_fast.lora_linear(*args, **kwargs)

    monkeypatch.setattr(pp, "lora_linear", spy)
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(input_ids=ids, labels=ids)
    out.loss.backward()
    n_layers = sum(isinstance(m, pp.LoraFastLinear) for m in fast.modules())
    assert n_layers >= 8 and calls == ["torch"] * n_layers
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    torch.manual_seed(1)
    ref_out = ref(input_ids=ids, labels=ids)
    ref_out.loss.backward()
    assert abs(out.loss.item() - ref_out.loss.item()) <= MODEL_REL * abs(ref_out.loss.item())
    assert _rel(out.logits, ref_out.logits) <= MODEL_REL
    grads = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and any(".lora_A." in n for n in grads)
    assert all(g.dtype == torch.float32 for g in grads.values())
    flat = [torch.cat([g[n].flatten() for n in grads]) for g in (grads, ref_grads)]
    assert _rel(*flat) <= GRADS_REL
    for name, g in grads.items():
        assert _rel(g, ref_grads[name]) <= ONE_GRAD_REL, name
