"""Every autodiff mode plain autograd supports, through the ``torch`` backend's explicit backward: second derivatives
(``create_graph``: Hessian-vector products), ``torch.func`` transforms and forward mode, in fp64 against plain
autograd of the same formula and mask, and a patched PEFT model's Hessian-vector product against PEFT's own."""

import copy

import pytest
import torch
from torch.autograd import forward_ad

from lora_fast import lora_linear, patch_peft
from lora_fast.reference import keep_probability
from lora_fast.torch_backend import seeded_keep_mask

M, K, N, R, S, SEED = 7, 5, 4, 3, 1.5, 123


def _inputs():
    g = torch.Generator().manual_seed(0)
    shapes = {"x": (M, K), "weight": (N, K), "bias": (N,), "lora_A": (R, K), "lora_B": (N, R)}
    return {k: torch.randn(v, generator=g, dtype=torch.float64) for k, v in shapes.items()}


def _plain(x, weight, bias, lora_A, lora_B, p):
    """The specification as plain autograd ops, with the torch backend's own mask and 1/keep in fp64."""
    xl = x if p == 0 else x * seeded_keep_mask(tuple(x.shape), p, SEED, x.device) / keep_probability(p)
    return x @ weight.t() + bias + S * (xl @ lora_A.t()) @ lora_B.t()


def _ours(x, weight, bias, lora_A, lora_B, p):
    return lora_linear(x, weight, bias, lora_A, lora_B, S, p, True, SEED, "torch")


def _loss(fn, *args):
    return fn(*args).sin().sum()  # curved, so the Hessian is not trivial


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_hessian_vector_products_are_exact(p):
    args = {k: v.requires_grad_() for k, v in _inputs().items()}
    hvps = []
    for fn in (_ours, _plain):
        params = list(args.values())
        grads = torch.autograd.grad(_loss(fn, *params, p), params, create_graph=True)
        direction = sum((g * torch.cos(torch.arange(g.numel()).view(g.shape))).sum() for g in grads)
        hvps.append(torch.autograd.grad(direction, params))
    for name, ours, want in zip(args, *hvps, strict=True):
        torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12, msg=f"H·v for {name}")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_func_grad_jacrev_and_jvp(p):
    args = _inputs()
    for argnums in (0, 3, 4, (0, 1, 2, 3, 4)):
        ours = torch.func.grad(lambda *a: _loss(_ours, *a, p), argnums=argnums)(*args.values())
        want = torch.func.grad(lambda *a: _loss(_plain, *a, p), argnums=argnums)(*args.values())
        torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    if p == 0:  # jacrev runs vmap, under which a random mask has no rule (torch says so) for any function
        jac = [torch.func.jacrev(lambda a, fn=fn: fn(args["x"], args["weight"], args["bias"], a, args["lora_B"], p))(
            args["lora_A"]) for fn in (_ours, _plain)]  # fmt: skip
        torch.testing.assert_close(*jac, rtol=1e-12, atol=1e-12)
    tangents = tuple(torch.randn_like(v) for v in args.values())
    ours = torch.func.jvp(lambda *a: _ours(*a, p), tuple(args.values()), tangents)
    want = torch.func.jvp(lambda *a: _plain(*a, p), tuple(args.values()), tangents)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)


def test_forward_mode_dual_numbers_with_some_tangents_missing():
    args = _inputs()
    t_A = torch.randn_like(args["lora_A"])
    results = []
    for fn in (_ours, _plain):
        with forward_ad.dual_level():
            dual_A = forward_ad.make_dual(args["lora_A"], t_A)
            out = fn(args["x"], args["weight"], args["bias"], dual_A, args["lora_B"], 0.3)
            results.append(forward_ad.unpack_dual(out))
    torch.testing.assert_close(results[0].primal, results[1].primal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0].tangent, results[1].tangent, rtol=1e-12, atol=1e-12)


def test_a_patched_peft_models_hessian_vector_product_is_peft_s():
    """What PEFT users compute with create_graph (meta-learning, sharpness-aware training): the same H·v after
    patch_peft as before, in fp64 (LoRA dropout 0, so the two draw no mask)."""
    peft = pytest.importorskip("peft", reason="HF PEFT is a dev dependency")
    from transformers import GPT2LMHeadModel

    from tests.helpers import tiny_gpt2_config

    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                             init_lora_weights=False)  # fmt: skip
    base = GPT2LMHeadModel(tiny_gpt2_config(attn_implementation="eager"))  # SDPA on CPU has no 2nd derivative
    reference = peft.get_peft_model(base.double(), config).eval()
    patched = copy.deepcopy(reference)
    patch_peft(patched, verbose=False)
    ids = torch.randint(0, 50257, (2, 9))
    hvps = []
    for model in (reference, patched):
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(model(input_ids=ids).logits.square().mean(), params, create_graph=True)
        hvps.append(torch.autograd.grad(sum(g.sum() for g in grads), params))
    for ours, want in zip(hvps[1], hvps[0], strict=True):
        torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-12)
