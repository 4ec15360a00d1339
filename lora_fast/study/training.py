"""The training step for label-token classification with a causal LM (the forward is ``causal_lm.LastTokenLM``).

Batches are padded per batch to their own longest prompt (dynamic padding), on the right or the left; position ids
count real tokens only, so both sides give the same logits. The data order is a pure function of the seed and the
step, so a resumed run draws exactly the data an uninterrupted one would. ``train_step`` accumulates gradients over
micro-batches (with DDP's ``no_sync``, or FSDP's gradient sync off, on all but the last), runs under autocast on CUDA
(with a GradScaler for fp16), clips, and refuses a non-finite loss or gradient norm before the optimizer moves (with a
GradScaler, a non-finite gradient is the scaler's to handle: it skips that step and lowers its scale).
"""

from __future__ import annotations

import contextlib
import math
import resource
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import get_constant_schedule_with_warmup

from lora_fast.study.distributed import all_sum, no_sync, rank_and_world
from lora_fast.study.errors import NonFiniteError
from lora_fast.study.prompts import EncodedSplit

__all__ = [
    "StepResult",
    "collate",
    "make_optimizer",
    "make_scheduler",
    "step_indices",
    "micro_batches",
    "step_batches",
    "train_step",
    "grad_norm",
    "peak_memory_mb",
]


def collate(
    sequences: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right", device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Pad ``sequences`` to their own longest length. Returns ``input_ids``, ``attention_mask``, ``position_ids``
    (0, 1, … over real tokens on either side) and ``last_index`` (each sequence's last real position)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    lengths = torch.tensor([len(s) for s in sequences])
    if (lengths == 0).any():
        raise ValueError("empty sequence in batch")
    B, T = len(sequences), int(lengths.max())
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, seq in enumerate(sequences):
        n = len(seq)
        cols = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[i, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, cols] = 1
    position_ids = (mask.cumsum(1) - 1).clamp_(min=0)
    last_index = lengths - 1 if padding_side == "right" else torch.full((B,), T - 1, dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "last_index": last_index}
    return {k: v.to(device) for k, v in out.items()}


# ---------------------------------------------------------------- optimizer, schedule, data order


def make_optimizer(
    model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, nanoGPT's grouping: matrices (incl. LoRA's A and B) decay, biases and
    norms do not. Fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' constant schedule with a linear warm-up from 0 over ``warmup_steps`` (the study: constant)."""
    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=max(0, int(warmup_steps)))


def step_indices(n_examples: int, global_batch: int, step: int, seed: int) -> list[int]:
    """The example indices of optimizer step ``step`` (0-based): consecutive slices of a stream of epochs, each a
    fresh permutation from ``seed`` and the epoch number. A pure function of its arguments, so a resumed run draws
    exactly the data the uninterrupted one would have."""
    out, pos = [], step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(pos, n_examples)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_examples, generator=gen)
        take = min(global_batch - len(out), n_examples - offset)
        out += perm[offset : offset + take].tolist()
        pos += take
    return out


def micro_batches(
    indices: Sequence[int],
    lengths: Sequence[int],
    batch_size: int,
    group_by_length: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """Split one step's indices into micro-batches of ``batch_size`` and return this rank's share (every
    ``world_size``-th). With ``group_by_length`` the step's examples are sorted by length first, so each micro-batch
    pads less; the step still sees the same examples, so its gradient is unchanged."""
    idx = list(indices)
    if len(idx) % (batch_size * world_size):
        raise ValueError(
            f"{len(idx)} examples per step do not split into micro-batches of {batch_size} over "
            f"{world_size} process(es)"
        )
    if group_by_length:
        idx.sort(key=lambda i: (-lengths[i], i))
    chunks = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    return chunks[rank::world_size]


def step_batches(
    split: EncodedSplit,
    step: int,
    global_batch: int,
    batch_size: int,
    seed: int,
    pad_id: int,
    padding_side: str = "right",
    group_by_length: bool = True,
    device: torch.device | str = "cpu",
    packing=None,
) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """This process's micro-batches of ``split`` for optimizer step ``step`` (0-based) and their label token ids:
    ``step_indices``, cut by ``micro_batches``, padded by ``collate`` or, with ``packing`` (a
    ``packing.Packing``), laid out by its ``batch``; the inputs of ``train_step``."""
    rank, world = rank_and_world()
    indices = step_indices(len(split), global_batch, step, seed)
    chunks = micro_batches(indices, [len(s) for s in split.sequences], batch_size, group_by_length, rank, world)
    lay_out = collate if packing is None else packing.batch
    batches = [lay_out([split.sequences[i] for i in c], pad_id, padding_side, device) for c in chunks]
    labels = [torch.tensor([split.targets[i] for i in c], device=device) for c in chunks]
    return batches, labels


# ---------------------------------------------------------------- the step


@dataclass
class StepResult:
    loss: float  # mean over the step's examples, across processes
    tokens: int  # real (unpadded) prompt tokens of the step, across processes
    grad_norm: float


def train_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[torch.Tensor],
    scheduler=None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float = 1.0,
) -> StepResult:
    """One optimizer step over ``batches`` (this rank's micro-batches, from ``collate`` or ``packing.pack_rows``)
    with label ids ``targets``.

    ``module`` is a ``LastTokenLM``, or DDP around one, or one around a sharded model (``distributed.place``). Each
    micro-batch's mean loss is scaled by ``1 / len(batches)``, so with equal micro-batches the gradient is the mean
    over the step (DDP and FSDP average ranks).
    """
    device = batches[0]["input_ids"].device
    total = torch.zeros((), dtype=torch.float64, device=device)  # the step's loss, summed in fp64 whatever the model's
    tokens = 0
    for i, (batch, target) in enumerate(zip(batches, targets, strict=False)):
        with contextlib.nullcontext() if i == len(batches) - 1 else no_sync(module):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = module(
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["position_ids"],
                    batch["last_index"],
                    row_index=batch.get("row_index"),
                )
            loss = F.cross_entropy(logits.float(), target)
            scaled = loss / len(batches)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach()
        tokens += int(batch["lengths"].sum()) if "lengths" in batch else int(batch["attention_mask"].sum())
    loss_sum, tokens = all_sum([float(total) / len(batches), tokens], device)
    loss_value = loss_sum / rank_and_world()[1]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"the loss is {loss_value}; the update was not applied")
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = grad_clip and grad_clip > 0
    norm = _value(torch.nn.utils.clip_grad_norm_(params, grad_clip)) if clip else grad_norm(params)
    if not math.isfinite(norm) and scaler is None:  # the norm is the same on every process: all stop together
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"the gradient norm is {norm} (the loss, {loss_value:.4g}, is finite); the update was not applied"
        )
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_value, tokens=int(tokens), grad_norm=norm)


def _value(norm: torch.Tensor) -> float:
    """A norm as a float; over sharded gradients (FSDP) the norm is a DTensor whose whole value needs a reduction."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def grad_norm(params: Sequence[torch.Tensor]) -> float:
    """The global L2 norm of the gradients of ``params`` (those that have one), as ``clip_grad_norm_`` computes it;
    sharded gradients give the norm over every shard."""
    grads = [p.grad for p in params if p.grad is not None]
    return _value(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """``(MB, kind)``: CUDA's peak allocated memory, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"
