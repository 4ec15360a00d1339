"""Packed batches (``lora_fast/study/packing.py``): the layout is the rows' own (tokens, positions, and a mask that
lets each token see exactly the tokens before it in its rows), and in fp64 the label logits and every trainable
gradient of ``flat`` and ``prefix`` equal the padded batch's (``off``) within 1e-10 relative, on GPT-2 and Llama, for
LoRA, full fine-tuning, BitFit and bottleneck adapters; ``auto`` resolves as documented, and dropout keeps a draw per
token under ``flat`` and shares a shared token's draw under ``prefix``.

Tolerance: ``‖packed - off‖ / ‖off‖ <= 1e-10`` per tensor (fp64 on CPU; the layouts sum in different orders, ~1e-16
seen). HF's Llama rounds to fp32 in two places even in an fp64 model: ``LlamaRMSNorm`` casts its input to fp32, and
eager attention takes its softmax in fp32. A node that ``prefix`` shares gets the sum of its rows' gradients, which
the fp32 norm then rounds as a sum where the padded batch rounds each part (~3e-8 relative seen), so the fp64 tests
swap in ``RMSNorm64``, the same formula in the input's dtype, to check the packing itself at fp64 precision; HF's own
norm and eager attention are held to 1e-6.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from lora_fast import LoRALinear, apply_lora
from lora_fast.study.bitfit import prepare_bitfit
from lora_fast.study.bottleneck import apply_bottleneck_adapters
from lora_fast.study.causal_lm import LastTokenLM, default_targets
from lora_fast.study.packing import Packing, active_dropout, pack_rows, resolve_packing
from lora_fast.study.prompts import EncodedSplit
from lora_fast.study.training import collate, make_optimizer, step_batches, train_step
from tests.helpers import requires_cuda, tiny_gpt2_config, tiny_llama_config

EXACT = 1e-10


def sequences(seed: int = 1, vocab: int = 90) -> list[list[int]]:
    """Rows sharing a 7-token prefix with suffixes of 1 to 9 tokens, a duplicate row, a row that is a prefix of
    another, and a row that shares nothing: every case the layout has."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    prefix = rand(7)
    rows = [prefix + rand(n) for n in (3, 9, 1, 5)]
    return rows + [list(rows[1]), rows[0][:5], rand(4)]


class RMSNorm64(torch.nn.Module):
    """``LlamaRMSNorm``'s formula, ``weight · x / sqrt(mean(x²) + eps)``, in the input's dtype (HF's casts to fp32)."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def full_precision_norms(model):
    """Every ``LlamaRMSNorm`` of ``model`` replaced by ``RMSNorm64`` around the same weight."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for name in [n for n, m in model.named_modules() if isinstance(m, LlamaRMSNorm)]:
        model.set_submodule(name, RMSNorm64(model.get_submodule(name)))
    return model


def make_model(family: str, attention: str = "sdpa", fp64_norms: bool = True):
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=100))
    else:
        model = LlamaForCausalLM(tiny_llama_config(num_attention_heads=4, num_key_value_heads=2))
        if fp64_norms:
            full_precision_norms(model)
    model.set_attn_implementation(attention)
    return model.double()


def with_method(model, method: str):
    """``model`` with ``method``'s trainable parts, each made non-zero (LoRA's B and the adapters' up start at zero,
    which would leave the other factor without a gradient)."""
    if method == "lora":
        apply_lora(model, default_targets(model.config.model_type), r=4, alpha=8)
    elif method == "bitfit":
        prepare_bitfit(model)
    elif method == "bottleneck":
        apply_bottleneck_adapters(model, 4)
    if method != "full":
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
    return model.double()


def logits_and_grads(model, batch, targets, rows_only: bool = True):
    model.zero_grad(set_to_none=True)
    head = LastTokenLM(model, rows_only)
    logits = head(
        batch["input_ids"],
        batch["attention_mask"],
        batch["position_ids"],
        batch["last_index"],
        row_index=batch.get("row_index"),
    )
    F.cross_entropy(logits, targets).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def assert_same(ours: torch.Tensor, ref: torch.Tensor, tol: float = EXACT, what: str = "") -> None:
    assert ref.norm() > 0, f"{what}: the reference is zero, the comparison would be empty"
    err = float((ours - ref).norm() / ref.norm())
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


# ---------------------------------------------------------------- the layout


@pytest.mark.parametrize("share", [False, True], ids=["flat", "prefix"])
@pytest.mark.parametrize("pair_cost", [0.0, 0.5], ids=["one-row", "several-rows"])
def test_the_layout_is_the_rows_own(share, pair_cost):
    seqs = sequences()
    batch = pack_rows(seqs, pad_id=99, share=share, pair_cost=pair_cost)
    R, _, T, _ = batch["attention_mask"].shape
    ids, pos, mask = batch["input_ids"].flatten(), batch["position_ids"].flatten(), batch["attention_mask"][:, 0]
    sees = {}  # flat index -> the flat indices it may attend, from the rows through it
    for b, seq in enumerate(seqs):
        where = batch["token_index"][b, : len(seq)].tolist()
        assert ids[where].tolist() == seq and pos[where].tolist() == list(range(len(seq)))
        assert len({w // T for w in where}) == 1  # a sequence lives in one packed row
        assert (batch["row_index"][b] * T + batch["last_index"][b]).item() == where[-1]
        for t, q in enumerate(where):
            sees.setdefault(q, set()).update(where[: t + 1])
    for q in range(R * T):  # every query: exactly its rows' earlier tokens; a padding column, itself
        keys = {q // T * T + k for k in mask[q // T, q % T].nonzero().flatten().tolist()}
        assert keys == sees.get(q, {q}), q
    # Nodes: prefix keeps one per distinct prefix among the sequences of each packed row; flat one per token.
    rows = batch["row_index"].tolist()
    distinct = len({(rows[b], tuple(s[: t + 1])) for b, s in enumerate(seqs) for t in range(len(s))})
    assert len(sees) == (distinct if share else sum(map(len, seqs)))
    assert batch["lengths"].tolist() == [len(s) for s in seqs]


def test_more_rows_when_attention_costs_more():
    """The packer trades the padding of more packed rows against dense attention over fewer, longer ones."""
    seqs = [[1] * n for n in range(20, 52)]
    cheap = pack_rows(seqs, 0, share=False, pair_cost=0.0)["input_ids"].shape
    dear = pack_rows(seqs, 0, share=False, pair_cost=0.05)["input_ids"].shape
    assert cheap == (1, sum(range(20, 52))) and dear[0] > 1 and dear[1] < cheap[1]


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("mode", ["flat", "prefix"])
@pytest.mark.parametrize("method", ["lora", "full", "bitfit", "bottleneck"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_logits_and_gradients_equal_padded(family, method, mode):
    model = with_method(make_model(family), method).train()
    seqs = sequences()
    targets = torch.randint(0, 100, (len(seqs),), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_grads = logits_and_grads(model, collate(seqs, 0), targets)
    for cost in (0.0, 0.5):  # one packed row, several
        logits, grads = logits_and_grads(model, pack_rows(seqs, 0, mode == "prefix", cost), targets)
        assert_same(logits, ref_logits, what="logits")
        assert grads.keys() == ref_grads.keys() and grads
        for name, grad in grads.items():
            assert_same(grad, ref_grads[name], what=name)


@pytest.mark.parametrize(
    "family, attention, rows_only, fp64_norms, tol",
    [
        ("gpt2", "eager", True, True, EXACT),
        ("gpt2", "sdpa", False, True, EXACT),
        ("llama", "eager", True, True, 1e-6),
        ("llama", "sdpa", True, False, 1e-6),
    ],
    ids=["gpt2-eager", "gpt2-whole-last-block", "llama-eager", "llama-hf-norms"],
)
def test_packed_forward_equals_padded_on_other_paths(family, attention, rows_only, fp64_norms, tol):
    """Eager attention takes the additive form of the mask; GPT-2's whole last block (``rows_only=False``); HF's
    fp32 RMSNorm (see the module docstring for the tolerances)."""
    model = with_method(make_model(family, attention, fp64_norms), "lora")
    seqs = sequences(seed=3)
    targets = torch.randint(0, 100, (len(seqs),), generator=torch.Generator().manual_seed(4))
    ref_logits, ref_grads = logits_and_grads(model, collate(seqs, 0), targets, rows_only)
    logits, grads = logits_and_grads(model, pack_rows(seqs, 0, True, 0.1), targets, rows_only)
    assert_same(logits, ref_logits, tol, "logits")
    for name, grad in grads.items():
        assert_same(grad, ref_grads[name], tol, name)


def test_a_training_step_on_packed_batches_is_the_padded_step():
    """``step_batches`` with a ``Packing`` feeds ``train_step``: the same loss, update and real-token count."""
    seqs = sequences(seed=5)
    split = EncodedSplit(["p"] * len(seqs), seqs, [0] * len(seqs), [3 + i for i in range(len(seqs))])
    results, weights = {}, {}
    for mode in ("off", "flat", "prefix"):
        model = with_method(make_model("gpt2"), "lora").train()
        packing = None if mode == "off" else Packing(mode, 0.1)
        batches, targets = step_batches(split, 0, 4, 2, seed=0, pad_id=0, packing=packing)
        optimizer = make_optimizer(model, 1e-2)
        results[mode] = train_step(LastTokenLM(model), optimizer, batches, targets)
        weights[mode] = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    for mode in ("flat", "prefix"):
        assert results[mode].tokens == results["off"].tokens > 0
        assert abs(results[mode].loss - results["off"].loss) <= EXACT * abs(results["off"].loss)
        assert_same(weights[mode], weights["off"], what=f"{mode} weights after the step")


# ---------------------------------------------------------------- auto, refusals, dropout


def test_auto_is_prefix_where_exact_and_flat_under_dropout():
    model = make_model("gpt2")
    apply_lora(model, ["attn.c_attn"], r=2, alpha=4, dropout=0.1)
    model.train()
    assert active_dropout(model) and resolve_packing(model, "auto", training=True).mode == "flat"
    assert resolve_packing(model, "auto", training=False).mode == "prefix"
    assert not active_dropout(model.eval()) and resolve_packing(model, "auto", training=True).mode == "prefix"
    assert resolve_packing(model, "flat", training=False).mode == "flat"
    assert resolve_packing(model, "off", training=False).mode == "off"
    llama = make_model("llama").train()
    assert resolve_packing(llama, "auto", training=True).mode == "prefix"
    llama.model.layers[0].self_attn.attention_dropout = 0.1  # Llama keeps its attention dropout as a number
    assert resolve_packing(llama, "auto", training=True).mode == "flat"


def test_other_models_fall_back_to_padded_batches_with_the_reason():
    config = MistralConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, intermediate_size=64)  # fmt: skip
    mistral = MistralForCausalLM(config)
    packing = resolve_packing(mistral, "prefix", training=False)
    assert packing.mode == "off" and "'mistral'" in packing.reason
    with pytest.raises(ValueError, match="packing must be one of"):
        resolve_packing(mistral, "tree", training=False)
    with pytest.raises(ValueError, match="row_index"):
        batch = pack_rows([[1, 2], [1, 3]], 0, True)
        LastTokenLM(make_model("gpt2"))(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                        batch["last_index"])  # fmt: skip


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dropout_draws_are_per_token_under_flat_and_shared_under_prefix(family):
    """Two identical rows: ``prefix`` computes them once, so their dropout draws (LoRA's and, on GPT-2, the model's)
    are one and their logits equal; ``flat`` gives every token its own draw, as the padded batch does."""
    model = make_model(family)
    if family == "gpt2":
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.3
    with_method(model, "lora").train()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.dropout = 0.5
    row = sequences()[1]
    seqs = [row, list(row), row[:8] + [1, 2]]
    torch.manual_seed(0)
    with torch.no_grad():
        for mode in ("off", "flat", "prefix"):
            batch = Packing(mode, 0.0).batch(seqs, 0)
            logits = LastTokenLM(model)(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                        batch["last_index"], row_index=batch.get("row_index"))  # fmt: skip
            same = torch.equal(logits[0], logits[1])
            assert same == (mode == "prefix"), mode


@requires_cuda
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_equals_padded_on_cuda(family):
    """SDPA's CUDA kernels with the boolean 4-D mask: fp32 (TF32 off) logits to 1e-5 and gradients to 1e-4 (CUDA's
    reductions reorder more), and bf16 autocast's logits to 3e-2."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = with_method(make_model(family), "lora").float().cuda().train()
    seqs = sequences(seed=6)
    targets = torch.randint(0, 100, (len(seqs),), generator=torch.Generator().manual_seed(7)).cuda()
    padded = {k: v.cuda() for k, v in collate(seqs, 0).items()}
    ref_logits, ref_grads = logits_and_grads(model, padded, targets)
    packed = pack_rows(seqs, 0, True, 0.1, device="cuda")
    logits, grads = logits_and_grads(model, packed, targets)
    assert_same(logits, ref_logits, 1e-5, "logits")
    for name, grad in grads.items():
        assert_same(grad, ref_grads[name], 1e-4, name)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        low = LastTokenLM(model)(packed["input_ids"], packed["attention_mask"], packed["position_ids"],
                                 packed["last_index"], row_index=packed["row_index"])  # fmt: skip
    assert_same(low.float(), ref_logits, 3e-2, "bf16 logits")
