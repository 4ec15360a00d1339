"""One training step (forward, backward, gradient clipping, AdamW) of a causal LM, five ways, one configuration per
process, and the floor: the work no LoRA method can skip.

The model: GPT-2 small (124M parameters, random weights since no hub is reached; the config's own dropout, 0.1 on
residual, embedding and attention), or with ``--model`` a real one (a folder, hub name or ``.gguf`` file, e.g.
SmolLM2-135M: its config's dropout). SDPA attention; ``--dtype`` (``auto``: bf16 autocast where the device multiplies
bf16 natively, a CPU with AMX or avx512_bf16 or a CUDA device of capability 8.0+, else fp32; every row the same, fp32
weights under autocast); LoRA
r=16, alpha=32, LoRA dropout 0.05 on the model type's default targets (``lora_fast.study.causal_lm.default_targets``:
GPT-2 ``attn.c_attn`` + ``attn.c_proj``; Llama, Mistral, Qwen ``q_proj k_proj v_proj o_proj``). Rows (``ROWS``):

- ``full_ft``: every parameter trains; HF's ``model(input_ids, labels=labels).loss`` (logits at all positions).
- ``peft``: HF PEFT as commonly used: ``get_peft_model`` and HF's loss over logits at all positions.
- ``peft_patched``: the ``peft`` row plus the one call ``lora_fast.patch_peft(model)`` (its LoRA layers run
  through ``lora_linear``, ``auto`` backend); everything else as ``peft``.
- ``peft_label_logits``: the same PEFT model, logits only at the label position (HF's ``logits_to_keep``).
- ``lora_fast``: the training step of ``train_sentiment.py``: ``lora_fast.apply_lora`` (``auto`` backend),
  ``use_fused_gelu`` (GPT-2's six-op ``gelu_new`` as one ``F.gelu(approximate="tanh")``, equal to ~1e-6; nothing to
  swap on SiLU models), ``LastTokenLM`` (LM head at the label position only; on GPT-2 the last block at the label
  rows only) and ``train_step`` (``lora_fast.study``).
- ``lora_fast_packed``: ``lora_fast`` on packed batches (``lora_fast.study.packing``, ``--packing``, default
  ``auto``: with LoRA dropout 0.05 that is ``flat``, rows end to end without padding; ``prefix`` also computes the
  batch's shared prompt prefix once).
- ``floor``: the same model frozen, run as ``lora_fast`` runs it (fused GELU, ``LastTokenLM``), forward plus backward
  down to the gradient of its input embeddings (a hook makes the embedding output a leaf that requires grad); no
  LoRA, no optimizer. Any LoRA step does at least this work: ``lora_fast / floor`` is its overhead over the limit.

A new row is one builder ``(cfg, model, targets, notes, tokenizer) -> (model, step)`` in ``BUILDERS``; ``ROWS`` and
``bench/run.py --rows`` follow it.

- ``peft_bnb4`` (optional, needs ``bitsandbytes``; not in the default ``ROWS``): QLoRA's recipe on CPU or CUDA:
  every ``nn.Linear`` of the blocks as a bitsandbytes NF4 ``Linear4bit`` (the embedding and head stay float, as
  bitsandbytes leaves them), HF PEFT's LoRA on top, logits at the label position only: PEFT's 4-bit path beside the
  packed GGUF rows.

``--keep-quantized`` loads a GGUF ``--model`` with its quantised weights packed (``lora_fast.gguf``): the rows that
train LoRA through ``lora_fast`` or run the floor (``PACKED_ROWS``) run on it; the others need float weights and are
refused. ``--dtype`` sets every row's autocast (bf16 or fp32; auto: bf16 where the device multiplies it natively).
Each result also records ``weight_mb``: the model's weights as held in memory (packed blocks at their packed size).

The task is label-token classification: each sequence of T tokens ends with its label token, and the loss is the LM
loss on that one token (HF rows: ``labels`` are -100 everywhere but the last position; label-logit rows: the logits
at position T-2, which predict it; ``lora_fast_packed`` packs the first T-1 tokens). So every row processes the same
B·T tokens and computes the same loss.

Data mode (``--data DIR``, ``bench/data_batches.py``): the study's real batches instead (Rotten Tomatoes training
reviews in ``--prompt``'s wording, ``--shots``, drawn as ``train_sentiment.py`` draws its steps, tokenised by the
model's tokenizer or ``--tokenizer``), for the rows ``lora_fast``, ``lora_fast_packed`` and ``floor`` (the HF rows'
loss needs the label token inside the batch). Tokens/s counts real prompt tokens; each row records the token rows its
layout computes per step beside the padded batch's.

Run one row: ``python -m bench.model_step --row peft [--model DIR]`` (prints a ``RESULT {json}`` line).
``bench/run.py`` starts one process per row, so each row's peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the resident-set high-water of the timed steps (Linux's ``VmHWM``, reset
after the model is built, so loading a GGUF file or building PEFT's wrappers does not count; the process's
``ru_maxrss`` where it cannot be reset).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bench.data_batches import Workload, data_inputs
from lora_fast.precision import bf16_support
from lora_fast.study.errors import UsageError
from lora_fast.study.precision import choose_precision


@dataclass
class StepConfig:
    device: str = "cpu"
    model: str | None = None  # None: GPT-2 small, random weights; else a folder, hub name or .gguf file
    batch: int = 8
    seq: int = 128
    r: int = 16
    alpha: float = 32.0
    lora_dropout: float = 0.05
    lr: float = 1e-4
    grad_clip: float = 1.0
    warmup: int = 1
    steps: int = 5
    attn_implementation: str = "sdpa"
    seed: int = 0
    data: str | None = None  # data mode: a Rotten Tomatoes folder (bench/data_batches.py)
    tokenizer: str | None = None  # data mode: the tokenizer (default: the model's)
    prompt: str = "default"
    shots: int = 0
    packing: str = "auto"  # lora_fast_packed's --packing
    dtype: str = "fp32"  # "fp32", or "bf16": every row's forward under bf16 autocast (fp32 weights)
    keep_quantized: bool = False  # a GGUF --model's quantised weights kept packed


# ---------------------------------------------------------------- memory


def _rss_mib() -> float:
    """Resident-set high-water of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_rss_peak() -> bool:
    """Reset Linux's per-process resident-set high-water (``VmHWM``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_hwm_mib() is not None
    except OSError:
        return False


def _vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            found = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


# ---------------------------------------------------------------- the model and the batch


def build_model(cfg: StepConfig):
    """``(model, targets, tokenizer)``: the row's model in training mode on ``cfg.device``, its LoRA targets, and
    ``cfg.tokenizer`` or the model's tokenizer (None for the random GPT-2 small without ``cfg.tokenizer``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    from lora_fast.study.causal_lm import default_targets, load_causal_lm

    torch.manual_seed(cfg.seed)
    tokenizer = None
    if cfg.model is None:
        config = GPT2Config()  # GPT-2 small: 12 layers, 768 wide, 50,257 tokens; dropout 0.1, gelu_new
        model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    else:
        model, tokenizer = load_causal_lm(cfg.model, dropout=None, keep_quantized=cfg.keep_quantized)
        model.set_attn_implementation(cfg.attn_implementation)
    if cfg.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(cfg.device).train(), default_targets(model.config.model_type), tokenizer


def _batch(cfg: StepConfig, vocab: int):
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    input_ids = torch.randint(0, vocab, (cfg.batch, cfg.seq), generator=gen)
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = input_ids[:, -1]  # the label token; HF shifts, so logits at T-2 predict it
    target = input_ids[:, -1].clone()
    attention_mask = torch.ones_like(input_ids)
    position_ids = torch.arange(cfg.seq).expand(cfg.batch, -1).contiguous()
    d = cfg.device
    return input_ids.to(d), attention_mask.to(d), position_ids.to(d), labels.to(d), target.to(d)


def _label_batch(cfg: StepConfig, input_ids, attention_mask, position_ids) -> dict[str, torch.Tensor]:
    """``LastTokenLM``'s inputs: the label is predicted at position T-2."""
    last_index = torch.full((cfg.batch,), cfg.seq - 2, dtype=torch.long, device=cfg.device)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "last_index": last_index}  # fmt: skip


def _label_inputs(cfg: StepConfig, model, tokenizer, packing=None):
    """``LastTokenLM``'s inputs per step, ``[(batch, target)]``, and their ``Workload``: the random batch (one, reused;
    packed, its first T-1 tokens) or the study's batches (data mode), padded or laid out by ``packing``."""
    if cfg.data is not None:
        return data_inputs(cfg, tokenizer, packing)
    input_ids, attention_mask, position_ids, _, target = _batch(cfg, model.config.vocab_size)
    if packing is None:
        batch = _label_batch(cfg, input_ids, attention_mask, position_ids)
    else:
        batch = packing.batch(input_ids[:, :-1].tolist(), 0, device=cfg.device)
    tokens = cfg.batch * cfg.seq
    return [(batch, target)], Workload(tokens, batch["input_ids"].numel(), tokens)


AMP = {"fp32": None, "bf16": torch.bfloat16}


def _autocast(cfg: StepConfig):
    amp = AMP[cfg.dtype]
    return amp, (lambda: torch.autocast(cfg.device, dtype=amp, enabled=amp is not None))


# ---------------------------------------------------------------- the rows: (cfg, model, targets, notes) -> step()


def _hf_step(cfg: StepConfig, model, label_logits_only: bool) -> Callable[[], float]:
    """HF's forward (all positions, or ``logits_to_keep`` at T-2), HF's loss, clip, AdamW."""
    from lora_fast.study.training import make_optimizer

    input_ids, attention_mask, _, labels, target = _batch(cfg, model.config.vocab_size)
    optimizer = make_optimizer(model, cfg.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    keep = torch.tensor([cfg.seq - 2], device=cfg.device)
    autocast = _autocast(cfg)[1]

    def step():
        with autocast():
            if label_logits_only:
                logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
                loss = F.cross_entropy(logits[:, -1].float(), target)
            else:
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _peft(cfg: StepConfig, model, targets: list[str]):
    from peft import LoraConfig, get_peft_model

    fan_in_fan_out = model.config.model_type == "gpt2"  # GPT-2's Conv1D stores (K, N)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                        fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, config)


def full_ft_row(cfg, model, targets, notes, tokenizer=None):
    return model, _hf_step(cfg, model, label_logits_only=False)


def peft_row(cfg, model, targets, notes, tokenizer=None):
    model = _peft(cfg, model, targets)
    return model, _hf_step(cfg, model, label_logits_only=False)


def peft_patched_row(cfg, model, targets, notes, tokenizer=None):
    from lora_fast import patch_peft

    model = _peft(cfg, model, targets)
    report = patch_peft(model, backend="auto", verbose=False)
    notes.append(f"patch_peft: {len(report.fast)} of {len(report.rows)} LoRA layers through lora_linear")
    return model, _hf_step(cfg, model, label_logits_only=False)


def peft_label_logits_row(cfg, model, targets, notes, tokenizer=None):
    model = _peft(cfg, model, targets)
    return model, _hf_step(cfg, model, label_logits_only=True)


def lora_fast_row(cfg, model, targets, notes, tokenizer=None, packed=False):
    from lora_fast import apply_lora
    from lora_fast.study.causal_lm import LastTokenLM, use_fused_gelu
    from lora_fast.study.packing import resolve_packing
    from lora_fast.study.training import make_optimizer, train_step

    notes.append(f"fused GELU on {use_fused_gelu(model)} modules")
    apply_lora(model, targets, cfg.r, cfg.alpha, cfg.lora_dropout, backend="auto")
    packing = resolve_packing(model, cfg.packing, training=True) if packed else None
    if packing is not None:
        notes.append(f"--packing {cfg.packing}: {packing.mode} ({packing.reason})")
    module = LastTokenLM(model)
    optimizer = make_optimizer(model, cfg.lr)
    inputs, work = _label_inputs(cfg, model, tokenizer, packing)
    amp, count = _autocast(cfg)[0], itertools.count()

    def step():
        batch, target = inputs[next(count) % len(inputs)]
        return train_step(module, optimizer, [batch], [target], amp_dtype=amp, grad_clip=cfg.grad_clip).loss

    step.workload = work
    return model, step


def lora_fast_packed_row(cfg, model, targets, notes, tokenizer=None):
    return lora_fast_row(cfg, model, targets, notes, tokenizer, packed=True)


def floor_row(cfg, model, targets, notes, tokenizer=None):
    """The frozen model through ``lora_fast``'s forward; backward to the input embeddings' gradient only."""
    from lora_fast.study.causal_lm import LastTokenLM, use_fused_gelu

    notes.append(f"fused GELU on {use_fused_gelu(model)} modules; frozen, gradient of the input embeddings only")
    model.requires_grad_(False)
    module = LastTokenLM(model)
    inputs, work = _label_inputs(cfg, model, tokenizer)
    count = itertools.count()
    leaves = []

    def as_leaf(_module, _args, out):  # the embedding output becomes the leaf the backward ends at
        leaves.append(out.detach().requires_grad_())
        return leaves[-1]

    model.get_input_embeddings().register_forward_hook(as_leaf)
    autocast = _autocast(cfg)[1]

    def step():
        leaves.clear()
        batch, target = inputs[next(count) % len(inputs)]
        with autocast():
            logits = module(**batch)
        loss = F.cross_entropy(logits.float(), target)
        loss.backward()
        assert leaves and leaves[0].grad is not None, "the backward did not reach the input embeddings"
        return float(loss.detach())

    step.workload = work
    return model, step


def peft_bnb4_row(cfg, model, targets, notes):
    import bitsandbytes as bnb
    from torch import nn

    head = model.get_output_embeddings()
    quantised = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module is not head:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=_autocast(cfg)[0] or torch.float32, quant_type="nf4")  # fmt: skip
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
            if module.bias is not None:
                layer.bias = module.bias
            model.set_submodule(name, layer.to(cfg.device))  # bitsandbytes quantises on the move to the device
            quantised += 1
    notes.append(f"bitsandbytes {bnb.__version__}: {quantised} nn.Linear as NF4 Linear4bit")
    model = _peft(cfg, model, targets)
    return model, _hf_step(cfg, model, label_logits_only=True)


# A new row: one builder here. Each gets a fresh model and returns (the model as timed, step); a step may carry its
# Workload (``step.workload``), else it is B·T real tokens and token rows.
BUILDERS = {
    "full_ft": full_ft_row,
    "peft": peft_row,
    "peft_patched": peft_patched_row,
    "peft_label_logits": peft_label_logits_row,
    "lora_fast": lora_fast_row,
    "lora_fast_packed": lora_fast_packed_row,
    "floor": floor_row,
    "peft_bnb4": peft_bnb4_row,
}
OPTIONAL_ROWS = ("peft_bnb4",)  # rows that need a package beyond the project's: run them by name
ROWS = tuple(r for r in BUILDERS if r not in OPTIONAL_ROWS)
DATA_ROWS = ("lora_fast", "lora_fast_packed", "floor")  # the rows with a data mode
PACKED_ROWS = ("lora_fast", "floor")  # the rows that run on a packed base (the others train or wrap float weights)
__all__ = ["ROWS", "OPTIONAL_ROWS", "DATA_ROWS", "PACKED_ROWS", "BUILDERS", "StepConfig", "build_model", "build_step",
           "run_row"]  # fmt: skip


def build_step(row: str, cfg: StepConfig):
    """``(step_fn, model, notes)`` for ``row``; ``step_fn()`` runs one step (an optimizer step, or the floor's
    forward and backward) and returns the loss."""
    if row not in BUILDERS:
        raise ValueError(f"unknown row {row!r}; choose one of {tuple(BUILDERS)}")
    if cfg.dtype not in AMP:
        raise ValueError(f"StepConfig.dtype {cfg.dtype!r}: expected one of {tuple(AMP)}")
    if cfg.data is not None and row not in DATA_ROWS:
        raise ValueError(f"row {row!r} has no data mode (its loss needs the label token in the batch): {DATA_ROWS}")
    if cfg.keep_quantized and row not in PACKED_ROWS:
        raise ValueError(f"row {row!r} needs float weights; on a packed base run {PACKED_ROWS}")
    model, targets, tokenizer = build_model(cfg)
    notes = [f"model type {model.config.model_type}, LoRA targets {targets}"]
    model, step = BUILDERS[row](cfg, model, targets, notes, tokenizer)
    return step, model, notes


def run_row(row: str, cfg: StepConfig, profile: bool = False) -> dict:
    """Build ``row``, run ``cfg.warmup`` untimed and ``cfg.steps`` timed steps; return the measurements."""
    from lora_fast import count_parameters
    from lora_fast.gguf import weight_bytes
    from lora_fast.study.causal_lm import default_targets

    step, model, notes = build_step(row, cfg)
    trainable, total = count_parameters(model)
    sync = torch.cuda.synchronize if cfg.device == "cuda" else (lambda: None)
    rss_before = _rss_mib()
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps_only = cfg.device == "cpu" and _reset_rss_peak()
    losses, times = [], []
    for i in range(cfg.warmup + cfg.steps):
        sync()
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    if profile:
        _profile(step, cfg.device)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    tokens = cfg.batch * cfg.seq
    work = getattr(step, "workload", None) or Workload(tokens, tokens, tokens)
    med = statistics.median(times)
    if cfg.device == "cuda":
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    elif steps_only:
        peak, kind = _vm_hwm_mib(), "cpu_vmhwm_steps"
    else:
        peak, kind = _rss_mib(), "cpu_ru_maxrss"
    model_type = getattr(model.config, "model_type", None)
    return {
        "name": row + ("+packed" if cfg.keep_quantized else ""),
        "model_type": model_type,
        "targets": default_targets(model_type),
        "s_per_step": med,
        "s_p25": q[0],
        "s_p75": q[2],
        "steps_timed": len(times),
        "tokens_per_s": work.real_tokens / med,
        "real_tokens_per_step": work.real_tokens,
        "token_rows_per_step": work.token_rows,
        "padded_token_rows_per_step": work.padded_token_rows,
        "peak_mem_mb": peak,
        "peak_mem_kind": kind,
        "peak_mem_unit": "MiB",
        "rss_before_first_step_mb": rss_before if cfg.device == "cpu" else None,
        "trainable_params": trainable,
        "total_params": total,
        "weight_mb": weight_bytes(model) / 2**20,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "notes": notes,
        "dtype": cfg.dtype,
        "bf16_support": bf16_support(cfg.device).as_dict(),  # what this device's bf16 is: the CPU's flags
        "config": asdict(cfg),
        "threads": torch.get_num_threads(),
        # The machine's 1-minute load average when the row finished: above the core count, other work competed.
        "load_avg_1min": os.getloadavg()[0],
    }


def _profile(step, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", required=True, choices=tuple(BUILDERS), help="which training set-up to time")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", help="a model folder, hub name or .gguf file (default: GPT-2 small, random weights)")
    ap.add_argument("--batch", type=int, help="sequences per step (default 8 on CPU, 16 on CUDA)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default 128 on CPU, 512 on CUDA)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    ap.add_argument("--profile", action="store_true", help="after timing, print torch.profiler's top ops of one step")
    ap.add_argument("--data", help="data mode: a Rotten Tomatoes folder; the study's batches (module docstring)")
    ap.add_argument("--tokenizer", help="data mode: the tokenizer folder (default: the model's)")
    ap.add_argument("--prompt", default="default", help="data mode: the study's instruction (default, complex, ...)")
    ap.add_argument("--shots", type=int, default=0, help="data mode: solved examples in every prompt")
    ap.add_argument("--packing", default="auto", choices=("auto", "prefix", "flat", "off"), help="lora_fast_packed's")
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (auto packs prefix only at 0)")
    ap.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="bf16: the step under bf16 autocast (fp32 weights); auto: bf16 where the device multiplies it natively",
    )
    ap.add_argument("--keep-quantized", action="store_true", help="a GGUF --model's quantised weights kept packed")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    try:
        dtype = choose_precision(args.dtype, torch.device(args.device), fp16=False).dtype
    except UsageError as exc:
        ap.error(str(exc))
    cfg = StepConfig(
        device=args.device,
        model=args.model,
        batch=args.batch or (16 if cuda else 8),
        seq=args.seq or (512 if cuda else 128),
        warmup=args.warmup,
        steps=args.steps,
        lora_dropout=args.lora_dropout,
        data=args.data,
        tokenizer=args.tokenizer,
        prompt=args.prompt,
        shots=args.shots,
        packing=args.packing,
        dtype=dtype,
        keep_quantized=args.keep_quantized,
    )
    print("RESULT " + json.dumps(run_row(args.row, cfg, profile=args.profile)), flush=True)


if __name__ == "__main__":
    main()
