"""DPO with LoRA on controlled-sentiment generation (the DPO paper's task) with Rotten Tomatoes prompts.

1. Prompts: the first 2–8 tokens of training reviews (``--num-prompts``); held-out prompts from validation reviews.
2. The base model samples ``--samples-per-prompt`` continuations of each prompt; a sentiment scorer (a LoRA adapter
   from ``train_sentiment.py``, ``--scorer``, on ``--scorer-model``) gives each text P(positive); the best and the
   worst continuation form a preference pair.
3. For each β (``--betas``, or ``--beta`` alone) a fresh LoRA adapter is trained with DPO for ``--steps`` steps; the
   reference policy is the same model with LoRA disabled.
4. Before and after: the mean P(positive) of sampled generations and the sampled sequence-level KL to the reference.

Writes to ``--out``: ``config.json``, ``metrics.jsonl`` (one line per step and per evaluation), ``summary.json``,
``adapter/`` (PEFT format, the ``--beta`` run), ``adapters/beta_<β>/`` (every run), ``reward_vs_kl.png``.

    python train_dpo.py --model gpt2 --scorer runs/sentiment/adapter --data-dir ../shared/data/rotten_tomatoes \\
        --betas 0.1 0.5 1.0 --steps 200 --out runs/dpo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_fast import apply_lora, count_parameters, load_adapter, lora_modules, save_adapter
from lora_fast.io import atomic_write_json
from lora_fast.study.dpo import (
    dpo_step,
    evaluate_policy,
    make_pairs,
    make_prompts,
    reference_logprobs,
    sample_continuations,
    sentiment_scores,
)


@dataclass
class DPOConfig:
    model: str = "gpt2"
    scorer: str | None = None
    scorer_model: str | None = None
    scorer_prompt: str = "default"
    data_dir: str | None = None
    num_prompts: int = 256
    samples_per_prompt: int = 4
    num_eval_prompts: int = 64
    eval_samples: int = 2
    prompt_tokens: tuple[int, int] = (2, 8)
    max_new_tokens: int = 24
    steps: int = 100
    batch_size: int = 8
    lr: float = 5e-4
    r: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["attn.c_attn"])
    beta: float = 0.1
    betas: list[float] | None = None
    seed: int = 0
    device: str = "auto"
    out: str = "runs/dpo"


HELP = {
    "model": "policy base model: a hub name or a local folder with config, weights and tokenizer",
    "scorer": "folder of the sentiment LoRA adapter (PEFT format, as train_sentiment.py saves it); required",
    "scorer_model": "base model the scorer adapter goes on (default: --model)",
    "scorer_prompt": "instruction name of lora_fast.study.prompts the scorer was trained with",
    "data_dir": "local folder with train/validation .jsonl (or parquet); default: the hub's rotten_tomatoes",
    "num_prompts": "training prompts; each gives at most one preference pair",
    "samples_per_prompt": "continuations the base model samples per prompt (k >= 2); best vs worst form the pair",
    "num_eval_prompts": "held-out (validation) prompts for the reward and KL measurements",
    "eval_samples": "continuations sampled per evaluation prompt",
    "prompt_tokens": "min and max prompt length in tokens (uniform per prompt)",
    "max_new_tokens": "longest continuation",
    "steps": "DPO optimizer steps per beta",
    "batch_size": "preference pairs per step",
    "lr": "AdamW learning rate of the LoRA weights",
    "r": "LoRA rank",
    "alpha": "LoRA alpha (scaling alpha / r)",
    "targets": "modules LoRA wraps (PEFT suffix rule)",
    "beta": "DPO beta: the run saved as adapter/",
    "betas": "several betas, one short training each, for the reward-vs-KL plot (--beta is added if missing)",
    "seed": "seed of prompts, sampling, LoRA init and batch order",
    "device": "cpu, cuda, cuda:N, or auto (cuda when present)",
    "out": "output folder",
}


def parse_args(argv: list[str] | None = None) -> DPOConfig:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    for f in dataclasses.fields(DPOConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{HELP[f.name]} (default: {default})"
        if f.name == "prompt_tokens":
            parser.add_argument(flag, type=int, nargs=2, default=list(default), metavar=("MIN", "MAX"), help=help_text)
        elif f.name == "targets":
            parser.add_argument(flag, nargs="+", default=default, help=help_text)
        elif f.name == "betas":
            parser.add_argument(flag, type=float, nargs="+", default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=default, help=help_text)
    args = vars(parser.parse_args(argv))
    args["prompt_tokens"] = tuple(args["prompt_tokens"])
    config = DPOConfig(**args)
    if config.samples_per_prompt < 2:
        parser.error("--samples-per-prompt must be at least 2: a pair needs two continuations")
    if config.scorer is None:
        parser.error("--scorer DIR is required: a sentiment LoRA adapter saved by train_sentiment.py")
    if any(b <= 0 for b in [config.beta, *(config.betas or [])]):
        parser.error("betas must be > 0")
    return config


def load_model(name: str, device: torch.device, what: str):
    """A causal LM and its tokenizer from a hub name or a local folder, or SystemExit with the reason."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise SystemExit(f"error: cannot load the {what} {name!r} ({first}); pass a local model folder") from None
    return model.to(device).eval(), tokenizer


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    before = summary["before"]
    ax.errorbar([0.0], [before["reward"]], fmt="ks", label="base model")
    runs = sorted(summary["runs"], key=lambda r: r["beta"])
    ax.errorbar(
        [r["after"]["kl"] for r in runs],
        [r["after"]["reward"] for r in runs],
        xerr=[r["after"]["kl_se"] for r in runs],
        fmt="o-",
        label="DPO + LoRA",
    )
    for r in runs:
        ax.annotate(f"β={r['beta']:g}", (r["after"]["kl"], r["after"]["reward"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("sequence-level KL(π || π_ref), sampled (nats)")
    ax.set_ylabel("mean P(positive) of generations")
    ax.set_title("Controlled sentiment: reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from lora_fast.study.data import DataError, load_splits
    from lora_fast.study.prompts import build_prompt, label_token_ids, resolve_instruction

    config = parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    )
    scorer_dir = Path(config.scorer)
    if not (scorer_dir / "adapter_config.json").is_file():
        raise SystemExit(
            f"error: --scorer {scorer_dir}: no adapter_config.json there; train one with train_sentiment.py"
        )
    try:
        splits = load_splits(config.data_dir)
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from None
    betas = sorted(set(config.betas or []) | {config.beta})
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", dataclasses.asdict(config))
    metrics_file = (out / "metrics.jsonl").open("w")

    def log(record: dict) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    torch.manual_seed(config.seed)
    policy, tokenizer = load_model(config.model, device, "policy model --model")
    scorer, scorer_tokenizer = load_model(config.scorer_model or config.model, device, "scorer model --scorer-model")
    load_adapter(scorer, scorer_dir)
    instruction = resolve_instruction(config.scorer_prompt)
    label_ids = label_token_ids(scorer_tokenizer)
    eos = tokenizer.eos_token_id

    def score(texts: list[str]) -> torch.Tensor:
        return sentiment_scores(scorer, scorer_tokenizer, texts, lambda t: build_prompt(t, instruction), label_ids)

    lo, hi = config.prompt_tokens
    train_prompts = make_prompts(
        [r["text"] for r in splits["train"]], tokenizer, config.num_prompts, lo, hi, config.seed
    )
    eval_prompts = make_prompts(
        [r["text"] for r in splits["validation"]], tokenizer, config.num_eval_prompts, lo, hi, config.seed + 1
    )

    # Preference pairs from base-model samples, scored once.
    t0 = time.time()
    torch.manual_seed(config.seed)
    samples = sample_continuations(policy, train_prompts, config.samples_per_prompt, config.max_new_tokens, eos)
    texts = [
        tokenizer.decode(p + [t for t in y if t != eos])
        for p, ys in zip(train_prompts, samples, strict=True)
        for y in ys
    ]
    flat_scores = score(texts).view(len(train_prompts), config.samples_per_prompt)
    pairs = make_pairs(train_prompts, samples, flat_scores.tolist())
    if not pairs:
        raise SystemExit("error: every prompt's samples scored the same; no preference pairs (try more samples)")
    gap = (flat_scores.max(1).values - flat_scores.min(1).values).mean().item()
    log({"event": "pairs", "pairs": len(pairs), "mean_score": flat_scores.mean().item(), "mean_gap": gap,
         "seconds": time.time() - t0})  # fmt: skip
    print(f"{len(pairs)} pairs; base samples' mean P(positive) {flat_scores.mean():.4f}, best-worst gap {gap:.4f}")

    torch.manual_seed(config.seed)
    apply_lora(policy, config.targets, r=config.r, alpha=config.alpha)
    trainable, total = count_parameters(policy)
    init_state = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in lora_modules(policy)}
    ref_chosen, ref_rejected = reference_logprobs(policy, pairs, eos)

    torch.manual_seed(config.seed + 2)
    before = evaluate_policy(policy, tokenizer, eval_prompts, config.eval_samples, config.max_new_tokens, score)
    log({"event": "eval", "beta": None, "step": 0, **before})
    print(f"before: reward {before['reward']:.4f}, KL {before['kl']:.4f}")

    runs = []
    for beta in betas:
        with torch.no_grad():  # a fresh adapter per beta: the same initial LoRA weights each time
            for n, m in lora_modules(policy):
                m.lora_A.copy_(init_state[n][0])
                m.lora_B.copy_(init_state[n][1])
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        order = torch.Generator().manual_seed(config.seed)
        perm, cursor = torch.randperm(len(pairs), generator=order).tolist(), 0
        bar = tqdm(range(1, config.steps + 1), desc=f"DPO β={beta:g}", dynamic_ncols=True)
        t0 = time.time()
        tokens = 0
        for step in bar:
            idx = []
            while len(idx) < min(config.batch_size, len(pairs)):
                if cursor == len(perm):
                    perm, cursor = torch.randperm(len(pairs), generator=order).tolist(), 0
                idx.append(perm[cursor])
                cursor += 1
            batch = [pairs[i] for i in idx]
            result = dpo_step(policy, optimizer, batch, ref_chosen[idx], ref_rejected[idx], beta, eos)
            metrics = result.metrics()
            if not math.isfinite(metrics["loss"]):
                raise SystemExit(f"error: non-finite DPO loss at step {step} (beta {beta}); lower --lr")
            tokens += sum(len(p) + len(c) + len(r) for p, c, r in batch)
            log({"event": "train", "beta": beta, "step": step, **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['reward_accuracy']:.2f}",
                            tok_s=f"{tokens / (time.time() - t0):.0f}")  # fmt: skip
        torch.manual_seed(config.seed + 2)
        after = evaluate_policy(policy, tokenizer, eval_prompts, config.eval_samples, config.max_new_tokens, score)
        log({"event": "eval", "beta": beta, "step": config.steps, **after})
        print(f"β={beta:g}: reward {before['reward']:.4f} -> {after['reward']:.4f}, KL {after['kl']:.4f}")
        save_adapter(policy, out / "adapters" / f"beta_{beta:g}", base_model_name_or_path=config.model)
        if beta == config.beta:
            save_adapter(policy, out / "adapter", base_model_name_or_path=config.model)
        runs.append({"beta": beta, "final": metrics, "after": after})
    metrics_file.close()

    summary = {
        "model": config.model,
        "scorer": config.scorer,
        "pairs": len(pairs),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "before": before,
        "runs": runs,
        "adapter_beta": config.beta,
    }
    atomic_write_json(out / "summary.json", summary)
    plot(summary, out / "reward_vs_kl.png")
    print(f"wrote {out}/summary.json, {out}/reward_vs_kl.png, {out}/adapter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
