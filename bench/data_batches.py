"""Real batches for the model-step table (``bench/model_step.py --data``), and the count of the token rows each batch
layout computes.

In data mode a timed step is one optimizer step of the study: ``batch`` Rotten Tomatoes training reviews drawn as
``train_sentiment.py`` draws step ``i`` (``training.step_indices`` with the seed), in the study's prompt
(``--prompt``, and ``--shots`` solved examples, as ``encode_data`` picks them), cut to 256 tokens; timed step ``i``
takes the study's step ``i``. ``lora_fast`` and ``floor`` pad the batch (``--packing off``), ``lora_fast_packed``
lays it out as ``--packing`` says (default ``auto``). Tokens/s counts real prompt tokens, the same in every layout;
the token rows are what the linear layers compute per step: ``B·T`` padded, ``R·T'`` packed.

    python -m bench.data_batches DATA_DIR TOKENIZER_DIR --batch 8 32 --prompt default complex

prints, without a model, the token rows per batch of ``off``, ``flat`` and ``prefix`` on the first ``--steps`` study
steps, and their ratios to ``off`` (the packer sized for GPT-2 small: ``--pair-cost``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Workload", "study_batches", "data_inputs", "workload", "main"]

MAX_LENGTH = 256  # train_sentiment.py's --max-length
GPT2_SMALL_PAIR_COST = 2 * 768 / (12 * 768 * 768)  # packing.pair_cost of GPT-2 small: 2·C over 12·C² per token


@dataclass
class Workload:
    """Per step, averaged over the steps: real prompt tokens, the token rows the layout computes, and the token rows
    of the same sequences padded (``B·T``)."""

    real_tokens: float
    token_rows: float
    padded_token_rows: float

    @property
    def share(self) -> float:
        return self.token_rows / self.padded_token_rows


def study_batches(
    data_dir: str,
    tokenizer,
    prompt: str,
    batch: int,
    steps: int,
    seed: int,
    shots: int = 0,
) -> list[tuple[list[list[int]], list[int]]]:
    """``(prompt ids, label token ids)`` of the study's first ``steps`` optimizer steps of ``batch`` sequences."""
    from lora_fast.study.data import load_splits, subset
    from lora_fast.study.prompts import encode_split, resolve_instruction
    from lora_fast.study.training import step_indices

    train = load_splits(data_dir)["train"]
    examples = [(r["text"], r["label"]) for r in subset(train, shots, seed + 1)] if shots else []
    instruction = resolve_instruction(prompt)
    out = []
    for step in range(steps):
        rows = [train[i] for i in step_indices(len(train), batch, step, seed)]
        split = encode_split(rows, tokenizer, instruction, MAX_LENGTH, examples)
        out.append((split.sequences, split.targets))
    return out


def data_inputs(cfg, tokenizer, packing=None) -> tuple[list[tuple[dict[str, torch.Tensor], torch.Tensor]], Workload]:
    """``LastTokenLM``'s inputs for the ``cfg.warmup + cfg.steps`` steps of a data-mode row (``model_step.StepConfig``),
    ``[(batch, target)]``, padded or laid out by ``packing``, and their ``Workload``."""
    from lora_fast.study.training import collate

    if tokenizer is None:
        raise ValueError("data mode needs a tokenizer: --tokenizer DIR, or a --model with one")
    steps = study_batches(cfg.data, tokenizer, cfg.prompt, cfg.batch, cfg.warmup + cfg.steps, cfg.seed, cfg.shots)
    lay_out = collate if packing is None else packing.batch
    inputs = [(lay_out(s, tokenizer.pad_token_id, device=cfg.device), torch.tensor(t, device=cfg.device))
              for s, t in steps]  # fmt: skip
    return inputs, workload([s for s, _ in steps], [b for b, _ in inputs])


def workload(sequences: Sequence[Sequence[Sequence[int]]], layouts: Sequence[dict[str, torch.Tensor]]) -> Workload:
    """The ``Workload`` of steps whose sequences are ``sequences[i]``, laid out as ``layouts[i]``."""
    return Workload(
        real_tokens=statistics.mean(sum(map(len, s)) for s in sequences),
        token_rows=statistics.mean(layout["input_ids"].numel() for layout in layouts),
        padded_token_rows=statistics.mean(len(s) * max(map(len, s)) for s in sequences),
    )


def main(argv: list[str] | None = None) -> list[dict]:
    from transformers import AutoTokenizer

    from lora_fast.study.packing import Packing

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", help="Rotten Tomatoes folder (train/validation/test .jsonl)")
    ap.add_argument("tokenizer", help="tokenizer folder (e.g. GPT-2's)")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="sequences per step")
    ap.add_argument("--prompt", nargs="+", default=["default", "complex"], help="the study's instructions")
    ap.add_argument("--shots", type=int, default=0, help="solved examples in every prompt")
    ap.add_argument("--steps", type=int, default=40, help="study steps counted")
    ap.add_argument("--seed", type=int, default=42, help="the study's seed")
    ap.add_argument("--pair-cost", type=float, default=GPT2_SMALL_PAIR_COST, help="packing.pair_cost of the model")
    args = ap.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    results = []
    print("| prompt | batch | real tokens / row | padded | flat | prefix | flat / padded | prefix / padded |")
    print("|---|---|---|---|---|---|---|---|")
    for prompt in args.prompt:
        for batch in args.batch:
            steps = study_batches(args.data_dir, tokenizer, prompt, batch, args.steps, args.seed, args.shots)
            seqs = [s for s, _ in steps]
            work = {
                m: workload(seqs, [Packing(m, args.pair_cost).batch(s, pad) for s in seqs]) for m in ("flat", "prefix")
            }
            row = {"prompt": prompt, "batch": batch, "real": work["flat"].real_tokens / batch,
                   "padded": work["flat"].padded_token_rows, **{m: w.token_rows for m, w in work.items()}}  # fmt: skip
            results.append(row)
            print(f"| {prompt} | {batch} | {row['real']:.1f} | {row['padded']:.0f} | {row['flat']:.0f} | "
                  f"{row['prefix']:.0f} | {work['flat'].share:.2f} | {work['prefix'].share:.2f} |")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
