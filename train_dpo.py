"""DPO with LoRA on controlled-sentiment generation (the DPO paper's task) with Rotten Tomatoes prompts.

1. Prompts: the first 2–8 tokens of training reviews (``--num-prompts``); held-out prompts from validation reviews.
2. The base model samples ``--samples-per-prompt`` continuations of each prompt; a sentiment scorer (a LoRA adapter
   from ``train_sentiment.py``, ``--scorer``, on ``--scorer-model``) gives each text P(positive); the best and the
   worst continuation form a preference pair.
3. For each β (``--betas``, or ``--beta`` alone) a fresh LoRA adapter is trained with DPO for ``--steps`` steps; the
   reference policy is the same model with LoRA disabled.
4. Before and after: the mean P(positive) of sampled generations and the sampled sequence-level KL to the reference.

Writes to ``--out``: ``config.json``, ``metrics.jsonl`` (one line per step and per evaluation), ``summary.json``,
``adapter/`` (PEFT format, the ``--beta`` run), ``adapters/beta_<β>/`` (every run), ``reward_vs_kl.png``. Every flag
is checked before anything loads (``--targets`` right after the models have), and the run folder is written only once
they have loaded; an ``--out`` that holds a run already is refused unless ``--overwrite`` says to start it afresh.

    python train_sentiment.py --model gpt2 --data-dir path/to/rotten_tomatoes --out runs/sentiment
    python train_dpo.py --model gpt2 --scorer runs/sentiment/adapter_best --data-dir path/to/rotten_tomatoes \\
        --betas 0.1 0.5 1.0 --steps 200 --out runs/dpo
    torchrun --nproc_per_node 2 train_dpo.py --parallel fsdp ...   # each step's pairs split over 2 processes

Under torchrun each process trains on its share of every step's pairs (``--parallel ddp``, or ``fsdp`` with the
policy and the scorer sharded); sampling, scoring and the evaluations run whole on every process (the same work, so
the same results; rank 0's pairs are used by all), and rank 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_fast import apply_lora, count_parameters, disable_lora, load_adapter, lora_modules, save_adapter
from lora_fast.io import atomic_write_json, recover_directory
from lora_fast.study import distributed
from lora_fast.study.causal_lm import check_targets, default_targets, load_causal_lm
from lora_fast.study.cli import (
    NONZERO,
    check_numbers,
    dataclass_parser,
    opt,
    parse_flags,
    report_errors,
    require_modules,
)
from lora_fast.study.data import load_splits
from lora_fast.study.dpo import (
    dpo_step,
    evaluate_policy,
    make_pairs,
    make_prompts,
    reference_logprobs,
    sample_continuations,
    sample_texts,
    sentiment_scores,
)
from lora_fast.study.errors import NonFiniteError, UsageError
from lora_fast.study.fsdp import full_parameters
from lora_fast.study.hub import check_hub_inputs
from lora_fast.study.interrupt import INTERRUPTED_EXIT_CODE
from lora_fast.study.packing import PACKING_MODES, resolve_packing
from lora_fast.study.precision import Precision, choose_precision
from lora_fast.study.progress import phase, progress
from lora_fast.study.prompts import INSTRUCTIONS, build_prompt, label_token_ids, resolve_instruction
from lora_fast.study.report import append_metrics, check_out, plot_reward_vs_kl, start_run_folder


@dataclass
class DPOConfig:
    model: str = opt("gpt2", "policy base model: a hub name, a folder with weights and tokenizer, or a .gguf file")
    scorer: str | None = opt(
        None, "the sentiment LoRA adapter folder train_sentiment.py saved (PEFT format); required, no default"
    )
    scorer_model: str | None = opt(None, "base model the scorer adapter goes on (default: --model)")
    keep_quantized: bool = opt(False, "keep the quantised weights of GGUF models packed (dequantised just in time)")
    scorer_prompt: str = opt("default", "instruction the scorer was trained with", choices=tuple(INSTRUCTIONS))
    data_dir: str | None = opt(None, "local folder with train/validation .jsonl (or parquet) (default: the hub)")
    num_prompts: int = opt(256, "training prompts; each gives at most one preference pair")
    samples_per_prompt: int = opt(4, "continuations sampled per prompt (k >= 2); the best and the worst form the pair")
    num_eval_prompts: int = opt(64, "held-out (validation) prompts for the reward and KL measurements")
    eval_samples: int = opt(2, "continuations sampled per evaluation prompt")
    prompt_tokens: list = opt(
        [2, 8], "min and max prompt tokens (uniform per prompt)", nargs=2, type=int, metavar=("MIN", "MAX")
    )
    max_new_tokens: int = opt(24, "longest continuation")
    steps: int = opt(100, "DPO optimizer steps per beta")
    batch_size: int = opt(8, "preference pairs per step (over all processes under torchrun)")
    lr: float = opt(5e-4, "AdamW learning rate of the LoRA weights")
    r: int = opt(8, "LoRA rank")
    alpha: float = opt(16.0, "LoRA alpha (scaling alpha / r)")
    targets: list | None = opt(
        None,
        "modules LoRA wraps (PEFT suffix rule); default per model type, the attention's query/key/value projections: "
        "GPT-2 attn.c_attn; Llama, Mistral, Qwen2/3 q_proj k_proj v_proj",
        nargs="+",
    )
    beta: float = opt(0.1, "DPO beta: the run saved as adapter/")
    betas: list | None = opt(
        None, "one training per beta, for the reward-vs-KL plot (--beta added)", nargs="+", type=float
    )
    seed: int = opt(0, "seed of prompts, sampling, LoRA init and batch order")
    packing: str = opt(
        "auto",
        "DPO batches without padding: off (padded), flat (rows end to end), prefix (also each pair's prompt computed "
        "once for both answers), auto (prefix unless dropout is active, then flat); GPT-2 and Llama, others padded",
        choices=PACKING_MODES,
    )
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (cuda when present; torchrun: cuda:LOCAL_RANK)")
    dtype: str = opt(
        "auto",
        "autocast of sampling, scoring and training; LoRA weights, optimizer and loss stay fp32 (auto: bf16 where "
        "the device multiplies it natively: CUDA 8.0+, a CPU with AMX or avx512_bf16; fp32 elsewhere)",
        choices=("auto", "fp32", "bf16"),
    )
    parallel: str = opt(
        "ddp",
        "under torchrun: ddp (every process holds the whole models) or fsdp (FSDP2: each holds 1/N of every weight "
        "of the policy and the scorer; docs/DISTRIBUTED.md)",
        choices=distributed.PARALLEL,
    )
    out: str = opt("runs/dpo", "output folder")
    overwrite: bool = opt(False, "start afresh in an --out that holds a run: its run files are replaced")


def parse_args(argv: list[str] | None = None) -> DPOConfig:
    return DPOConfig(**parse_flags(dataclass_parser(DPOConfig, __doc__), DPOConfig, argv))


# Integer flags and their least value (a list's each element): a preference pair needs two continuations.
LEAST = dict(num_prompts=1, samples_per_prompt=2, num_eval_prompts=1, eval_samples=1, prompt_tokens=1, max_new_tokens=1,
             steps=1, batch_size=1, r=1, seed=0)  # fmt: skip
# Real flags: (low, whether low itself is allowed, high (never allowed)); NaN and inf never are.
INTERVALS = {"lr": (0, False, math.inf), "alpha": (-math.inf, False, math.inf), "beta": (0, False, math.inf),
             "betas": (0, False, math.inf)}  # fmt: skip
# What a run writes to --out: an --out holding any of them holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "reward_vs_kl.png", "adapter", "adapters")


def check_config(cfg: DPOConfig, world: int = 1) -> None:
    """Refuse a bad flag or combination before anything loads: a UsageError naming the flag, what it must be and what
    it is. (``--targets`` needs the model: it is checked right after the models load, before any sampling.)"""
    check_numbers(cfg, LEAST, INTERVALS, NONZERO)
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    distributed.check_parallel(cfg.parallel, world)
    lo, hi = cfg.prompt_tokens
    if lo > hi:
        raise UsageError(f"--prompt-tokens {lo} {hi}: MIN must be at most MAX")
    if cfg.scorer is None:
        raise UsageError("--scorer DIR is required: a sentiment LoRA adapter saved by train_sentiment.py")
    recover_directory(cfg.scorer)  # a scorer folder a killed save left aside
    if not (Path(cfg.scorer) / "adapter_config.json").is_file():
        raise UsageError(f"--scorer {cfg.scorer}: no adapter_config.json there; train one with train_sentiment.py")
    if cfg.keep_quantized and not any(m.endswith(".gguf") for m in (cfg.model, cfg.scorer_model or cfg.model)):
        raise UsageError("--keep-quantized keeps GGUF weights packed; neither --model nor --scorer-model is a .gguf")
    check_out(Path(cfg.out), RUN_FILES, cfg.overwrite, "--overwrite to start it afresh")
    gguf = any(m and m.endswith(".gguf") for m in (cfg.model, cfg.scorer_model))
    require_modules("reward_vs_kl.png", None if cfg.data_dir else "rotten_tomatoes", gguf)
    check_hub_inputs([("--model", cfg.model, "model"), ("--scorer-model", cfg.scorer_model, "model"),
                      ("--data-dir", None if cfg.data_dir else "rotten_tomatoes", "dataset")])  # fmt: skip


def open_run_folder(cfg: DPOConfig, out: Path, precision: Precision) -> None:
    """The run folder, made once the models have loaded (a mistake before leaves none behind): config.json (the flags,
    and the precision --dtype chose, with why), with --overwrite after the old run's files are gone
    (``start_run_folder``)."""
    start_run_folder(out, {**dataclasses.asdict(cfg), "precision": precision.record()}, RUN_FILES, cfg.overwrite)


def load_models(cfg: DPOConfig, device: torch.device, amp_dtype: torch.dtype | None = None):
    """(policy, tokenizer, score): the base policy in eval mode (on ``distributed.load_device``: it gets its LoRA
    before ``place``), and ``score(texts)``: P(positive) of each text by the scorer adapter on --scorer-model, read
    with lora_fast.load_adapter's checks, on ``device`` (sharded under --parallel fsdp)."""
    scorer_model = cfg.scorer_model or cfg.model
    packed = {m: cfg.keep_quantized and m.endswith(".gguf") for m in (cfg.model, scorer_model)}
    policy, tokenizer = load_causal_lm(cfg.model, dropout=None, keep_quantized=packed[cfg.model])
    scorer, scorer_tokenizer = load_causal_lm(
        scorer_model, dropout=None, flag="--scorer-model", keep_quantized=packed[scorer_model]
    )
    load_adapter(scorer.eval(), cfg.scorer)
    scorer = distributed.place(scorer, cfg.parallel, device, amp_dtype)
    instruction, label_ids = resolve_instruction(cfg.scorer_prompt), label_token_ids(scorer_tokenizer)

    def score(texts: list[str]) -> torch.Tensor:
        return sentiment_scores(scorer, scorer_tokenizer, texts, lambda t: build_prompt(t, instruction), label_ids)

    return policy.to(distributed.load_device(cfg.parallel, device)).eval(), tokenizer, score


def preference_pairs(cfg: DPOConfig, policy, tokenizer, prompts: list[list[int]], score, log) -> list:
    """(prompt, chosen, rejected) from --samples-per-prompt base-model samples (the policy with its LoRA off) of each
    prompt, scored once; every process's list is rank 0's."""
    t0, eos = time.time(), tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)
    with disable_lora(policy):
        samples = sample_continuations(policy, prompts, cfg.samples_per_prompt, cfg.max_new_tokens, eos)
    texts = sample_texts(tokenizer, [(p, y) for p, ys in zip(prompts, samples, strict=True) for y in ys])
    scores = score(texts).view(len(prompts), cfg.samples_per_prompt)
    pairs = distributed.from_rank0(make_pairs(prompts, samples, scores.tolist()))
    if not pairs:
        raise UsageError("every prompt's samples scored the same; no preference pairs (raise --samples-per-prompt)")
    gap = (scores.max(1).values - scores.min(1).values).mean().item()
    log({"event": "pairs", "pairs": len(pairs), "mean_score": scores.mean().item(), "mean_gap": gap,
         "seconds": time.time() - t0})  # fmt: skip
    say(f"{len(pairs)} pairs; base samples' mean P(positive) {scores.mean():.4f}, best-worst gap {gap:.4f}")
    return pairs


def train_beta(cfg: DPOConfig, policy, pairs: list, refs: tuple, beta: float, eos: int, log, packing=None) -> dict:
    """--steps DPO steps of the policy's LoRA (reset by the caller) at ``beta``, each process on its share of every
    step's pairs (``policy`` is DDP around the model under --parallel ddp); returns the last step's metrics."""
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(cfg.seed)
    perm, cursor, tokens, t0 = [], 0, 0, time.time()
    rank, world = distributed.rank_and_world()
    size = min(cfg.batch_size, len(pairs) - len(pairs) % world)  # every process takes as many pairs
    if size == 0:
        raise UsageError(f"{len(pairs)} preference pairs cannot be split over {world} processes (raise --num-prompts)")
    bar = progress(range(1, cfg.steps + 1), desc=f"DPO β={beta:g}", unit="step", main=rank == 0)
    for step in bar:
        idx = []
        while len(idx) < size:  # an epoch's permutation, then a fresh one
            if cursor == len(perm):
                perm, cursor = torch.randperm(len(pairs), generator=order).tolist(), 0
            idx, cursor = idx + [perm[cursor]], cursor + 1
        batch, mine = [pairs[i] for i in idx], idx[rank::world]
        try:
            mine_pairs, mine_refs = [pairs[i] for i in mine], (refs[0][mine], refs[1][mine])
            metrics = dpo_step(policy, optimizer, mine_pairs, *mine_refs, beta, eos, packing).metrics()
        except NonFiniteError as e:
            raise NonFiniteError(f"DPO step {step} (beta {beta}): {e}; stopped (lower --lr)") from None
        tokens += sum(len(p) + len(c) + len(r) for p, c, r in batch)
        log({"event": "train", "beta": beta, "step": step, **metrics})
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['reward_accuracy']:.2f}",
                        tok_s=f"{tokens / (time.time() - t0):.0f}")  # fmt: skip
    return metrics


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        return report_errors(lambda: run(cfg))
    except KeyboardInterrupt:  # a DPO run keeps no checkpoint: what it has written stays, the rest starts again
        print(f"\ninterrupted; a DPO run does not resume: run the command again with --overwrite (--out {cfg.out})",
              file=sys.stderr, flush=True)  # fmt: skip
        return INTERRUPTED_EXIT_CODE
    finally:
        distributed.cleanup()


def say(text: str) -> None:
    """Print on the main process only."""
    if distributed.rank_and_world()[0] == 0:
        print(text, flush=True)


def run(cfg: DPOConfig) -> int:
    world, device = distributed.launched_world_size(), distributed.resolve_device(cfg.device)
    check_config(cfg, world)
    rank, world, device = distributed.setup(device)
    precision = choose_precision(cfg.dtype, device, fp16=False)
    with precision.autocast(device):  # every forward: sampling, scoring, reference log-probs, training, evaluation
        return run_at(cfg, device, precision, rank)


def run_at(cfg: DPOConfig, device: torch.device, precision: Precision, rank: int) -> int:
    """The run, under ``precision``'s autocast (entered by ``run``)."""
    with phase(f"loading the data ({cfg.data_dir or 'rotten_tomatoes'})", rank == 0):
        splits = load_splits(cfg.data_dir)

    # --- models, the run folder (once they have loaded and --targets fits the policy), the policy's fresh LoRA
    torch.manual_seed(cfg.seed)
    with phase(f"loading the policy ({cfg.model}) and the scorer ({cfg.scorer})", rank == 0):
        policy, tokenizer, score = load_models(cfg, device, precision.amp_dtype)
    targets = cfg.targets or default_targets(policy.config.model_type, output_projection=False)
    check_targets(policy, targets)
    out = Path(cfg.out)
    if rank == 0:
        open_run_folder(cfg, out, precision)
    log = (lambda record: append_metrics(out / "metrics.jsonl", record)) if rank == 0 else (lambda record: None)
    say(f"run folder: {out}\nprecision: {precision.dtype} ({precision.reason})")
    eos, (lo, hi) = tokenizer.eos_token_id, cfg.prompt_tokens
    train_texts, eval_texts = [r["text"] for r in splits["train"]], [r["text"] for r in splits["validation"]]
    train_prompts = make_prompts(train_texts, tokenizer, cfg.num_prompts, lo, hi, cfg.seed)
    eval_prompts = make_prompts(eval_texts, tokenizer, cfg.num_eval_prompts, lo, hi, cfg.seed + 1)
    torch.manual_seed(cfg.seed)
    apply_lora(policy, targets, r=cfg.r, alpha=cfg.alpha)  # before sharding: FSDP shards A and B with their block
    policy = distributed.place(policy, cfg.parallel, device, precision.amp_dtype)

    # --- preference pairs (base-model samples), the reference log-probs (LoRA disabled), the base reward and KL
    pairs = preference_pairs(cfg, policy, tokenizer, train_prompts, score, log)
    trainable, total = count_parameters(policy)
    init_state = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in lora_modules(policy)}
    # Several processes step through their model's own forward (DDP's or FSDP's, which sync and gather there); the
    # packed log-probs reach into the model's body and head, so they run padded batches then.
    several = distributed.rank_and_world()[1] > 1
    packing = resolve_packing(policy, "off" if several else cfg.packing, training=True)
    why = f"{distributed.rank_and_world()[1]} processes: {packing.reason}" if several else packing.reason
    say(f"--packing {cfg.packing}: {packing.mode} ({why})")
    refs = reference_logprobs(policy, pairs, eos, packing=packing)
    evaluate = lambda: evaluate_policy(policy, tokenizer, eval_prompts, cfg.eval_samples, cfg.max_new_tokens, score)
    torch.manual_seed(cfg.seed + 2)
    before = evaluate()
    log({"event": "eval", "beta": None, "step": 0, **before})
    say(f"before: reward {before['reward']:.4f}, KL {before['kl']:.4f}")

    # --- one DPO training per beta, each from the same initial LoRA weights
    module, runs = distributed.wrap(policy, device), []
    for beta in sorted(set(cfg.betas or []) | {cfg.beta}):
        with torch.no_grad():
            for n, m in lora_modules(policy):
                m.lora_A.copy_(init_state[n][0])
                m.lora_B.copy_(init_state[n][1])
        final = train_beta(cfg, module, pairs, refs, beta, eos, log, packing)
        torch.manual_seed(cfg.seed + 2)
        after = evaluate()
        log({"event": "eval", "beta": beta, "step": cfg.steps, **after})
        say(f"β={beta:g}: reward {before['reward']:.4f} -> {after['reward']:.4f}, KL {after['kl']:.4f}")
        with full_parameters(policy):  # a sharded policy's LoRA gathered whole: the files are one process's
            if rank == 0:
                save_adapter(policy, out / "adapters" / f"beta_{beta:g}", base_model_name_or_path=cfg.model)
            if rank == 0 and beta == cfg.beta:
                save_adapter(policy, out / "adapter", base_model_name_or_path=cfg.model)
        runs.append({"beta": beta, "final": final, "after": after})

    summary = {"model": cfg.model, "scorer": cfg.scorer, "pairs": len(pairs), "trainable_parameters": trainable,
               "total_parameters": total, "before": before, "runs": runs, "adapter_beta": cfg.beta,
               "precision": precision.record()}  # fmt: skip
    if rank == 0:
        atomic_write_json(out / "summary.json", summary)
        plot_reward_vs_kl(summary, out / "reward_vs_kl.png")
    say(f"results: {(out / 'summary.json').resolve()}, {(out / 'reward_vs_kl.png').resolve()}, "
        f"{(out / 'adapter').resolve()}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
