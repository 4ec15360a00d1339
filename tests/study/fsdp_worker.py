"""FSDP2 over several processes, run by ``tests/study/test_fsdp.py`` under torchrun::

    torchrun --standalone --nproc_per_node 2 tests/study/fsdp_worker.py OUT.pt [--device cuda]

Each case builds a small model (``lora_model``, ``peft_model``: seeded, so the test process builds the same one and
trains it alone for the one-process side of the comparison), shards it with ``lora_fast.study.fsdp.shard_model`` and
trains it, every process on its share of each step's micro-batches (``micro_batches``' every ``world``-th). Rank 0
writes the losses, the final trainable weights, the types the LoRA layers saw inside their forwards, the frozen bytes
each process held, and the outcome of the ``lockstep`` and ``full_parameters`` checks to ``OUT.pt`` (tensors and
plain values: ``torch.load(..., weights_only=True)`` reads it).
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lora_fast import apply_lora, lora_modules, merge_lora, patch_peft
from lora_fast.layers import LoRALinear
from lora_fast.study import distributed
from lora_fast.study.causal_lm import LastTokenLM
from lora_fast.study.fsdp import full_parameters, lockstep, parameter_bytes, shard_model
from lora_fast.study.training import collate, make_optimizer, train_step
from tests.helpers import tiny_gpt2_config, tiny_llama_config

STEPS, MICRO, BATCH = 3, 4, 3  # optimizer steps, micro-batches per step (over all processes), rows per micro-batch
# name: (model kind, LoRA backend, weights' dtype, autocast dtype); the CPU runs the first ones, CUDA the last two.
CPU_CASES = {
    "gpt2-torch-fp64": ("gpt2", "torch", torch.float64, None),
    "gpt2-reference-fp64": ("gpt2", "reference", torch.float64, None),
    "llama-torch-fp64": ("llama", "torch", torch.float64, None),
    "gpt2-triton-fp32": ("gpt2", "triton", torch.float32, None),  # Triton's interpreter on the CPU
}
CUDA_CASES = {
    "gpt2-triton-fp32": ("gpt2", "triton", torch.float32, None),
    "llama-triton-bf16": ("llama", "triton", torch.float32, torch.bfloat16),
}
PEFT_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model(kind: str, dtype: torch.dtype):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(0)
    model = (
        GPT2LMHeadModel(tiny_gpt2_config(vocab_size=96)) if kind == "gpt2" else LlamaForCausalLM(tiny_llama_config())
    )
    return model.to(dtype)


def _targets(kind: str) -> list[str]:
    return ["attn.c_attn", "attn.c_proj"] if kind == "gpt2" else ["q_proj", "v_proj", "o_proj", "down_proj"]


def make_steps(vocab: int, device: torch.device):
    """``STEPS`` steps of ``MICRO`` right-padded micro-batches of random prompts (lengths 3..9) and label ids."""
    gen = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(STEPS):
        seqs = [[torch.randint(1, vocab, (int(torch.randint(3, 10, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(BATCH)] for _ in range(MICRO)]  # fmt: skip
        labels = [torch.randint(0, vocab, (BATCH,), generator=gen) for _ in range(MICRO)]
        steps.append(([collate(s, 0, "right", device) for s in seqs], [t.to(device) for t in labels]))
    return steps


def trainable(model) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, as fp64 CPU copies (a sharded model's gathered by every process)."""
    with full_parameters(model):
        return {n: p.detach().double().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def lora_model(kind: str, backend: str, dtype: torch.dtype):
    """The seeded model of a case, with LoRA (B drawn at random, so every gradient is non-trivial from step 1)."""
    model = _model(kind, dtype)
    torch.manual_seed(1)
    apply_lora(model, _targets(kind), r=4, alpha=8, backend=backend)
    for _, layer in lora_modules(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


def train(model, device: torch.device, amp_dtype=None, rank: int = 0, world: int = 1) -> list[float]:
    """``STEPS`` steps of ``train_step`` (LastTokenLM's label loss, AdamW, clipping), on this process's share."""
    optimizer = make_optimizer(model, lr=5e-2, weight_decay=0.1)
    losses = []
    for batches, targets in make_steps(model.config.vocab_size, device):
        mine = slice(rank, None, world)
        losses.append(train_step(LastTokenLM(model), optimizer, batches[mine], targets[mine], amp_dtype=amp_dtype).loss)
    return losses


def lora_case(kind: str, backend: str, dtype: torch.dtype, amp_dtype, device: torch.device) -> dict:
    """The sharded run of a case: losses, final weights, the LoRA layers' view of their weights, bytes held."""
    model = lora_model(kind, backend, dtype)
    shard_model(model, device, amp_dtype)
    seen = []

    def record(layer, args):
        seen.append(type(layer.weight).__name__ + " " + type(layer.lora_A).__name__ + " " + type(layer.lora_B).__name__)

    hooks = [layer.register_forward_pre_hook(record) for _, layer in lora_modules(model)]
    losses = train(model, device, amp_dtype, dist.get_rank(), dist.get_world_size())
    for h in hooks:
        h.remove()
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, parameter_bytes(model, frozen_only=True))
    return {"losses": losses, "weights": trainable(model), "seen": sorted(set(seen)), "forwards": len(seen),
            "frozen_bytes": held}  # fmt: skip


def peft_model(patched: bool):
    """A PEFT LoRA model (``get_peft_model`` on the tiny Llama, fp64, B random), patched by ``patch_peft`` or not;
    and how many of its layers the patch runs through ``lora_linear`` (0 unpatched)."""
    from peft import LoraConfig, get_peft_model

    model = _model("llama", torch.float64)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, init_lora_weights=False)
    model = get_peft_model(model, config)
    return model, len(patch_peft(model, backend="torch", verbose=False).fast) if patched else 0


def peft_train(model, device: torch.device, rank: int = 0, world: int = 1) -> list[float]:
    """``STEPS`` steps of the PEFT model's own LM loss (AdamW), gradients accumulated over this process's share of
    each step's micro-batches and reduced once (``distributed.no_sync`` before the last)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for batches, _ in make_steps(model.config.vocab_size, device):
        mine, total = batches[rank::world], 0.0
        for i, b in enumerate(mine):
            with distributed.no_sync(model) if i < len(mine) - 1 else contextlib.nullcontext():
                loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["input_ids"]).loss
                (loss / len(mine)).backward()
            total += loss.item() / len(mine)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(distributed.all_sum([total], device)[0] / world)
    return losses


def peft_case(patched: bool, device: torch.device) -> dict:
    """The PEFT model sharded as accelerate's FSDP2 plugin does (each decoder layer, then the PEFT model); with
    ``patched``, why each patched layer's forward did not take ``lora_linear`` (None: it did), as FSDP ran it."""
    from lora_fast.peft_patch import _why_peft

    model, fast = peft_model(patched)
    shard_model(model, device)
    reasons = []
    layers = [m for m in model.modules() if type(m).__name__ == "LoraFastLinear"]
    hooks = [m.register_forward_pre_hook(lambda m, args: reasons.append(_why_peft(m, args[0]))) for m in layers]
    losses = peft_train(model, device, dist.get_rank(), dist.get_world_size())
    for h in hooks:
        h.remove()
    return {"losses": losses, "fast_layers": fast, "fallbacks": sorted({str(r) for r in reasons})}


def accumulation_case(device: torch.device) -> dict:
    """Two micro-batches' backward, the first inside ``distributed.no_sync``: whether the sharded gradients existed
    after the first (a reduce-scatter ran) and after the second."""
    model = shard_model(lora_model("gpt2", "torch", torch.float64), device)
    head, (batches, targets) = LastTokenLM(model), make_steps(model.config.vocab_size, device)[0]
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    seen = []
    for i, (batch, target) in enumerate(zip(batches[:2], targets[:2], strict=True)):
        with distributed.no_sync(head) if i == 0 else contextlib.nullcontext():
            logits = head(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["last_index"])
            torch.nn.functional.cross_entropy(logits, target).backward()
        seen.append(sum(p.grad is not None for p in trainable_params))
    return {"sharded_grads_after_each_backward": seen, "trainable": len(trainable_params)}


def lockstep_case(device: torch.device) -> dict:
    """Rank 0 runs three forwards in ``lockstep``, the others one: every process leaves, rank 0's outputs are one
    process's, and the others ran placeholders until rank 0 was done. Then ``full_parameters(write_back=True)``, and
    ``merge_lora`` on the sharded weights (refused)."""
    rank = dist.get_rank()
    model = _model("gpt2", torch.float64)
    apply_lora(model, _targets("gpt2"), r=4, alpha=8)
    alone = copy.deepcopy(model).to(device).eval()
    shard_model(model, device).eval()
    calls = []
    model.transformer.h[0].register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.arange(1, 13, device=device).view(2, 6)
    outs = []
    with torch.no_grad(), lockstep(model):
        for i in range(3 if rank == 0 else 1):
            outs.append(model(input_ids=ids + i).logits)
    expect = [alone(input_ids=ids + i).logits for i in range(len(outs))]
    same = all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(outs, expect, strict=True))
    with full_parameters(model, write_back=True):
        first = next(layer for layer in model.modules() if isinstance(layer, LoRALinear))
        whole_type = type(first.lora_A).__name__
        with torch.no_grad():
            first.lora_A.fill_(0.25)
    after = trainable(model)
    try:
        merge_lora(model)
        merge = "merged"
    except RuntimeError as exc:
        merge = str(exc)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, len(calls))
    if rank != 0:
        return {}
    return {
        "outputs_match_one_process": same,
        "block0_forwards_per_rank": counts,
        "gathered_type": whole_type,
        "written_back": bool((after["transformer.h.0.attn.c_attn.lora_A"] == 0.25).all()),
        "others_untouched": bool((after["transformer.h.1.attn.c_attn.lora_A"] != 0.25).all()),
        "sharded_after": isinstance(first.lora_A, DTensor),
        "merge": merge,
    }


def main(argv: list[str]) -> int:
    out, device_type = argv[0], argv[2] if argv[1:2] == ["--device"] else "cpu"
    rank, _, device = distributed.setup(distributed.resolve_device(device_type))
    results = {"lockstep": lockstep_case(device), "accumulation": accumulation_case(device)}
    for name, case in (CPU_CASES if device.type == "cpu" else CUDA_CASES).items():
        results[name] = lora_case(*case, device)
    if device.type == "cpu":
        results |= {"peft-unpatched": peft_case(False, device), "peft-patched": peft_case(True, device)}
    if rank == 0:
        torch.save(results, out)
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
