"""Fine-tune GPT-2 to label rotten_tomatoes reviews positive/negative, and score it: a reproduction of a
nanoGPT-based LoRA study (gpt2-medium, r=128, α=512), with its two flaws fixed (see docs/TRAINING.md).

    python train_sentiment.py --preset study                       # the study's run
    python train_sentiment.py --sweep study --out runs/study       # its three experiments, resumable
    python train_sentiment.py --model /tmp/tiny --data-dir path/to/rotten_tomatoes --max-steps 20
    torchrun --nproc_per_node 2 train_sentiment.py ...             # DDP, unchanged
    torchrun --nproc_per_node 2 train_sentiment.py --parallel fsdp ...  # FSDP2: 1/2 of every weight per process

A run writes config.json, metrics.jsonl, summary.json, adapter_best/, adapter_last/, val_loss.png and checkpoint.pt
(checkpoint.dcp/ with --parallel fsdp) to --out, a folder it creates once the flags are checked and the model and data
have loaded. An --out that holds a run already is refused unless --resume (continue it) or --overwrite (start it
afresh) says which.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_fast import BACKENDS, AdapterError
from lora_fast.io import atomic_write_json, recover_directory
from lora_fast.study import distributed
from lora_fast.study.causal_lm import LastTokenLM, default_targets, load_causal_lm, max_positions, use_fused_gelu
from lora_fast.study.checkpoint import (
    SHARDED_CHECKPOINT,
    check_resume_config,
    checkpoint_path,
    require_finite,
    resume,
    resume_path,
    save_checkpoint,
)
from lora_fast.study.cli import (
    NONZERO,
    check_numbers,
    dataclass_parser,
    opt,
    parse_flags,
    report_errors,
    require_modules,
)
from lora_fast.study.data import load_splits, subset
from lora_fast.study.errors import NonFiniteError, UsageError
from lora_fast.study.evaluate import score_split, val_loss
from lora_fast.study.fsdp import full_parameters, is_sharded
from lora_fast.study.gguf import split_gguf
from lora_fast.study.hub import check_hub_inputs
from lora_fast.study.interrupt import INTERRUPTED_EXIT_CODE, StopRequest, resume_command
from lora_fast.study.methods import METHOD_ALIASES, METHODS
from lora_fast.study.packing import PACKING_MODES, resolve_packing
from lora_fast.study.precision import DTYPES, Precision, check_resumed_dtype, choose_precision
from lora_fast.study.progress import phase, progress
from lora_fast.study.prompts import INSTRUCTIONS, encode_split, resolve_instruction
from lora_fast.study.report import (
    append_metrics,
    check_out,
    format_scores,
    parameter_summary,
    plot_val_loss,
    print_summary,
    start_run_folder,
    timed,
    trim_metrics,
    versions,
)
from lora_fast.study.sweep import SWEEPS, run_sweep
from lora_fast.study.training import make_optimizer, make_scheduler, peak_memory_mb, step_batches, train_step

# ---------------------------------------------------------------- configuration


@dataclass
class Config:
    # model and data
    model: str = opt("gpt2", "hub name (gpt2, gpt2-medium, ...), a folder with weights and tokenizer, or a .gguf file")
    gguf_file: str | None = opt(None, "the GGUF file to load from --model's folder (or hub repository), dequantised")
    keep_quantized: bool = opt(
        False, "keep a GGUF --model's quantised weights packed (4-8 bit in memory, dequantised per layer just in time)"
    )
    tokenizer: str | None = opt(None, "tokenizer folder or hub name, when --model's folder has none")
    data_dir: str | None = opt(None, "local folder: train/validation/test as .jsonl or .parquet (default: the hub)")
    dataset: str = opt("rotten_tomatoes", "hub dataset name, used without --data-dir")
    prompt: str = opt("default", "instruction wording (see docs/TRAINING.md)", choices=tuple(INSTRUCTIONS))
    instruction: str | None = opt(None, "instruction text to use instead of --prompt's")
    shots: int = opt(0, "k labelled train examples placed in every prompt (in-context few-shot)")
    max_length: int = opt(
        256,
        "prompt tokens kept (the text cut from the left after the tokenizer's BOS, if any, so 'Label:' stays), at "
        "most the model's positions",
    )
    # method
    method: str = opt(
        "lora",
        "lora, full (everything), bitfit (biases), bottleneck (Houlsby adapters; 'adapter' still works)",
        choices=(*METHODS, *METHOD_ALIASES),
    )
    r: int = opt(16, "LoRA rank")
    alpha: float = opt(64.0, "LoRA alpha; scaling = alpha / r (alpha / sqrt(r) with --rslora)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA branch's input")
    targets: list | None = opt(
        None,
        "modules to wrap with LoRA (PEFT suffix rule); default per model type: GPT-2 attn.c_attn attn.c_proj; "
        "Llama, Mistral, Qwen2/3 q_proj k_proj v_proj o_proj",
        nargs="+",
    )
    rslora: bool = opt(False, "rank-stabilised scaling alpha / sqrt(r)")
    backend: str = opt(
        "torch",
        "LoRA backend: torch, triton (fused kernels, CUDA), auto (triton on CUDA, torch elsewhere), reference",
        choices=BACKENDS,
        shorthand=("fused", "auto", "--backend auto: the fused Triton kernels on CUDA (the torch backend on CPU)"),
    )
    bottleneck_dim: int = opt(4, "bottleneck width for --method bottleneck", alias="adapter_dim")
    model_dropout: float = opt(
        0.0, "the model's own dropout (residual, embedding, attention), e.g. for --method full", alias="dropout"
    )
    # optimisation
    lr: float = opt(2.5e-4, "AdamW learning rate (constant after warm-up)")
    betas: list = opt([0.9, 0.95], "AdamW betas", nargs=2, type=float)
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices (biases and norms get none)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    warmup_steps: int = opt(0, "linear learning-rate warm-up from 0 over this many steps")
    batch_size: int = opt(8, "sequences per micro-batch (per process)")
    grad_accum: int = opt(1, "micro-batches per step over all processes: a step is batch-size x grad-accum sequences")
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
    adapter: str | None = opt(
        None,
        "a saved adapter_best/ or adapter_last/ folder of --method: scored with --eval-only; otherwise training "
        "starts from its weights (they must fit --method's flags: LoRA's --r, --alpha, --targets) with a fresh "
        "optimizer and schedule",
    )
    # speed and memory
    device: str = opt("auto", "cpu, cuda, cuda:N (auto: cuda when present; torchrun: cuda:LOCAL_RANK)")
    dtype: str = opt(
        "auto",
        "autocast; weights, optimizer and loss stay fp32 (auto: bf16 where the device multiplies it natively: CUDA "
        "8.0+, a CPU with AMX or avx512_bf16; else fp16 + GradScaler on CUDA, fp32 on a CPU)",
        choices=DTYPES,
    )
    grad_checkpointing: bool = opt(False, "recompute activations in backward (less memory, ~30% more time)")
    parallel: str = opt(
        "ddp",
        "under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: each holds 1/N of every weight; "
        "docs/DISTRIBUTED.md)",
        choices=distributed.PARALLEL,
    )
    group_by_length: bool = opt(True, "sort each step's examples by length before cutting micro-batches")
    padding_side: str = opt("right", "pad prompts on the right or the left (same results)", choices=("right", "left"))
    packing: str = opt(
        "auto",
        "batches without padding: off (padded), flat (rows end to end), prefix (also each shared prompt prefix "
        "computed once), auto (prefix where exact: evaluation, and training with no dropout active; else flat); "
        "GPT-2 and Llama, other models padded (docs/TRAINING.md)",
        choices=PACKING_MODES,
    )
    fused_gelu: bool = opt(True, "replace GPT-2's elementwise gelu_new by torch's tanh GELU (same values)")
    # outputs, robustness, experiments
    out: str | None = opt(None, "run folder (default runs/<timestamp>)")
    checkpoint_every: int | None = opt(None, "steps between resume checkpoints (default: --eval-every)")
    resume: bool = opt(False, "continue the run in --out from its checkpoint (a finished run is skipped)")
    overwrite: bool = opt(False, "start afresh in an --out that holds a run: its run files are replaced")
    stop_after_step: int | None = opt(None, "testing: exit after this step's checkpoint, as if killed")
    preset: str | None = opt(
        None,
        "'study': the study's hyper-parameters; 'study-cpu': the same sized for a ~135M model on a 2-core CPU "
        "(docs/TRAINING.md); explicit flags override",
        choices=("study", "study-cpu"),
    )
    sweep: str | None = opt(None, "sub-runs in --out, one process each, resumable; a table", choices=tuple(SWEEPS))


STUDY = dict(method="lora", r=128, alpha=512.0, lora_dropout=0.05, lr=2.5e-4, betas=[0.9, 0.95], weight_decay=0.1,
             grad_clip=1.0, train_subset=5000, seed=42, prompt="default", warmup_steps=0)  # fmt: skip
PRESETS = {
    "study": dict(**STUDY, model="gpt2-medium", batch_size=32, grad_accum=4, max_steps=80, eval_every=5),
    # 40 steps of 32 (1,280 examples), validation on 256 every 10 steps: a training row with the default prompt takes
    # ~13-15 min on 2 CPU cores (SmolLM2-135M; docs/TRAINING.md has the measurements).
    "study-cpu": dict(**STUDY, batch_size=32, grad_accum=1, max_steps=40, eval_every=10, max_val=256,
                      checkpoint_every=20),
}  # fmt: skip


def parse_config(argv: list[str] | None = None) -> Config:
    """Defaults, then the preset (or the study sweep's preset), then the flags given explicitly; a former method
    name becomes its new one, with a note."""
    given = parse_flags(dataclass_parser(Config, __doc__), Config, argv)
    if given.get("method") in METHOD_ALIASES:
        print(f"note: --method {given['method']} is now --method {METHOD_ALIASES[given['method']]}", file=sys.stderr)
        given["method"] = METHOD_ALIASES[given["method"]]
    preset = given.get("preset") or ("study" if given.get("sweep") == "study" else None)
    return Config(**{**PRESETS.get(preset, {}), **given})


def method_params(cfg: Config) -> dict:
    """The keyword arguments of --method's ``prepare`` and ``load`` (``Method.params``), from the flags."""
    flags = {"targets": cfg.targets, "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.lora_dropout,
             "rslora": cfg.rslora, "backend": cfg.backend, "dim": cfg.bottleneck_dim}  # fmt: skip
    return {name: flags[name] for name in METHODS[cfg.method].params}


def saved_checkpoint(out: Path) -> Path | None:
    """The checkpoint a run in ``out`` has written: ``checkpoint.pt`` (one process, ddp) or ``checkpoint.dcp/`` (fsdp),
    or None."""
    return next((c for c in (out / "checkpoint.pt", out / SHARDED_CHECKPOINT) if c.exists()), None)


# Fields of a run's config.json written before they were renamed, and their names now.
RENAMED_FIELDS = {"dropout": "model_dropout", "adapter_dim": "bottleneck_dim"}


def run_config(out: Path) -> dict:
    """The config of the run in ``out`` (its config.json), in today's field names and method names."""
    config = {RENAMED_FIELDS.get(k, k): v for k, v in json.loads((out / "config.json").read_text()).items()}
    config["method"] = METHOD_ALIASES.get(config.get("method"), config.get("method"))
    return config


# Integer flags and their least value; a None, where the field allows one, means "all" or "off".
LEAST = dict(r=1, max_length=1, batch_size=1, grad_accum=1, max_steps=1, eval_every=1, eval_batch_size=1, gen_tokens=1,
             bottleneck_dim=1, train_subset=1, max_val=1, max_test=1, checkpoint_every=1, stop_after_step=1, shots=0,
             warmup_steps=0, seed=0)  # fmt: skip
# Real flags: (low, whether low itself is allowed, high (never allowed)); NaN and inf never are.
INTERVALS = {"lr": (0, False, math.inf), "alpha": (-math.inf, False, math.inf), "lora_dropout": (0, True, 1),
             "model_dropout": (0, True, 1), "weight_decay": (0, True, math.inf), "grad_clip": (0, True, math.inf),
             "betas": (0, True, 1)}  # fmt: skip
# Flags a resume may change: when the run stops and how often it checkpoints, how the test split is scored, where and
# how it computes (the same math; --dtype is checked by what it resolves to, check_resumed_dtype). Every other flag
# shapes the training and must be what the run started with (docs/TRAINING.md, "Robustness").
RESUME_MAY_CHANGE = {"max_steps", "stop_after_step", "checkpoint_every", "eval_batch_size", "max_test", "generation",
                     "gen_tokens", "zero_shot", "device", "backend", "grad_checkpointing", "dtype", "parallel",
                     "resume", "overwrite", "out", "preset", "sweep"}  # fmt: skip
# What a run writes to --out: an --out holding any of them holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "checkpoint.dcp", "val_loss.png",
             "adapter_best", "adapter_last")  # fmt: skip


def check_config(cfg: Config, world: int, device: torch.device) -> None:
    """Refuse a bad flag or combination before anything loads: a UsageError naming the flag, what it must be and what
    it is. (``--targets`` needs the model: the lora method checks it right after loading, before any evaluation.)"""
    check_numbers(cfg, LEAST, INTERVALS, NONZERO if cfg.method == "lora" else {})
    if cfg.grad_accum % world:
        raise UsageError(f"--grad-accum {cfg.grad_accum} must be a multiple of the {world} processes")
    distributed.check_parallel(cfg.parallel, world, cfg.method, cfg.dtype)
    if cfg.generation and cfg.max_length <= cfg.gen_tokens:
        raise UsageError(
            f"--max-length {cfg.max_length}: must be more than --gen-tokens {cfg.gen_tokens} (the generation metric "
            f"keeps max-length - gen-tokens prompt tokens; --no-generation turns it off)"
        )
    if cfg.stop_after_step is not None and cfg.stop_after_step > cfg.max_steps:
        raise UsageError(f"--stop-after-step {cfg.stop_after_step}: past --max-steps {cfg.max_steps}")
    choose_precision(cfg.dtype, device)  # fp16 on a CPU is refused
    if cfg.backend == "triton" and device.type != "cuda":
        from lora_fast.kernels.utils import interpreting  # imports triton: only for this check

        if not interpreting():
            raise UsageError(
                f"--backend triton on {device}: the Triton kernels need a CUDA device (or TRITON_INTERPRET=1, "
                f"Triton's slow CPU interpreter); --backend auto takes them where CUDA is present"
            )
    if cfg.adapter and not (recover_directory(cfg.adapter) or Path(cfg.adapter).is_dir()):  # put back, or there
        raise UsageError(f"--adapter {cfg.adapter}: no such folder")
    if cfg.overwrite and (cfg.resume or cfg.sweep):
        raise UsageError(f"--overwrite starts a run afresh; {'--resume' if cfg.resume else '--sweep'} resumes one")
    if cfg.out is not None:
        reuse = "--resume to continue it (a finished run is skipped), --overwrite to start it afresh"
        check_out(Path(cfg.out), RUN_FILES, cfg.resume or cfg.overwrite or bool(cfg.sweep), reuse)
        out = Path(cfg.out)
        if cfg.resume and saved_checkpoint(out) and (out / "config.json").is_file():
            check_resume_config(saved_checkpoint(out), run_config(out), dataclasses.asdict(cfg), RESUME_MAY_CHANGE)
    _, gguf_file = split_gguf(cfg.model, cfg.gguf_file)  # --model X.gguf, or --gguf-file NAME in --model's folder
    if cfg.keep_quantized and (not gguf_file or cfg.method == "full"):
        why = "--method full trains every weight" if gguf_file else f"--model {cfg.model} is no GGUF file"
        raise UsageError(f"--keep-quantized keeps a GGUF file's weights packed and frozen; {why}")
    gguf = bool(cfg.gguf_file) or cfg.model.endswith(".gguf")
    require_modules(None if cfg.eval_only else "val_loss.png", None if cfg.data_dir else cfg.dataset, gguf)
    check_hub_inputs([  # hub names need the hub or the local cache: one check, naming every flag it fails for
        ("--model", cfg.model, f"gguf:{cfg.gguf_file}" if cfg.gguf_file else "model"),
        ("--tokenizer", cfg.tokenizer, "tokenizer"),
        ("--data-dir", None if cfg.data_dir else cfg.dataset, "dataset"),
    ])  # fmt: skip


# ---------------------------------------------------------------- set-up


def amp_setup(cfg: Config, device: torch.device) -> tuple[Precision, torch.amp.GradScaler | None]:
    """--dtype's precision on ``device`` (``choose_precision``) and, for fp16, its GradScaler."""
    precision = choose_precision(cfg.dtype, device)
    return precision, (torch.amp.GradScaler("cuda") if precision.dtype == "fp16" else None)


def prepare_model(cfg: Config, device: torch.device, log=print):
    """Load --model, then give it --method's trainable parts and, with --adapter, its saved weights (with --eval-only
    only the saved ones); the model comes back on ``device``, in training mode unless --eval-only, when every
    parameter is frozen (nothing trains, and the summary counts 0 trainable parameters)."""
    model, tokenizer = load_causal_lm(
        cfg.model, cfg.tokenizer, dropout=cfg.model_dropout, gguf_file=cfg.gguf_file, keep_quantized=cfg.keep_quantized
    )
    if cfg.method == "lora" and cfg.targets is None and not cfg.eval_only:
        cfg = dataclasses.replace(cfg, targets=default_targets(model.config.model_type))
    if cfg.fused_gelu:
        use_fused_gelu(model)
    if cfg.backend == "auto" and device.type != "cuda":
        log("--fused (--backend auto): no CUDA device, so LoRA runs the torch backend (the Triton kernels need a GPU)")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    method = METHODS[cfg.method]
    if not cfg.eval_only:
        model = method.prepare(model, **method_params(cfg))
    if cfg.adapter:  # scored with --eval-only; otherwise the starting point, loaded into the prepared model strictly
        try:
            model = method.load(model, cfg.adapter, **method_params(cfg))
        except AdapterError as exc:
            raise AdapterError(f"--adapter {cfg.adapter}: {exc}") from None
        if not cfg.eval_only:
            log(f"--adapter {cfg.adapter}: training starts from its weights, with a fresh optimizer and schedule")
    if cfg.eval_only:
        model.requires_grad_(False)  # loading an adapter leaves its weights trainable, and a bare model all of its own
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device).train(not cfg.eval_only), tokenizer


def prompt_length(cfg: Config, model) -> int:
    """--max-length, at most the model's positions (``max_positions``): the length training's prompts, the validation
    loss's and both metrics' are cut to. A model too short to leave the generation metric room for a prompt after
    --gen-tokens is a UsageError."""
    limit = max_positions(model.config)
    max_length = cfg.max_length if limit is None else min(cfg.max_length, limit)
    if cfg.generation and max_length <= cfg.gen_tokens:
        raise UsageError(
            f"--gen-tokens {cfg.gen_tokens}: the model has {limit} positions, which leaves no room for the prompt "
            f"(pass fewer --gen-tokens, or --no-generation)"
        )
    return max_length


def encode_data(cfg: Config, splits: dict, tokenizer, max_length: int) -> list:
    """[train, val, test] as prompts and token ids (cut to ``max_length``, ``prompt_length``'s): seeded subsets, the
    instruction, the few-shot examples."""
    instruction = resolve_instruction(cfg.prompt, cfg.instruction)
    shots = [(r["text"], r["label"]) for r in subset(splits["train"], cfg.shots, cfg.seed + 1)] if cfg.shots else []
    sizes = {"train": cfg.train_subset, "validation": cfg.max_val, "test": cfg.max_test}
    return [
        encode_split(subset(splits[s], n, cfg.seed), tokenizer, instruction, max_length, shots)
        for s, n in sizes.items()
    ]


def describe(cfg: Config, model, splits: list, device: torch.device, world: int) -> dict:
    """The summary's first fields: what ran, on what, with how many trainable parameters and examples."""
    sizes = {f"n_{name}": len(split) for name, split in zip(("train", "val", "test"), splits, strict=True)}
    what = {"method": cfg.method, "model": cfg.model, "prompt": cfg.instruction or cfg.prompt, "shots": cfg.shots}
    where = {"device": str(device), "world_size": world, "parallel": cfg.parallel, "versions": versions()}
    return {**what, **parameter_summary(model), **sizes, **where, **distributed.memory_summary(model)}


def open_run_folder(cfg: Config, out: Path, precision: Precision, log) -> None:
    """The run folder, made once the model and data have loaded (a mistake before leaves none behind): config.json
    (the flags, and the precision --dtype chose, with why), with --overwrite after the old run's files are gone
    (``start_run_folder``); the folder and the precision are printed. A resume from a checkpoint keeps the run's
    config.json: it describes the run as it started, and a resume may not change it (``RESUME_MAY_CHANGE``)."""
    if not (cfg.resume and saved_checkpoint(out) and (out / "config.json").is_file()):
        start_run_folder(out, {**dataclasses.asdict(cfg), "precision": precision.record()}, RUN_FILES, cfg.overwrite)
    log(f"run folder: {out}")
    log(f"precision: {precision.dtype} ({precision.reason})")


def scorers(cfg: Config, model, tokenizer, val, test, device: torch.device, amp_dtype, max_length: int, packing):
    """``validate()``: the validation loss (a NaN or inf one is a NonFiniteError: the weights diverged); ``score()``:
    the test split's label-logit accuracy and, with --generation, the study's generation metric, whose prompts are cut
    to ``max_length`` (``prompt_length``'s, as training's) less --gen-tokens. Both batch as ``packing`` says."""
    batching = {"device": device, "amp_dtype": amp_dtype, "padding_side": cfg.padding_side, "packing": packing}
    pad, batch_size = tokenizer.pad_token_id, cfg.eval_batch_size

    def validate() -> float:
        loss = val_loss(model, val.sequences, val.targets, pad, batch_size, **batching)
        if not math.isfinite(loss):
            raise NonFiniteError(f"the validation loss after the update is {loss}: the weights give non-finite outputs")
        return loss

    score = functools.partial(
        score_split,
        model,
        tokenizer,
        test,
        batch_size=batch_size,
        **batching,
        generation=cfg.generation,
        gen_tokens=cfg.gen_tokens,
        max_length=max_length,
    )
    return validate, score


def save_weights(cfg: Config, model, tokenizer, folder: Path, main: bool) -> None:
    """--method's save of the trained weights to ``folder`` by the main process, once every process has found them
    finite (a NonFiniteError otherwise: all stop together, and the folder on disk stays the last good one). A sharded
    model's trainable weights are gathered whole first (``full_parameters``), so the files are a single process's."""
    with full_parameters(model):
        require_finite({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, str(folder))
        if main:
            METHODS[cfg.method].save(model, tokenizer, folder)


def last_good(cfg: Config, ckpt_path: Path, saved: int | None) -> str:
    """Where a run that stopped can go on from: the last checkpoint it wrote or resumed from, or none."""
    if saved is None:
        due = min(cfg.checkpoint_every or cfg.eval_every, cfg.max_steps)
        return f"no checkpoint was written yet (the first is due at step {due})"
    return f"the last good checkpoint is {ckpt_path} (step {saved})"


def finish(out: Path, summary: dict, t_start: float, device: torch.device, main: bool, plot: bool = False) -> dict:
    """The summary with wall time and peak memory, written to summary.json (and, with ``plot``, the loss plot drawn
    from metrics.jsonl) by the main process."""
    mem, kind = peak_memory_mb(device)
    summary.update(wall_time_s=time.time() - t_start, peak_memory_mb=mem, peak_memory_kind=kind)
    require_finite(summary, str(out / "summary.json"))
    if main:
        atomic_write_json(out / "summary.json", summary)
    if main and plot:
        plot_val_loss({"": out / "metrics.jsonl"}, out / "val_loss.png")
    return summary


# ---------------------------------------------------------------- one run


def run(cfg: Config, rank: int, world: int, device: torch.device) -> dict:
    """Train and score one configuration in ``cfg.out``; returns the summary."""
    main, out, t_start = rank == 0, Path(cfg.out), time.time()
    log = functools.partial(print, flush=True) if main else (lambda *args: None)

    # --- data, model, the run folder (only once both have loaded), metrics
    with phase(f"loading the data ({cfg.data_dir or cfg.dataset})", main):
        splits = load_splits(cfg.data_dir, cfg.dataset)
    precision, scaler = amp_setup(cfg, device)
    amp_dtype = precision.amp_dtype
    with phase(f"loading the model ({cfg.model})", main):
        model, tokenizer = prepare_model(cfg, distributed.load_device(cfg.parallel, device), log)
        model = distributed.place(model, cfg.parallel, device, amp_dtype)
    max_length = prompt_length(cfg, model)
    with phase("writing the prompts as token ids", main):
        train, val, test = encode_data(cfg, splits, tokenizer, max_length)
    if main:
        open_run_folder(cfg, out, precision, log)
    asked = "off" if is_sharded(model) else cfg.packing  # a sharded model runs its own forward on padded rows
    packing = {use: resolve_packing(model, asked, training=use == "training") for use in ("training", "evaluation")}
    sharded = "--parallel fsdp: " if is_sharded(model) else ""
    log(f"--packing {cfg.packing}: {sharded}" + ", ".join(f"{u} {p.mode} ({p.reason})" for u, p in packing.items()))
    clock = {"validation_s": 0.0, "scoring_s": 0.0}  # the time in each, beside train_steps_s
    validate, score = scorers(cfg, model, tokenizer, val, test, device, amp_dtype, max_length, packing["evaluation"])
    validate, score = timed(validate, clock, "validation_s"), timed(score, clock, "scoring_s")
    summary = {**describe(cfg, model, [train, val, test], device, world), "precision": precision.record()}
    if cfg.eval_only:
        return finish(out, {**summary, "test": {"eval": score()}, **clock}, t_start, device, main)

    # --- training state: fresh, or restored from the checkpoint
    module = distributed.wrap(LastTokenLM(model), device)
    optimizer = make_optimizer(model, cfg.lr, tuple(cfg.betas), cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps)
    method, ckpt_path, metrics_path = METHODS[cfg.method], checkpoint_path(out, model), out / "metrics.jsonl"
    pad, global_batch = tokenizer.pad_token_id, cfg.batch_size * cfg.grad_accum
    data_order = {"seed": cfg.seed, "global_batch": global_batch, "n_train": len(train)}
    config_now = dataclasses.asdict(cfg)
    step, state = (0, {})
    if cfg.resume:
        step, state = resume(ckpt_path, model, optimizer, scheduler, scaler, data_order, config_now, RESUME_MAY_CHANGE)
    if cfg.resume:
        check_resumed_dtype(state, precision, device, ckpt_path)
        where = resume_path(ckpt_path, model)
        log(f"resumed from {where} at step {step}" if step else f"--resume: no checkpoint in {out}, so step 0")
    best, zero_shot = state.get("best", {"val_loss": math.inf, "step": None}), state.get("zero_shot")
    if zero_shot is None and cfg.zero_shot:
        zero_shot = score()
        log(f"{'before training (--adapter)' if cfg.adapter else 'zero-shot'} test: {format_scores(zero_shot)}")
    if main:
        trim_metrics(metrics_path, step)

    # --- the loop: one optimizer step, its record, validation (keeping the best weights), the checkpoint; a NaN or
    # inf (loss, gradient, validation loss, weights) stops it before anything holding one is applied or written; a
    # Ctrl-C (StopRequest) stops it after the step in flight, with a checkpoint of that step
    tokens_seen, train_time, saved = 0, 0.0, step or None  # saved: the step of the last good checkpoint on disk
    extra = lambda: {
        "data_order": data_order,
        "best": best,
        "zero_shot": zero_shot,
        "config": config_now,  # noqa: E731
        "dtype": precision.dtype,
    }
    bar = progress(desc="training", total=cfg.max_steps, initial=step, unit="step", main=main)
    with bar, StopRequest() as stop:
        while step < cfg.max_steps:
            t0, at = time.time(), step + 1
            batches, targets = step_batches(
                train, step, global_batch, cfg.batch_size, cfg.seed, pad, cfg.padding_side, cfg.group_by_length, device,
                packing["training"],
            )  # fmt: skip
            try:
                res = train_step(module, optimizer, batches, targets, scheduler, scaler, amp_dtype, cfg.grad_clip)
                step, dt = step + 1, time.time() - t0
                tokens_seen, train_time = tokens_seen + res.tokens, train_time + dt
                record = dict(step=step, train_loss=res.loss, lr=scheduler.get_last_lr()[0], grad_norm=res.grad_norm)
                record.update(tokens_per_s=res.tokens / dt, peak_memory_mb=peak_memory_mb(device)[0])
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    record["val_loss"] = validate()
                    if record["val_loss"] < best["val_loss"]:
                        best = {"val_loss": record["val_loss"], "step": step}
                        save_weights(cfg, model, tokenizer, out / "adapter_best", main)
                if main:
                    append_metrics(metrics_path, record)
                stopping = distributed.any_rank(stop.requested, device)
                if step % (cfg.checkpoint_every or cfg.eval_every) == 0 or step == cfg.max_steps or stopping:
                    save_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, step, extra(), write=main)
                    saved = step
                    distributed.barrier()
            except NonFiniteError as e:
                raise NonFiniteError(f"step {at}: {e}; stopped; {last_good(cfg, ckpt_path, saved)}") from None
            bar.update(1)
            bar.set_postfix(loss=f"{res.loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if cfg.stop_after_step == step:
                log(f"--stop-after-step {step}: stopped after the checkpoint")
                return {"stopped_at": step}
            if stopping:
                return {"stopped_at": step, "interrupted": True, "checkpoint": str(ckpt_path.resolve())}

    # --- final scores: the last weights, then the best ones
    save_weights(cfg, model, tokenizer, out / "adapter_last", main)
    distributed.barrier()
    last, reload = score(), best["step"] not in (None, step)  # reload: the best weights are not the last ones
    if reload:
        with full_parameters(model, write_back=True):
            method.load(model, out / "adapter_best", **method_params(cfg))
    summary["test"] = {"zero_shot": zero_shot, "best": score() if reload else dict(last), "last": last}
    summary.update(steps=step, best_step=best["step"], best_val_loss=best["val_loss"])
    summary["tokens_per_s"] = tokens_seen / train_time if train_time else None
    summary.update(train_steps_s=train_time, **clock)
    return finish(out, summary, t_start, device, main, plot=True)


# ---------------------------------------------------------------- entry point


def start(cfg: Config, argv: list[str]) -> int:
    """Check the flags, then run (or skip a finished run, or run a sweep) and print the summary table and where the
    results are. A Ctrl-C stops with the command that continues the run (exit code 130)."""
    world, device = distributed.launched_world_size(), distributed.resolve_device(cfg.device)
    check_config(cfg, 1 if cfg.sweep else world, device)  # a sweep's sub-runs are one process each
    if cfg.sweep:  # the parent only starts sub-runs (each in its own process) and gathers their summaries
        return run_sweep(cfg, Path(__file__).resolve(), argv)
    rank, world, device = distributed.setup(device)
    if cfg.out is None:
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        if world > 1:
            torch.distributed.broadcast_object_list(stamp, src=0)
        cfg = dataclasses.replace(cfg, out=str(Path("runs") / stamp[0]))
    out = Path(cfg.out).resolve()
    again = resume_command(sys.argv[0], argv, str(out), world=world)
    done = out / "summary.json"
    try:
        if cfg.resume and done.is_file():  # a sweep re-run skips its finished sub-runs
            summary = json.loads(done.read_text())
            if rank == 0:
                print(f"{cfg.out}: finished already, skipped", flush=True)
        else:
            summary = run(cfg, rank, world, device)
    except KeyboardInterrupt:
        if rank == 0:
            ckpt = saved_checkpoint(out)
            where = f"the last checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
            print(f"\ninterrupted; {where}. Continue with:\n  {again}", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    if summary.get("interrupted"):
        if rank == 0:
            print(f"interrupted after step {summary['stopped_at']}; checkpoint {summary['checkpoint']}. Continue "
                  f"with:\n  {again}", file=sys.stderr, flush=True)  # fmt: skip
        return INTERRUPTED_EXIT_CODE
    if rank == 0 and "test" in summary:
        print_summary(summary)
        files = [out / "summary.json", out / "val_loss.png", out / "adapter_best"]
        print("results: " + ", ".join(str(f) for f in files if f.exists()), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv)
    try:
        return report_errors(lambda: start(cfg, argv))
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
