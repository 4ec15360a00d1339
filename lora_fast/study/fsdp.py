"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the study's runs: each process holds 1/N of every weight.

``shard_model`` applies ``fully_shard`` to each transformer block, then to the model itself (the root: embeddings,
final norm, LM head). Every parameter is then a ``DTensor`` sharded on its first dimension; before a block's forward
FSDP all-gathers that block's weights into ordinary tensors, the forward runs on them (``LoRALinear`` reads
``base.weight``, ``lora_A`` and ``lora_B`` at every call, so every backend sees plain unsharded tensors), and after
it the block frees them again; the backward gathers them once more and reduce-scatters the gradients.

LoRA's A and B are sharded like the frozen weights, not replicated: they ride in the same all-gather as their block
(one collective per block, not one more per LoRA layer), their gradients come back reduce-scattered with the block's,
and AdamW's two moments per weight live on one shard each. Replicating them would need a separate all-reduce of
their gradients and N copies of the optimizer state, to save nothing: they are a few percent of the block's bytes.

Three rules follow from FSDP's collectives, each one handled here:

- Every process must run the same number of forwards. Training does (equal micro-batches); scoring, sampling and
  generation split their examples between processes and stop early at different points, so they run inside
  ``lockstep(model)``: every forward first tells the others it is running one, and a process that has finished keeps
  running one-token forwards, their results dropped, until all have.
- Whole values, for files: ``full_parameters(model)`` swaps each trainable ``DTensor`` for an ordinary tensor holding
  its whole value (gathered by every process; the trainable weights are small), so the code that writes or reads
  PEFT files works unchanged; ``write_back=True`` puts what was loaded into them back into the shards.
- Gradient accumulation without a reduce-scatter per micro-batch: ``gradient_sync(model, False)`` around the
  micro-batches before the last one (FSDP keeps their unsharded gradients and reduces once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from lora_fast.study.bottleneck import BLOCK_LISTS

__all__ = [
    "block_list",
    "shard_model",
    "is_sharded",
    "reshard",
    "lockstep",
    "full_parameters",
    "gradient_sync",
    "parameter_bytes",
]


def block_list(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the ``nn.ModuleList`` at a path ending in one of ``BLOCK_LISTS``
    (``transformer.h``, ``model.layers``; under a PEFT model ``base_model.model.model.layers``). A ValueError naming
    the model when it has none."""
    for name, module in model.named_modules():
        known = any(name == p or name.endswith("." + p) for p in BLOCK_LISTS)
        if known and isinstance(module, nn.ModuleList) and len(module):
            return module
    raise ValueError(
        f"{type(model).__name__} has none of the known lists of transformer blocks {list(BLOCK_LISTS)}: FSDP shards "
        f"one block at a time and cannot find them"
    )


def shard_model(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> nn.Module:
    """``fully_shard`` every transformer block, then the model (the root), over all processes of the running group,
    on ``device``; returns ``model`` (sharded in place; FSDP moves each unit's shards to ``device``).

    ``amp_dtype`` (bf16 or fp16, where the run uses autocast) becomes FSDP's mixed-precision policy: the weights are
    gathered and computed in that dtype, their gradients reduced in fp32 into fp32 shards (the master weights)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model needs a running process group (torchrun; distributed.setup starts it)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else None
    policy = policy or MixedPrecisionPolicy()
    for block in block_list(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 root (``shard_model``'s result, or any ``fully_shard``-ed module)."""
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Every FSDP module of ``model`` back to its shards. After a forward without a backward (evaluation) FSDP keeps
    the root's gathered weights registered in place of its shards, expecting the backward to need them next; code
    that reads the parameters (files, checkpoints, the optimizer's view) wants the shards."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def lockstep(model: nn.Module) -> Iterator[None]:
    """Inside the block each process may run a different number of forwards of ``model`` (different examples, a
    ``generate`` that stops early); on leaving, a process that ran fewer runs one-token forwards of ``model`` (no
    gradient, results dropped) until every process has left, and the weights go back to their shards (``reshard``).
    A no-op unless ``model`` is sharded. Every process must enter and leave it together, like any collective.

    Mechanism: a forward pre-hook, ahead of FSDP's own, all-reduces a 1 before each forward; a process that has left
    the block all-reduces a 0 and runs one forward for as long as the sum says another process is still running
    one, so each process issues the same collectives in the same order. Transformers' own ``synced_gpus`` does this
    inside one ``generate``; callers pass ``synced_gpus=False``, since its extra all-reduce would not be matched
    here."""
    if not is_sharded(model):
        yield
        return
    if _world() == 1:
        try:
            yield
        finally:
            reshard(model)
        return
    device, state = _device(model), {"left": False}

    def announce(_module, args, kwargs):
        if not state["left"]:
            dist.all_reduce(torch.ones((), dtype=torch.int64, device=device))
        return args, kwargs

    handle = model.register_forward_pre_hook(announce, prepend=True, with_kwargs=True)
    try:
        yield
    finally:
        state["left"] = True
        try:
            while True:
                running = torch.zeros((), dtype=torch.int64, device=device)
                dist.all_reduce(running)
                if int(running) == 0:
                    break
                with torch.no_grad():
                    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
        finally:
            handle.remove()
            reshard(model)


@contextlib.contextmanager
def full_parameters(model: nn.Module, write_back: bool = False) -> Iterator[nn.Module]:
    """Inside the block every trainable parameter of a sharded ``model`` is an ordinary tensor holding its whole
    value, on every process (each is gathered: a collective, so all processes enter together); outside it they are
    the shards again. With ``write_back``, the values the block wrote into them (an adapter loaded) are scattered
    back into the shards on a normal exit; on an exception the shards are left as they were. A model that is not
    sharded is yielded as it is. Tied parameters stay tied (one gathered tensor in each place)."""
    if not is_sharded(model):
        yield model
        return
    reshard(model)
    gathered: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    places = []
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if not (param.requires_grad and isinstance(param, DTensor)):
                    continue
                if id(param) not in gathered:
                    gathered[id(param)] = (param, nn.Parameter(param.full_tensor(), requires_grad=True))
                places.append((module, name, param))
    for module, name, param in places:
        setattr(module, name, gathered[id(param)][1])
    try:
        yield model
    finally:
        for module, name, param in places:
            setattr(module, name, param)
    if write_back:
        with torch.no_grad():
            for shard, whole in gathered.values():
                shard.copy_(distribute_tensor(whole.detach(), shard.device_mesh, shard.placements))


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """With ``enabled=False``, the backward passes inside the block keep their gradients unsharded and unreduced
    (FSDP's ``set_requires_gradient_sync``); the next backward outside reduces them all at once."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def parameter_bytes(model: nn.Module, frozen_only: bool = False) -> tuple[int, int]:
    """``(held by this process, whole model)`` bytes of ``model``'s parameters (with ``frozen_only``, of those that do
    not train); tied parameters count once. On a sharded model this process holds its shards (FSDP pads dim 0 to a
    multiple of the process count; the padding is not counted)."""
    reshard(model)
    local = whole = 0
    for param in model.parameters():
        if frozen_only and param.requires_grad:
            continue
        size = param.element_size()
        whole += param.numel() * size
        local += (param.to_local() if isinstance(param, DTensor) else param).numel() * size
    return local, whole
