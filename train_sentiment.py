"""Fine-tune GPT-2 to label rotten_tomatoes reviews positive/negative, and score it: a reproduction of a
nanoGPT-based LoRA study (gpt2-medium, r=128, α=512), with its two flaws fixed (see docs/TRAINING.md).

    python train_sentiment.py --preset study                       # the study's run
    python train_sentiment.py --sweep study --out runs/study       # its three experiments, resumable
    python train_sentiment.py --model /tmp/tiny --data-dir ../shared/data/rotten_tomatoes --max-steps 20
    torchrun --nproc_per_node 2 train_sentiment.py ...             # DDP, unchanged

A run writes config.json, metrics.jsonl, summary.json, adapter_best/, adapter_last/, val_loss.png to --out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_fast.study.cli import dataclass_parser, opt

# ---------------------------------------------------------------- configuration

METHODS = ("lora", "full", "bitfit", "adapter")
PROMPTS = ("default", "simple1", "simple2", "similar", "complex", "cot")


@dataclass
class Config:
    # model and data
    model: str = opt("gpt2", "hub name (gpt2, gpt2-medium, ...) or a local folder with weights and tokenizer")
    tokenizer: str | None = opt(None, "tokenizer folder or hub name, when --model's folder has none")
    data_dir: str | None = opt(
        None,
        "local rotten_tomatoes folder: train/validation/test as .jsonl or .parquet "
        "(default: load from the Hugging Face hub)",
    )
    dataset: str = opt("rotten_tomatoes", "hub dataset name, used without --data-dir")
    prompt: str = opt("default", "instruction wording (see docs/TRAINING.md)", choices=PROMPTS)
    instruction: str | None = opt(None, "instruction text to use instead of --prompt's")
    shots: int = opt(0, "k labelled train examples placed in every prompt (in-context few-shot)")
    max_length: int = opt(256, "prompt tokens kept (cut from the left, so 'Label:' stays)")
    # method
    method: str = opt(
        "lora",
        "lora, full (fine-tune everything), bitfit (biases only), adapter (bottleneck adapters)",
        choices=METHODS,
    )
    r: int = opt(16, "LoRA rank")
    alpha: float = opt(64.0, "LoRA alpha; scaling = alpha / r (alpha / sqrt(r) with --rslora)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA branch's input")
    targets: list = opt(["attn.c_attn", "attn.c_proj"], "modules to wrap with LoRA (PEFT suffix rule)", nargs="+")
    rslora: bool = opt(False, "rank-stabilised scaling alpha / sqrt(r)")
    fused: bool = opt(False, "LoRA backend 'auto': the fused Triton kernels on CUDA (the torch backend on CPU)")
    backend: str | None = opt(
        None,
        "advanced: force the LoRA backend (reference, torch, triton, auto); default torch, or auto with --fused",
        choices=("auto", "reference", "torch", "triton"),
    )
    adapter_dim: int = opt(4, "bottleneck width for --method adapter")
    dropout: float = opt(0.0, "the model's own dropout (residual, embedding, attention), e.g. for --method full")
    # optimisation
    lr: float = opt(2.5e-4, "AdamW learning rate (constant after warm-up)")
    betas: list = opt([0.9, 0.95], "AdamW betas", nargs=2, type=float)
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices (biases and norms get none)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps")
    batch_size: int = opt(8, "sequences per micro-batch (per process)")
    grad_accum: int = opt(
        1,
        "micro-batches per optimizer step over all processes; step = batch-size x grad-accum "
        "sequences, whatever the number of processes",
    )
    max_steps: int = opt(100, "optimizer steps")
    train_subset: int | None = opt(None, "train on a shuffled subset of this many train examples")
    seed: int = opt(42, "seed of the subset, the data order, the initialisation and dropout")
    # evaluation
    eval_every: int = opt(10, "validation loss every this many steps (the best one is kept as adapter_best)")
    max_val: int | None = opt(None, "score at most this many validation examples")
    max_test: int | None = opt(None, "score at most this many test examples")
    eval_batch_size: int = opt(32, "sequences per evaluation batch")
    gen_tokens: int = opt(3, "tokens generated for the study's generation metric")
    generation: bool = opt(True, "also score with the study's generation metric")
    zero_shot: bool = opt(True, "score the untrained model on the test set first")
    eval_only: bool = opt(False, "no training: score the model (with --adapter, if given) on the test set")
    adapter: str | None = opt(None, "with --eval-only: a saved adapter_best/ or adapter_last/ folder of --method")
    # speed and memory
    device: str = opt("auto", "cpu, cuda, cuda:N (auto: cuda when present; torchrun: cuda:LOCAL_RANK)")
    dtype: str = opt(
        "auto",
        "autocast dtype on CUDA (auto: bf16, or fp16 with a GradScaler where bf16 is missing); CPU runs fp32",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    grad_checkpointing: bool = opt(False, "recompute activations in backward (less memory, ~30% more time)")
    group_by_length: bool = opt(True, "sort each step's examples by length before cutting micro-batches")
    padding_side: str = opt("right", "pad prompts on the right or the left (same results)", choices=("right", "left"))
    fused_gelu: bool = opt(True, "replace GPT-2's elementwise gelu_new by torch's tanh GELU (same values)")
    # outputs, robustness, experiments
    out: str | None = opt(None, "run folder (default runs/<timestamp>)")
    checkpoint_every: int | None = opt(
        None, "write the resume checkpoint every this many steps (default: --eval-every)"
    )
    resume: bool = opt(False, "continue the run in --out from its checkpoint")
    stop_after_step: int | None = opt(None, "testing: exit after this step's checkpoint, as if killed")
    preset: str | None = opt(
        None, "'study': all of the study's hyper-parameters; explicit flags override", choices=("study",)
    )
    sweep: str | None = opt(
        None,
        "'study' (ranks, alphas, prompts) or 'methods': sub-runs under --out, each in its own process, "
        "resumable, with a markdown table and one val-loss plot",
        choices=("study", "methods"),
    )


PRESETS = {
    "study": dict(
        model="gpt2-medium",
        method="lora",
        r=128,
        alpha=512.0,
        lora_dropout=0.05,
        lr=2.5e-4,
        betas=[0.9, 0.95],
        weight_decay=0.1,
        grad_clip=1.0,
        batch_size=32,
        grad_accum=4,
        max_steps=80,
        train_subset=5000,
        seed=42,
        eval_every=5,
        prompt="default",
        warmup_steps=0,
    ),
}


def parse_config(argv: list[str] | None = None) -> Config:
    """Defaults, then the preset (or the study sweep's preset), then the flags given explicitly."""
    given = vars(dataclass_parser(Config, __doc__).parse_args(argv))
    preset = given.get("preset") or ("study" if given.get("sweep") == "study" else None)
    values = {**PRESETS.get(preset, {}), **given}
    return Config(**values)


# ---------------------------------------------------------------- set-up


class UsageError(RuntimeError):
    """A bad flag or combination; printed as one line."""


def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: one process group (nccl on CUDA, gloo on CPU)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device(f"cuda:{local}" if world > 1 or cfg.device == "auto" else cfg.device)
    else:
        device = torch.device("cpu" if cfg.device == "auto" else cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def amp_setup(cfg: Config, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    if device.type != "cuda" or cfg.dtype == "fp32":
        return None, None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dtype, (torch.amp.GradScaler("cuda") if dtype == torch.float16 else None)


def prepare_model(cfg: Config, device: torch.device, log):
    """Load the model, add the method's trainable parts (or load --adapter), return (model, tokenizer)."""
    from lora_fast import apply_lora, load_adapter
    from lora_fast.study.training import load_causal_lm, use_fused_gelu

    model, tokenizer = load_causal_lm(cfg.model, cfg.tokenizer, dropout=cfg.dropout)
    if cfg.fused_gelu:
        use_fused_gelu(model)
    backend = cfg.backend or ("auto" if cfg.fused else "torch")
    if cfg.fused and device.type != "cuda" and cfg.backend is None:
        log("--fused: no CUDA device, so LoRA runs the torch backend (the Triton kernels need a GPU)")
    torch.manual_seed(cfg.seed)
    if cfg.eval_only:
        if cfg.adapter and cfg.method == "lora":
            load_adapter(model, cfg.adapter, backend=backend)
        elif cfg.adapter:
            from lora_fast.study.registry import load_weights

            load_weights(model, cfg.method, cfg.adapter)
    elif cfg.method == "lora":
        apply_lora(model, cfg.targets, cfg.r, cfg.alpha, cfg.lora_dropout, cfg.rslora, backend)
    elif cfg.method == "bitfit":
        from lora_fast.study.methods import prepare_bitfit  # imported only where used

        model = prepare_bitfit(model)
    elif cfg.method == "adapter":
        from lora_fast.study.methods import apply_bottleneck_adapters

        model = apply_bottleneck_adapters(model, cfg.adapter_dim)
    return model.to(device), tokenizer


# ---------------------------------------------------------------- one run


def score(cfg, model, tokenizer, seqs, prompts, labels, label_ids, device, amp_dtype) -> dict:
    """Test accuracy by the two label-token logits and, with --generation, by the study's generate-and-match."""
    from lora_fast.study.evaluate import generation_accuracy, label_accuracy

    pad, bs = tokenizer.pad_token_id, cfg.eval_batch_size
    acc = label_accuracy(model, seqs, labels, label_ids, pad, bs, device, amp_dtype, cfg.padding_side)
    res = {"label_acc": acc["acc"]}
    if cfg.generation:
        gen = generation_accuracy(
            model, tokenizer, prompts, labels, bs, device, cfg.gen_tokens, amp_dtype, cfg.max_length
        )
        res.update(gen_acc=gen["acc"], gen_invalid=gen["invalid"])
    return res


def run(cfg: Config, rank: int, world: int, device: torch.device) -> dict:
    """Train and score one configuration in ``cfg.out``; returns the summary."""
    import torch.distributed as dist
    from tqdm import tqdm

    from lora_fast import count_parameters
    from lora_fast.io import atomic_write_json
    from lora_fast.study.checkpoint import load_checkpoint, save_checkpoint
    from lora_fast.study.data import load_splits, subset
    from lora_fast.study.evaluate import val_loss
    from lora_fast.study.prompts import build_prompt, encode_prompt, label_token_ids, resolve_instruction
    from lora_fast.study.registry import load_weights, save_weights
    from lora_fast.study.report import append_metrics, plot_val_loss, trim_metrics, versions
    from lora_fast.study.training import (
        LastTokenLM,
        NonFiniteLossError,
        collate,
        make_optimizer,
        make_scheduler,
        micro_batches,
        peak_memory_mb,
        step_indices,
        train_step,
    )

    main = rank == 0
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    barrier = dist.barrier if world > 1 else (lambda: None)
    out = Path(cfg.out)
    if cfg.resume and (out / "summary.json").is_file():
        log(f"{out}: finished already, skipped")
        return json.loads((out / "summary.json").read_text())
    if cfg.grad_accum % world:
        raise UsageError(f"--grad-accum {cfg.grad_accum} must be a multiple of the {world} processes")
    if cfg.eval_only and cfg.adapter and not Path(cfg.adapter).is_dir():
        raise UsageError(f"--adapter {cfg.adapter}: no such folder")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", dataclasses.asdict(cfg))
    t_start = time.time()
    random.seed(cfg.seed)

    # --- data and prompts
    splits = load_splits(cfg.data_dir, cfg.dataset)
    instruction = resolve_instruction(cfg.prompt, cfg.instruction)
    shots = [(r["text"], r["label"]) for r in subset(splits["train"], cfg.shots, cfg.seed + 1)] if cfg.shots else []
    train = subset(splits["train"], cfg.train_subset, cfg.seed)
    val = subset(splits["validation"], cfg.max_val, cfg.seed)
    test = subset(splits["test"], cfg.max_test, cfg.seed)
    model, tokenizer = prepare_model(cfg, device, log)
    max_len = min(cfg.max_length, getattr(model.config, "n_positions", cfg.max_length))
    label_ids = label_token_ids(tokenizer)
    prompts = {
        name: [build_prompt(r["text"], instruction, shots) for r in rows]
        for name, rows in (("train", train), ("val", val), ("test", test))
    }
    seqs = {name: [encode_prompt(tokenizer, p, max_len) for p in ps] for name, ps in prompts.items()}
    test_labels = [r["label"] for r in test]
    amp_dtype, scaler = amp_setup(cfg, device)
    trainable, total = count_parameters(model)
    pad = tokenizer.pad_token_id

    def test_scores():
        return score(cfg, model, tokenizer, seqs["test"], prompts["test"], test_labels, label_ids, device, amp_dtype)

    summary = {
        "method": cfg.method,
        "model": cfg.model,
        "prompt": cfg.instruction or cfg.prompt,
        "shots": cfg.shots,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100 * trainable / total,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "device": str(device),
        "world_size": world,
        "versions": versions(),
    }
    if cfg.eval_only:
        summary["test"] = {"eval": test_scores()}
        summary["wall_time_s"] = time.time() - t_start
        summary["peak_memory_mb"], summary["peak_memory_kind"] = peak_memory_mb(device)
        if main:
            atomic_write_json(out / "summary.json", summary)
        return summary

    # --- training state
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    head = LastTokenLM(model)
    ddp_ids = [device] if device.type == "cuda" else None
    module = torch.nn.parallel.DistributedDataParallel(head, device_ids=ddp_ids) if world > 1 else head
    optimizer = make_optimizer(model, cfg.lr, tuple(cfg.betas), cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps)
    global_batch = cfg.batch_size * cfg.grad_accum
    data_order = {"seed": cfg.seed, "global_batch": global_batch, "n_train": len(train)}
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    step, best, zero_shot = 0, {"val_loss": math.inf, "step": None}, None
    if cfg.resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, model, optimizer, scheduler, scaler)
        if state["extra"]["data_order"] != data_order:
            raise UsageError(
                f"--resume: {ckpt_path} was written with data order {state['extra']['data_order']}, "
                f"this run has {data_order}"
            )
        step, best, zero_shot = state["step"], state["extra"]["best"], state["extra"]["zero_shot"]
        log(f"resumed from {ckpt_path} at step {step}")
        if main:
            trim_metrics(metrics_path, step)
    elif main and metrics_path.is_file():
        metrics_path.unlink()
    if zero_shot is None:
        zero_shot = test_scores() if cfg.zero_shot else None
        log(f"zero-shot test: {zero_shot}")

    # --- the loop
    lengths = [len(s) for s in seqs["train"]]
    targets = [label_ids[r["label"]] for r in train]
    val_targets = [label_ids[r["label"]] for r in val]
    checkpoint_every = cfg.checkpoint_every or cfg.eval_every
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not main, dynamic_ncols=True)
    tokens_seen, train_time = 0, 0.0
    while step < cfg.max_steps:
        t0 = time.time()
        indices = step_indices(len(train), global_batch, step, cfg.seed)
        chunks = micro_batches(indices, lengths, cfg.batch_size, cfg.group_by_length, rank, world)
        batches = [collate([seqs["train"][i] for i in c], pad, cfg.padding_side, device) for c in chunks]
        labels = [torch.tensor([targets[i] for i in c], device=device) for c in chunks]
        try:
            res = train_step(
                module,
                optimizer,
                batches,
                labels,
                scheduler=scheduler,
                scaler=scaler,
                amp_dtype=amp_dtype,
                grad_clip=cfg.grad_clip,
            )
        except NonFiniteLossError as e:
            raise UsageError(f"step {step + 1}: {e}; stopped. The last good checkpoint is {ckpt_path}") from None
        step += 1
        tokens = torch.tensor(float(res.tokens), device=device)
        if world > 1:
            dist.all_reduce(tokens)
        dt = time.time() - t0
        tokens_seen, train_time = tokens_seen + int(tokens), train_time + dt
        mem, _ = peak_memory_mb(device)
        record = {
            "step": step,
            "train_loss": res.loss,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": res.grad_norm,
            "tokens_per_s": float(tokens) / dt,
            "peak_memory_mb": mem,
        }
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            record["val_loss"] = val_loss(
                model, seqs["val"], val_targets, pad, cfg.eval_batch_size, device, amp_dtype, cfg.padding_side
            )
            if record["val_loss"] < best["val_loss"]:
                best = {"val_loss": record["val_loss"], "step": step}
                if main:
                    save_weights(model, tokenizer, cfg.method, out / "adapter_best")
        if main:
            append_metrics(metrics_path, record)
        if step % checkpoint_every == 0 or step == cfg.max_steps:
            if main:
                extra = {"data_order": data_order, "best": best, "zero_shot": zero_shot}
                save_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, step, extra)
            barrier()
        bar.update(1)
        bar.set_postfix(loss=f"{res.loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if cfg.stop_after_step == step:
            bar.close()
            log(f"--stop-after-step {step}: stopped after the checkpoint")
            return {"stopped_at": step}
    bar.close()

    # --- final scores: last, then best
    if main:
        save_weights(model, tokenizer, cfg.method, out / "adapter_last")
    barrier()
    last = test_scores()
    if best["step"] == step or best["step"] is None:
        best_scores = dict(last)
    else:
        load_weights(model, cfg.method, out / "adapter_best")
        best_scores = test_scores()
    mem, mem_kind = peak_memory_mb(device)
    summary.update(
        test={"zero_shot": zero_shot, "best": best_scores, "last": last},
        best_step=best["step"],
        best_val_loss=best["val_loss"],
        steps=step,
        wall_time_s=time.time() - t_start,
        tokens_per_s=tokens_seen / train_time if train_time else None,
        peak_memory_mb=mem,
        peak_memory_kind=mem_kind,
    )
    if main:
        atomic_write_json(out / "summary.json", summary)
        plot_val_loss({"": metrics_path}, out / "val_loss.png")
    return summary


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    from lora_fast.study.data import DataError
    from lora_fast.study.report import print_summary
    from lora_fast.study.sweep import SweepError, run_sweep
    from lora_fast.study.training import ModelLoadError

    cfg = parse_config(argv)
    try:
        if cfg.sweep:  # the parent only starts sub-runs (each in its own process) and gathers their summaries
            run_sweep(cfg, Path(__file__).resolve())
            return 0
        rank, world, device = setup_distributed(cfg)
        if cfg.out is None:
            stamp = [time.strftime("%Y%m%d-%H%M%S")]
            if world > 1:
                torch.distributed.broadcast_object_list(stamp, src=0)
            cfg = dataclasses.replace(cfg, out=str(Path("runs") / stamp[0]))
        summary = run(cfg, rank, world, device)
        if rank == 0 and "test" in summary:
            print_summary(summary)
    except (DataError, ModelLoadError, UsageError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
