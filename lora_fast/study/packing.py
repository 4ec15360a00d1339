"""Packed batches: every token of a batch computed once, by the label-token forward (``LastTokenLM``), its training
step, the evaluation and DPO (``--packing``).

A padded batch of ``B`` rows computes ``B·T`` token rows through every linear layer, ``T`` its longest row; with the
study's prompts a row is a quarter to a third padding, and the instruction that every row starts with is computed
once per row. The modes:

- ``off``: the padded batch (``training.collate``).
- ``flat``: the rows laid end to end without padding, in ``R`` packed rows of ``T'`` columns. Each token attends to
  the tokens before it in its own row (a block-diagonal causal mask) and its position counts from 0 in its row.
- ``prefix``: also, the tokens that several rows start with are computed once: the rows form a prefix tree (one node
  per distinct prefix), laid out depth first; each node attends to its ancestors and itself and its position is its
  depth. The batch's common prompt prefix (``"Instruction: …\\nText:"``) is computed once per packed row, and in DPO
  each pair's prompt once for its two answers.
- ``auto``: ``prefix`` where it is exact (evaluation; training with no dropout active), ``flat`` otherwise.

Why it is exact: with causal attention a token's hidden states depend only on the tokens before it in its row and on
their positions, so the packed forward computes each row's states as the padded one does (up to summation order), a
shared node holds the value every row through it would compute, and its gradient sums those rows' contributions as
the padded batch sums them. Dropout is where it stops: a node computed once draws one mask for every row through it,
so the rows' draws are no longer independent. ``flat`` keeps one draw per token (a different draw from the padded
batch's, of the same law); ``prefix`` shares a shared node's draw across its rows; ``auto`` takes ``prefix`` only
when no dropout is active (``active_dropout``).

How many packed rows: over a packed row the attention is dense (SDPA with a mask computes every query-key pair), so
one row of ``N`` tokens costs ``N²`` pairs where ``B`` padded rows cost ``B·T²``. The packer takes the number of
packed rows ``R`` that minimises the estimated multiply-adds ``R·T'·(1 + pair_cost·T')``, ``pair_cost`` being one
query-key pair relative to one token through a block's linear layers (``pair_cost``: ~2e-4 for GPT-2 small, ~3e-4
for SmolLM2-135M). ``flat`` puts the rows, longest first, into the shortest packed row; ``prefix`` cuts the rows,
sorted by their tokens (so rows that share a prefix are neighbours), into ``R`` runs, each a prefix tree.

The mask reaches the model as a 4-D ``(R, 1, T', T')`` tensor, which transformers 5.x (5.17 to 5.25:
``masking_utils._preprocess_mask_arguments``) hands to the attention as it is, with ``position_ids``: a boolean one
(True: may attend) for SDPA, an additive one (0 or the dtype's lowest value) for eager attention, which adds it
(``model_mask``). Columns past a packed row's tokens are padding that attends to itself only: a query row with every
key masked would give NaN, and NaN times a zero gradient is NaN in the backward. Families: GPT-2 (absolute positions)
and Llama (rotary), whose forwards take both; any other model, or another attention implementation, runs ``off``
(``packing_support`` says why, and the scripts print it).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lora_fast.layers import LoRALinear, is_linear_layer
from lora_fast.study.training import collate

__all__ = [
    "PACKING_MODES",
    "PACKING_MODEL_TYPES",
    "PACKING_ATTENTION",
    "Packing",
    "packing_support",
    "active_dropout",
    "pair_cost",
    "resolve_packing",
    "pack_rows",
    "model_mask",
    "common_prefix",
    "prefix_cached_forward",
]

PACKING_MODES = ("auto", "prefix", "flat", "off")
# Model types whose forward takes a 4-D mask and per-token positions and whose positions are the only place a token's
# index enters (absolute for GPT-2, rotary for Llama). Mistral and Qwen have sliding-window attention, which HF builds
# into its own mask: a custom mask would skip it, so they are not here.
PACKING_MODEL_TYPES = ("gpt2", "llama")
PACKING_ATTENTION = ("sdpa", "eager")


def packing_support(model: nn.Module) -> str | None:
    """None when ``model`` runs packed batches exactly; else why not, in a few words."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKING_MODEL_TYPES:
        return f"model type {model_type!r} has no packed form (packing: {', '.join(PACKING_MODEL_TYPES)})"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKING_ATTENTION:
        return f"attention {attention!r} takes no 4-D mask (packing: {', '.join(PACKING_ATTENTION)})"
    if getattr(config, "reorder_and_upcast_attn", False) or getattr(config, "add_cross_attention", False):
        return "GPT-2 with reorder_and_upcast_attn or cross-attention has no packed form"
    return None


def active_dropout(model: nn.Module) -> list[str]:
    """The dropouts that ``model`` applies in its current mode, as ``"name p"``: ``nn.Dropout`` modules, LoRA's
    dropout and the attention dropout that Llama-like attention modules keep as a number; empty in eval mode."""
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.Dropout) and module.p > 0:
            found.append(f"{name} {module.p:g}")
        elif isinstance(module, LoRALinear) and module.dropout > 0:
            found.append(f"{name} (LoRA) {module.dropout:g}")
        elif isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout > 0:
            found.append(f"{name}.attention_dropout {module.attention_dropout:g}")
    return found


def pair_cost(model: nn.Module) -> float:
    """Multiply-adds of one attention query-key pair (``2·H·D``: the score and the value) over those of one token
    through a transformer block's linear layers (their weights' sizes), from ``model``'s first block."""
    body = getattr(model, "base_model", model)
    blocks = next(
        (getattr(body, n) for n in ("h", "layers") if isinstance(getattr(body, n, None), nn.ModuleList)), None
    )
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no list of transformer blocks (base_model.h or base_model.layers)")
    linear = sum(m.weight.numel() for m in blocks[0].modules() if is_linear_layer(m))
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    width = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or width // heads
    return 2.0 * heads * head_dim / linear


@dataclass(frozen=True)
class Packing:
    """A resolved ``--packing``: ``mode`` is ``off``, ``flat`` or ``prefix``; ``pair_cost`` sizes the packed rows
    (see the module docstring); ``reason`` says why this mode, for the run's log."""

    mode: str = "off"
    pair_cost: float = 0.0
    reason: str = ""

    def __post_init__(self):
        if self.mode not in ("off", "flat", "prefix"):
            raise ValueError(f"Packing.mode must be 'off', 'flat' or 'prefix', got {self.mode!r}")

    def batch(
        self,
        sequences: Sequence[Sequence[int]],
        pad_id: int,
        padding_side: str = "right",
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """``sequences`` as one batch: ``collate``'s padded one (``off``, on ``padding_side``), or ``pack_rows``'s."""
        if self.mode == "off":
            return collate(sequences, pad_id, padding_side, device)
        return pack_rows(sequences, pad_id, self.mode == "prefix", self.pair_cost, device)


def resolve_packing(model: nn.Module, requested: str | Packing, training: bool) -> Packing:
    """``requested`` (a ``--packing`` choice) for ``model``: ``off`` where ``packing_support`` refuses the model,
    ``auto`` as ``prefix`` for evaluation (``training`` False) or training with no ``active_dropout``, else
    ``flat``. A ``Packing`` is returned as it is."""
    if isinstance(requested, Packing):
        return requested
    if requested not in PACKING_MODES:
        raise ValueError(f"packing must be one of {PACKING_MODES}, got {requested!r}")
    if requested == "off":
        return Packing("off", reason="padded batches")
    refused = packing_support(model)
    if refused:
        return Packing("off", reason=f"{refused}: padded batches")
    cost = pair_cost(model)
    if requested != "auto":
        return Packing(requested, cost, reason="as asked")
    if not training:
        return Packing("prefix", cost, reason="evaluation has no dropout")
    dropout = active_dropout(model)
    if dropout:
        more = f" and {len(dropout) - 1} more" if len(dropout) > 1 else ""
        return Packing("flat", cost, reason=f"dropout is active ({dropout[0]}{more}): a shared prefix would share it")
    return Packing("prefix", cost, reason="no dropout is active")


# ---------------------------------------------------------------- laying rows out


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n, i = min(len(a), len(b)), 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _flat_groups(lengths: Sequence[int], n: int) -> list[list[int]]:
    """Rows, longest first, each into the packed row with the fewest tokens so far (LPT); empty ones dropped."""
    heap = [(0, r) for r in range(n)]
    groups: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, r = heapq.heappop(heap)
        groups[r].append(i)
        heapq.heappush(heap, (load + lengths[i], r))
    return [g for g in groups if g]


def _prefix_groups(order: list[int], new: list[int], lengths: Sequence[int], n: int) -> list[list[int]]:
    """``order`` (rows sorted by their tokens) cut into at most ``n`` runs with the smallest largest tree: ``new[k]``
    is the nodes row ``order[k]`` adds after its predecessor (a run's first row adds its whole length)."""

    def cut(capacity: int) -> list[list[int]]:
        runs, size = [], 0
        for k, i in enumerate(order):
            if runs and size + new[k] <= capacity:
                runs[-1].append(i)
                size += new[k]
            else:
                runs.append([i])
                size = lengths[i]
        return runs

    lo, hi = max(lengths), sum(lengths)  # the least capacity that cuts into at most n runs, by bisection
    while lo < hi:
        mid = (lo + hi) // 2
        if len(cut(mid)) <= n:
            hi = mid
        else:
            lo = mid + 1
    return cut(lo)


def _group_tokens(rows: Sequence[Sequence[int]], share: bool) -> int:
    """Nodes of one packed row: the rows' lengths, less (with ``share``) what each shares with its predecessor."""
    total = len(rows[0])
    for prev, row in zip(rows, rows[1:], strict=False):
        total += len(row) - (_common(prev, row) if share else 0)
    return total


def _candidates(b: int) -> list[int]:
    """Packed-row counts to try: 1..8, then about 1.25 times apart, and ``b``."""
    out, n = [], 1
    while n < b:
        out.append(n)
        n = n + 1 if n < 8 else int(n * 1.25)
    return out + [b]


def _choose_groups(sequences: Sequence[Sequence[int]], share: bool, cost: float) -> list[list[int]]:
    """The grouping of rows into packed rows with the least estimated multiply-adds ``R·T'·(1 + cost·T')``."""
    lengths = [len(s) for s in sequences]
    if share:
        order = sorted(range(len(sequences)), key=lambda i: (list(sequences[i]), i))
        new = [lengths[order[0]]] + [
            lengths[i] - _common(sequences[j], sequences[i]) for j, i in zip(order, order[1:], strict=False)
        ]
    best, best_cost = None, None
    for n in _candidates(len(sequences)):
        groups = _prefix_groups(order, new, lengths, n) if share else _flat_groups(lengths, n)
        width = max(_group_tokens([sequences[i] for i in g], share) for g in groups)
        estimate = len(groups) * width * (1.0 + cost * width)
        if best_cost is None or estimate < best_cost:
            best, best_cost = groups, estimate
    return best


def pack_rows(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    share: bool,
    pair_cost: float = 0.0,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """``sequences`` packed: ``share`` False is ``flat``, True ``prefix`` (see the module docstring). Returns

    - ``input_ids``, ``position_ids`` ``(R, T')`` (padding columns: ``pad_id``, position 0);
    - ``attention_mask`` ``(R, 1, T', T')`` bool, True where the query (dim 2) may attend the key (dim 3);
    - ``row_index``, ``last_index`` ``(B,)``: where each sequence's last token is, as ``collate``'s ``last_index``;
    - ``token_index`` ``(B, L)`` (``L`` the longest sequence): each token's flat index ``row · T' + column``, 0 past
      the sequence's end; ``lengths`` ``(B,)``.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pack_rows needs one or more sequences, none empty")
    groups = _choose_groups(sequences, share, pair_cost)  # with share, runs of rows in token order
    width = max(_group_tokens([sequences[i] for i in g], share) for g in groups)
    R, B, L = len(groups), len(sequences), max(len(s) for s in sequences)
    input_ids = torch.full((R, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, width), dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(R, 1, 1)  # padding columns see themselves only
    token_index = torch.zeros((B, L), dtype=torch.long)
    causal = torch.ones((L, L), dtype=torch.bool).tril()
    for r, group in enumerate(groups):
        used, before, before_cols = 0, None, None  # columns taken so far; the previous sequence and its columns
        for i in group:
            seq = torch.as_tensor(list(sequences[i]), dtype=torch.long)
            n = len(seq)
            keep = _common(sequences[before], sequences[i]) if share and before is not None else 0
            # The sequence's columns: its first ``keep`` tokens are its predecessor's nodes, the rest new ones.
            cols = (
                torch.cat([before_cols[:keep], torch.arange(used, used + n - keep)])
                if keep
                else torch.arange(used, used + n)
            )
            new = cols[keep:]
            input_ids[r, new] = seq[keep:]
            position_ids[r, new] = torch.arange(keep, n)  # a node's position is its depth
            mask[r][new[:, None], cols[None, :]] = causal[keep:n, :n]  # a new node sees its ancestors and itself
            token_index[i, :n] = cols + r * width
            used, before, before_cols = used + n - keep, i, cols
    lengths = torch.tensor([len(s) for s in sequences])
    last = token_index[torch.arange(B), lengths - 1]
    out = {
        "input_ids": input_ids,
        "attention_mask": mask.unsqueeze(1),
        "position_ids": position_ids,
        "row_index": last // width,
        "last_index": last % width,
        "token_index": token_index,
        "lengths": lengths,
    }
    return {k: v.to(device) for k, v in out.items()}


def model_mask(model: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A packed batch's boolean 4-D mask as ``model``'s attention takes it: as it is for SDPA; for eager attention,
    which adds it to the scores, 0 where allowed and the lowest value of the model's dtype elsewhere."""
    if getattr(model.config, "_attn_implementation", None) != "eager":
        return mask
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


# ---------------------------------------------------------------- generation: the prefix's keys and values, shared


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """The length of the token prefix every sequence starts with, less one where a sequence is all prefix (so every
    row keeps a token of its own after it)."""
    first, n = sequences[0], min(len(s) for s in sequences)
    p = min(_common(first, s) for s in sequences)
    return min(p, n - 1)


def prefix_cached_forward(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    cache_name: str,
    share: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[object, dict[str, torch.Tensor]]:
    """``model``'s forward over ``sequences`` for generation: with ``share``, their common prefix (``common_prefix``)
    runs once as a sequence of its own, and its keys and values are repeated across the batch
    (``Cache.batch_repeat_interleave``); then every row's own tokens run, left-padded after the prefix, so the
    columns are ``[prefix | padding | own tokens]``. Without ``share`` (or with no common prefix) it is one
    left-padded forward.

    Returns ``(out, batch)``: the model's output, with the logits at the last column (every row's last token) and the
    cache ``cache_name`` of every column, from which ``generate`` continues; and ``batch``, the layout's 2-D
    ``input_ids`` and ``attention_mask`` ``(B, p + S)``, which ``generate``'s input starts with (its position ids,
    counted from the mask, are the rows' own). Positions count real tokens, so each row is computed at the positions
    it has alone; the padding is masked."""
    p = common_prefix(sequences) if share else 0
    own = collate([s[p:] for s in sequences], pad_id, "left", device)
    B = len(sequences)
    cache = {}
    if p:
        prefix = torch.tensor([list(sequences[0][:p])], device=own["input_ids"].device)
        first = model(input_ids=prefix, position_ids=torch.arange(p, device=prefix.device)[None], use_cache=True,
                      logits_to_keep=1)  # fmt: skip
        first[cache_name].batch_repeat_interleave(B)
        cache = {cache_name: first[cache_name]}
        own = {
            "input_ids": torch.cat([prefix.expand(B, -1), own["input_ids"]], 1),
            "attention_mask": torch.cat([torch.ones_like(prefix).expand(B, -1), own["attention_mask"]], 1),
            "position_ids": own["position_ids"] + p,
        }
    out = model(
        input_ids=own["input_ids"][:, p:],
        attention_mask=own["attention_mask"],
        position_ids=own["position_ids"],
        use_cache=True,
        logits_to_keep=1,
        **cache,
    )
    return out, {"input_ids": own["input_ids"], "attention_mask": own["attention_mask"]}
