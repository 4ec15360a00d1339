"""Direct Preference Optimization (Rafailov et al., 2023) with LoRA, and the pieces of its controlled-sentiment task.

For a prompt ``x`` with a preferred completion ``y_w`` and a dispreferred one ``y_l``::

    loss = -log σ(β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

with the implicit rewards ``r_w = β · (log π(y_w|x) − log π_ref(y_w|x))`` and ``r_l`` likewise, the reward margin
``r_w − r_l`` and the reward accuracy ``[r_w > r_l]``. The reference ``π_ref`` is the policy with its LoRA switched
off (``lora_fast.disable_lora``), so only one copy of the weights is held. ``log π(y|x)`` sums the next-token
log-probabilities of the completion tokens only; prompt and padding tokens are masked out.

Shapes: a packed batch holds ``input_ids (B, T)`` (prompt then completion, right-padded), ``attention_mask (B, T)``
and ``completion_mask (B, T)`` (True on the completion's tokens); logits are ``(B, T, V)``. The token at ``t`` is
predicted by the logits at ``t − 1``, so the log-prob of a sequence reads ``logits[:, :-1]`` against
``input_ids[:, 1:]`` under ``completion_mask[:, 1:]``.

The task (the DPO paper's controlled sentiment generation, on Rotten Tomatoes): prompts are the first 2–8 tokens of
reviews; the base model samples ``k`` continuations per prompt; a sentiment scorer gives each full text P(positive)
from the two label-token logits after ``"Label:"``; the best and the worst continuation form the pair. The KL to the
reference is the sequence-level ``KL = E_{y~π}[log π(y|x) − log π_ref(y|x)]``, estimated on samples from ``π`` (pure
sampling: temperature 1, no top-k, so they really come from ``π``) by summing the exact next-token KLs along each
sample, which has the same expectation with less variance.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora_fast import disable_lora
from lora_fast.study.distributed import all_sum, rank_and_world
from lora_fast.study.errors import NonFiniteError
from lora_fast.study.fsdp import lockstep
from lora_fast.study.packing import Packing, model_mask
from lora_fast.study.prompts import encode_text, text_prefix
from lora_fast.study.training import collate, grad_norm

__all__ = [
    "DPOOutput",
    "dpo_loss",
    "completion_logprobs",
    "sequence_logprobs",
    "token_kl_sum",
    "pack",
    "make_prompts",
    "sample_continuations",
    "sentiment_scores",
    "make_pairs",
    "reference_logprobs",
    "dpo_step",
    "evaluate_policy",
]

Pair = tuple[list[int], list[int], list[int]]  # (prompt ids, chosen completion ids, rejected completion ids)


@dataclass
class DPOOutput:
    """The mean loss (with its graph) and, per pair, the detached implicit rewards."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """The means over the pairs; under torch.distributed, the means over every process's pairs (each process
        holds as many, so the mean of the processes' means)."""
        margin = self.chosen_rewards - self.rejected_rewards
        values = {
            "loss": self.loss.item(),
            "reward_chosen": self.chosen_rewards.mean().item(),
            "reward_rejected": self.rejected_rewards.mean().item(),
            "reward_margin": margin.mean().item(),
            "reward_accuracy": (margin > 0).float().mean().item(),
        }
        world = rank_and_world()[1]
        if world == 1:
            return values
        sums = all_sum(list(values.values()), self.loss.device)
        return {k: v / world for k, v in zip(values, sums, strict=True)}


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """The DPO loss averaged over pairs, from the four ``(B,)`` sequence log-probs (see the module docstring)."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    # logsigmoid is the stable form of log σ: no overflow for large negative margins.
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    return DPOOutput(losses.mean(), beta * chosen_logratio.detach(), beta * rejected_logratio.detach())


def completion_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` sums of ``log p(input_ids[:, t] | input_ids[:, :t])`` over the completion tokens, in fp32 (fp64 for
    fp64 logits)."""
    targets = input_ids[:, 1:]
    # cross_entropy fuses log_softmax and the gather: no (B, T, V) log-prob tensor is kept. Upcast for the sum.
    token_logp = -F.cross_entropy(_upcast(logits[:, :-1]).transpose(1, 2), targets, reduction="none")
    return token_logp.masked_fill(~completion_mask[:, 1:], 0.0).sum(-1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B,)`` log π(y|x) of a batch from ``pack``: right-padded (positions count from 0, as GPT-2 expects), or
    packed (``packing.pack_rows``), where the LM head runs only at the tokens that predict a completion token, each
    shared one once."""
    if batch["attention_mask"].dim() == 4:
        return _packed_logprobs(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return completion_logprobs(logits, batch["input_ids"], batch["completion_mask"])


def _packed_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sequence_logprobs`` of a packed batch: the body over the packed rows, then for every distinct node that is a
    completion token (``token_index`` at the rows' completion positions) the log-probability its parent's logits give
    it, summed along each row."""
    hidden = model.base_model(
        input_ids=batch["input_ids"],
        attention_mask=model_mask(model, batch["attention_mask"]),
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state.flatten(0, 1)  # (R·T', C)
    row, t = batch["completion_mask"][:, 1:].nonzero(as_tuple=True)  # the token at t + 1, predicted at t
    nodes, parents = batch["token_index"][row, t + 1], batch["token_index"][row, t]
    unique, inverse = torch.unique(nodes, return_inverse=True)
    parent = torch.empty_like(unique).scatter_(0, inverse, parents)  # a node has one parent, whichever row reads it
    logits = model.get_output_embeddings()(hidden[parent])  # (U, V)
    token_logp = -F.cross_entropy(_upcast(logits), batch["input_ids"].flatten()[unique], reduction="none")
    out = torch.zeros(batch["completion_mask"].shape[0], dtype=token_logp.dtype, device=token_logp.device)
    return out.index_add(0, row, token_logp[inverse])


def token_kl_sum(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``Σ_t KL(π(·|x, y_<t) || π_ref(·|x, y_<t))`` over the positions ``mask (B, T)`` marks, in fp32.

    Averaged over sampled ``y ~ π`` this is the sequence-level KL, with less variance than the mean log-ratio
    ``log π(y|x) − log π_ref(y|x)`` and never negative (the exact KL of each next-token distribution is summed)."""
    logp = F.log_softmax(policy_logits.float(), dim=-1)
    logq = F.log_softmax(ref_logits.float(), dim=-1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return per_token.masked_fill(~mask, 0.0).sum(-1)


def pack(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    device=None,
    packing: Packing | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad ``prompt + completion`` rows (``collate``) into ``input_ids`` and ``attention_mask`` ``(B, T)``, with
    ``completion_mask (B, T)`` True on each row's completion tokens; or, with a ``packing`` other than ``off``, lay
    them out packed (``packing.pack_rows``: a prompt the rows share is computed once), ``completion_mask`` then
    indexing each row's tokens as its ``token_index`` does."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    batch = (packing or Packing()).batch(rows, pad_id, "right", device or "cpu")
    cols = torch.arange(max(map(len, rows)), device=batch["input_ids"].device)
    starts = torch.tensor([len(p) for p in prompts], device=cols.device)
    ends = torch.tensor([len(r) for r in rows], device=cols.device)
    completion = (cols[None, :] >= starts[:, None]) & (cols[None, :] < ends[:, None])
    if batch["attention_mask"].dim() == 4:
        return {**batch, "completion_mask": completion}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "completion_mask": completion}


def make_prompts(
    texts: Sequence[str], tokenizer, n: int, min_tokens: int = 2, max_tokens: int = 8, seed: int = 0
) -> list[list[int]]:
    """``n`` prompts: the first ``L ~ U{min_tokens..max_tokens}`` tokens of ``n`` reviews drawn without replacement,
    after the tokenizer's prefix (``prompts.text_prefix``: its BOS, where it adds one)."""
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"prompt lengths need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng, prefix = random.Random(seed), text_prefix(tokenizer)
    order = list(range(len(texts)))
    rng.shuffle(order)
    prompts = []
    for i in order:
        ids = tokenizer.encode(texts[i], add_special_tokens=False)
        length = rng.randint(min_tokens, max_tokens)
        if len(ids) > length:  # keep prompts that leave the review unfinished
            prompts.append([*prefix, *ids[:length]])
        if len(prompts) == n:
            break
    if len(prompts) < n:
        raise ValueError(f"only {len(prompts)} of the {len(texts)} texts are long enough for {n} prompts")
    return prompts


@torch.no_grad()
def sample_continuations(
    model: nn.Module, prompts: Sequence[Sequence[int]], k: int, max_new_tokens: int, eos_id: int
) -> list[list[list[int]]]:
    """``k`` continuations per prompt, sampled from ``model`` at temperature 1 (no top-k/top-p), each cut after its
    first EOS (kept: it is a token the policy chose). Prompts of equal length go through ``generate`` together, so
    no padding enters a prompt. Seed the global RNG for repeatable samples."""
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[list[list[int]]] = [[] for _ in prompts]
    with lockstep(model):  # processes sharing a sharded model: the same number of forwards
        for length in sorted(by_length):
            idx = by_length[length]
            ids = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=device)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=k,
                pad_token_id=eos_id,
                eos_token_id=eos_id,
                synced_gpus=False,  # lockstep keeps a sharded model's processes in step
            )[:, length:].tolist()
            for j, row in enumerate(gen):  # rows come prompt-major: k per prompt
                cut = row.index(eos_id) + 1 if eos_id in row else len(row)
                out[idx[j // k]].append(row[:cut])
    return out


def sample_texts(tokenizer, pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> list[str]:
    """The text of each ``(prompt, sampled continuation)``, for the scorer: without the tokenizer's prefix before the
    prompt (``make_prompts`` put it there: a BOS, where it adds one) and the EOS that ended the sample; the scorer's
    tokenizer adds its own prefix."""
    prefix, eos = text_prefix(tokenizer), tokenizer.eos_token_id
    texts = []
    for prompt, sample in pairs:
        body = list(prompt)[len(prefix) :] if list(prompt[: len(prefix)]) == prefix else list(prompt)
        texts.append(tokenizer.decode(body + [t for t in sample if t != eos]))
    return texts


@torch.no_grad()
def sentiment_scores(
    scorer: nn.Module,
    tokenizer,
    texts: Sequence[str],
    build_prompt: Callable[[str], str],
    label_ids: tuple[int, int],
    batch_size: int = 32,
) -> torch.Tensor:
    """``(len(texts),)`` P(positive) = softmax over the (negative, positive) label-token logits after ``"Label:"``.

    Left padding with positions counted from each row's first real token, and only the last position's logits are
    computed (``logits_to_keep=1``): one ``(B, V)`` row per text instead of ``(B, T, V)``."""
    device = next(scorer.parameters()).device
    neg, pos = label_ids
    scores, prefix = [], text_prefix(tokenizer)
    with lockstep(scorer):
        for start in range(0, len(texts), batch_size):
            rows = [encode_text(tokenizer, build_prompt(t), prefix) for t in texts[start : start + batch_size]]
            batch = collate(rows, tokenizer.eos_token_id, "left", device)
            logits = scorer(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                logits_to_keep=1,
            ).logits[:, -1]
            scores.append(torch.softmax(logits[:, [neg, pos]].float(), dim=-1)[:, 1].cpu())
    return torch.cat(scores)


def make_pairs(
    prompts: Sequence[Sequence[int]], samples: Sequence[Sequence[Sequence[int]]], scores: Sequence[Sequence[float]]
) -> list[Pair]:
    """(prompt, best, worst) per prompt by score; prompts whose samples all score the same give no pair."""
    pairs = []
    for p, ys, ss in zip(prompts, samples, scores, strict=True):
        best = max(range(len(ys)), key=lambda i: ss[i])
        worst = min(range(len(ys)), key=lambda i: ss[i])
        if ss[best] > ss[worst]:
            pairs.append((list(p), list(ys[best]), list(ys[worst])))
    return pairs


def _pair_batch(pairs: Sequence[Pair], pad_id: int, device, packing: Packing | None = None) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows: one forward pass for both halves (packed: each pair's prompt once)."""
    prompts = [p for p, _, _ in pairs] * 2
    completions = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    return pack(prompts, completions, pad_id, device, packing)


@torch.no_grad()
def reference_logprobs(
    model: nn.Module, pairs: Sequence[Pair], pad_id: int, batch_size: int = 16, packing: Packing | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` log π_ref of every pair, computed once with LoRA disabled (they never change)."""
    device = next(model.parameters()).device
    chosen, rejected = [], []
    with disable_lora(model), lockstep(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            logp = sequence_logprobs(model, _pair_batch(chunk, pad_id, device, packing))
            chosen.append(logp[: len(chunk)].cpu())
            rejected.append(logp[len(chunk) :].cpu())
    return torch.cat(chosen), torch.cat(rejected)


def dpo_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pairs: Sequence[Pair],
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    pad_id: int,
    packing: Packing | None = None,
) -> DPOOutput:
    """One optimizer step of DPO on ``pairs`` (with their precomputed reference log-probs), padded or laid out by
    ``packing``. A NaN or inf loss or gradient norm is a ``NonFiniteError`` raised before the optimizer moves."""
    device = next(model.parameters()).device
    logp = sequence_logprobs(model, _pair_batch(pairs, pad_id, device, packing))
    out = dpo_loss(logp[: len(pairs)], logp[len(pairs) :], ref_chosen.to(device), ref_rejected.to(device), beta)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(out.loss):
        raise NonFiniteError(f"the DPO loss is {out.loss.item()}; the update was not applied")
    out.loss.backward()
    norm = grad_norm([p for g in optimizer.param_groups for p in g["params"]])
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"the gradient norm is {norm} (the DPO loss is finite); the update was not applied")
    optimizer.step()
    return out


def evaluate_policy(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    k: int,
    max_new_tokens: int,
    score: Callable[[list[str]], torch.Tensor],
    batch_size: int = 16,
) -> dict[str, float]:
    """Sample ``k`` continuations per prompt from the policy; return the mean P(positive) of the texts (``reward``),
    the sequence-level KL to the reference on those samples (``kl``: summed per-token KLs, see ``token_kl_sum``, with
    its standard error ``kl_se``; ``kl_logratio``: the plain mean of ``log π(y|x) − log π_ref(y|x)``)."""
    eos = tokenizer.eos_token_id
    samples = sample_continuations(model, prompts, k, max_new_tokens, eos)
    flat = [(p, y) for p, ys in zip(prompts, samples, strict=True) for y in ys]
    texts = sample_texts(tokenizer, flat)
    rewards = score(texts)
    device = next(model.parameters()).device
    exact, sampled = [], []
    with torch.no_grad(), lockstep(model):
        for start in range(0, len(flat), batch_size):
            batch = pack(*zip(*flat[start : start + batch_size], strict=True), pad_id=eos, device=device)
            mask = batch["completion_mask"][:, 1:]
            policy_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with disable_lora(model):
                ref_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ids = batch["input_ids"]
            sampled.append(
                (completion_logprobs(policy_logits, ids, batch["completion_mask"])
                 - completion_logprobs(ref_logits, ids, batch["completion_mask"])).cpu()
            )  # fmt: skip
            exact.append(token_kl_sum(policy_logits[:, :-1], ref_logits[:, :-1], mask).cpu())
    kl, kl_sample = torch.cat(exact), torch.cat(sampled)
    return {
        "reward": rewards.mean().item(),
        "kl": kl.mean().item(),
        "kl_se": (kl.std() / len(kl) ** 0.5).item() if len(kl) > 1 else 0.0,
        "kl_logratio": kl_sample.mean().item(),
        "mean_length": sum(len(y) for _, y in flat) / len(flat),
        "example": texts[0],
    }
