"""One GPT-2 training step (forward, backward, gradient clipping, AdamW), five ways, one configuration per process.

Rows (every row runs the same model: GPT-2 small, 124M parameters, random weights since no hub is reached; the
config's own dropout, 0.1 on residual, embedding and attention; SDPA attention; fp32 on CPU, fp32 weights under bf16
autocast on CUDA; LoRA r=16, alpha=32, LoRA dropout 0.05 on ``attn.c_attn`` + ``attn.c_proj``):

- ``full_ft``: every parameter trains; HF's ``model(input_ids, labels=labels).loss`` (logits at all positions).
- ``peft``: HF PEFT as commonly used: ``get_peft_model`` and HF's loss over logits at all positions.
- ``peft_patched``: the ``peft`` row plus the one call ``lora_fast.patch_peft(model)`` (its LoRA layers run
  through ``lora_linear``, ``auto`` backend); everything else as ``peft``.
- ``peft_label_logits``: the same PEFT model, logits only at the label position (HF's ``logits_to_keep``).
- ``lora_fast``: the training step of ``train_sentiment.py``: ``lora_fast.apply_lora`` (``auto`` backend),
  ``use_fused_gelu`` (GPT-2's six-op ``gelu_new`` as one ``F.gelu(approximate="tanh")``, equal to
  ~1e-6), ``LastTokenLM`` (LM head at the label position only) and ``train_step`` (``lora_fast.study``).

The task is label-token classification: each sequence of T tokens ends with its label token, and the loss is the LM
loss on that one token (HF rows: ``labels`` are -100 everywhere but the last position; label-logit rows: the logits
at position T-2, which predict it). So every row processes the same B·T tokens and computes the same loss.

Run one row: ``python -m bench.model_step --row peft`` (prints a ``RESULT {json}`` line). ``bench/run.py`` starts one
process per row, so each row's peak memory (CPU: ``ru_maxrss``, the resident-set high-water; CUDA:
``torch.cuda.max_memory_allocated``) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["ROWS", "StepConfig", "run_row"]

ROWS = ("full_ft", "peft", "peft_patched", "peft_label_logits", "lora_fast")
TARGETS = ["attn.c_attn", "attn.c_proj"]


@dataclass
class StepConfig:
    device: str = "cpu"
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


def _rss_mib() -> float:
    """Resident-set high-water of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build_gpt2(cfg: StepConfig):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(cfg.seed)
    config = GPT2Config()  # GPT-2 small: 12 layers, 768 wide, 50,257 tokens; dropout 0.1, gelu_new
    model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    return model.to(cfg.device).train()


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


def build_step(row: str, cfg: StepConfig):
    """``(step_fn, model, description)`` for ``row``; ``step_fn()`` runs one full optimizer step, returns the loss."""
    from lora_fast.study.causal_lm import LastTokenLM, use_fused_gelu
    from lora_fast.study.training import make_optimizer, train_step

    model = _build_gpt2(cfg)
    vocab = model.config.vocab_size
    input_ids, attention_mask, position_ids, labels, target = _batch(cfg, vocab)
    amp = torch.bfloat16 if cfg.device == "cuda" else None
    autocast = lambda: torch.autocast(cfg.device, dtype=amp, enabled=amp is not None)
    notes = []

    if row == "lora_fast":
        from lora_fast import apply_lora

        notes.append(f"fused GELU on {use_fused_gelu(model)} modules")
        apply_lora(model, TARGETS, cfg.r, cfg.alpha, cfg.lora_dropout, backend="auto")
        module = LastTokenLM(model)
        optimizer = make_optimizer(model, cfg.lr)
        last_index = torch.full((cfg.batch,), cfg.seq - 2, dtype=torch.long, device=cfg.device)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "last_index": last_index,
        }

        def step():
            return train_step(module, optimizer, [batch], [target], amp_dtype=amp, grad_clip=cfg.grad_clip).loss

        return step, model, notes

    if row in ("peft", "peft_patched", "peft_label_logits"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=TARGETS,
                fan_in_fan_out=True,
                task_type="CAUSAL_LM",
            ),
        )
        if row == "peft_patched":
            from lora_fast import patch_peft

            report = patch_peft(model, backend="auto", verbose=False)
            notes.append(f"patch_peft: {len(report.fast)} of {len(report.rows)} LoRA layers through lora_linear")
    elif row != "full_ft":
        raise ValueError(f"unknown row {row!r}; choose one of {ROWS}")
    optimizer = make_optimizer(model, cfg.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    keep = torch.tensor([cfg.seq - 2], device=cfg.device)

    def step():
        with autocast():
            if row == "peft_label_logits":
                logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
                loss = F.cross_entropy(logits[:, -1].float(), target)
            else:
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, model, notes


def run_row(row: str, cfg: StepConfig, profile: bool = False) -> dict:
    """Build ``row``, run ``cfg.warmup`` untimed and ``cfg.steps`` timed steps; return the measurements."""
    from lora_fast import count_parameters

    step, model, notes = build_step(row, cfg)
    trainable, total = count_parameters(model)
    sync = torch.cuda.synchronize if cfg.device == "cuda" else (lambda: None)
    rss_before = _rss_mib()
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
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
    med = statistics.median(times)
    if cfg.device == "cuda":
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    else:
        peak, kind = _rss_mib(), "cpu_ru_maxrss"
    return {
        "name": row,
        "s_per_step": med,
        "s_p25": q[0],
        "s_p75": q[2],
        "steps_timed": len(times),
        "tokens_per_s": tokens / med,
        "peak_mem_mb": peak,
        "peak_mem_kind": kind,
        "peak_mem_unit": "MiB",
        "rss_before_first_step_mb": rss_before if cfg.device == "cpu" else None,
        "trainable_params": trainable,
        "total_params": total,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "notes": notes,
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
    ap.add_argument("--row", required=True, choices=ROWS, help="which training set-up to time")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch", type=int, help="sequences per step (default 8 on CPU, 16 on CUDA)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default 128 on CPU, 512 on CUDA)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    ap.add_argument("--profile", action="store_true", help="after timing, print torch.profiler's top ops of one step")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    cfg = StepConfig(
        device=args.device,
        batch=args.batch or (16 if cuda else 8),
        seq=args.seq or (512 if cuda else 128),
        warmup=args.warmup,
        steps=args.steps,
    )
    print("RESULT " + json.dumps(run_row(args.row, cfg, profile=args.profile)), flush=True)


if __name__ == "__main__":
    main()
