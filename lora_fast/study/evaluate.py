"""Scoring: label-logit accuracy, the study's generation metric, and validation loss.

- Label-logit accuracy (ours): at the prompt's last token (``"Label:"``) compare the logits of the two label tokens
  (`` negative`` / `` positive``); the larger one is the prediction. Every example gets a prediction.
- Generation accuracy (the study's): append a space (``"Label: "``, as the study did), generate greedily a few
  tokens and string-match the text: it is right when it starts with the label word. The trailing space means the
  model must produce ``"positive"`` (id 24561), not the `` positive`` (3967) it was trained on, which is why this
  metric reads low for a zero-shot model; it is reported beside ours for comparison.
- Validation loss: the training loss (full-vocabulary cross-entropy of the label token) averaged over examples.

Under ``torch.distributed`` each rank scores every ``world``-th example and the sums are all-reduced. Each pass shows
a progress bar on the main process when its stderr is a terminal (tqdm's own rule); a log file gets none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lora_fast.study.causal_lm import LastTokenLM
from lora_fast.study.distributed import all_sum, rank_and_world
from lora_fast.study.prompts import LABEL_WORDS, EncodedSplit, label_token_ids
from lora_fast.study.training import collate

__all__ = ["label_accuracy", "val_loss", "generation_accuracy", "parse_label", "score_split"]


def _shard(n: int) -> list[int]:
    """The example indices this process scores: every ``world``-th from its rank."""
    rank, world = rank_and_world()
    return list(range(rank, n, world))


def _batches(lengths: Sequence[int], batch_size: int, desc: str) -> Iterable[list[int]]:
    """This process's share of the indices, sorted by length (less padding) and cut into batches, behind a progress
    bar named ``desc`` (main process only; on a terminal only: ``disable=None`` is tqdm's is-a-TTY test)."""
    mine = sorted(_shard(len(lengths)), key=lambda i: -lengths[i])
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    main = rank_and_world()[0] == 0
    return tqdm(batches, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None if main else True)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def _scores(
    head: LastTokenLM,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    label_ids: Sequence[int] | None,
    padding_side: str = "right",
    desc: str = "scoring",
):
    for idx in _batches([len(s) for s in sequences], batch_size, desc):
        batch = collate([sequences[i] for i in idx], pad_id, padding_side, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = head(
                batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["last_index"], label_ids
            )
        yield idx, logits.float()


def label_accuracy(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    labels: Sequence[int],
    label_ids: tuple[int, int],
    pad_id: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    padding_side: str = "right",
) -> dict[str, float]:
    """``{"acc", "correct", "n"}``: argmax over the two label-token logits at each prompt's last token.
    ``label_ids`` is ``(negative_id, positive_id)``, so the argmax is the dataset label."""
    device = torch.device(device)
    head = LastTokenLM(model)
    correct = 0
    with _eval_mode(model):
        for idx, logits in _scores(
            head, sequences, pad_id, batch_size, device, amp_dtype, label_ids, padding_side, "label-logit accuracy"
        ):
            pred = logits.argmax(-1).cpu()
            correct += int((pred == torch.as_tensor([labels[i] for i in idx])).sum())
    correct, n = all_sum([correct, len(_shard(len(sequences)))], device)
    return {"acc": correct / n if n else float("nan"), "correct": int(correct), "n": int(n)}


def val_loss(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    targets: Sequence[int],
    pad_id: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    padding_side: str = "right",
) -> float:
    """Mean full-vocabulary cross-entropy of the label token ``targets[i]`` after prompt ``sequences[i]``."""
    device = torch.device(device)
    head = LastTokenLM(model)
    total = 0.0
    with _eval_mode(model):
        for idx, logits in _scores(
            head, sequences, pad_id, batch_size, device, amp_dtype, None, padding_side, "validation loss"
        ):
            target = torch.as_tensor([targets[i] for i in idx], device=device)
            total += float(F.cross_entropy(logits, target, reduction="sum"))
    total, n = all_sum([total, len(_shard(len(sequences)))], device)
    return total / n if n else float("nan")


def parse_label(generated: str) -> int:
    """The study's string match: 1 when the generated text starts with "positive", 0 with "negative", else -1."""
    text = generated.strip().lower()
    for label, word in enumerate(LABEL_WORDS):
        if text.startswith(word.strip()):
            return label
    return -1


@torch.no_grad()
def generation_accuracy(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    labels: Sequence[int],
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    max_new_tokens: int = 3,
    amp_dtype: torch.dtype | None = None,
    max_length: int = 1024,
) -> dict[str, float]:
    """``{"acc", "correct", "invalid", "n"}``: greedy generation after ``prompt + " "`` (the study's trailing space),
    string-matched with ``parse_label``. ``invalid`` counts outputs that are neither label word (scored wrong)."""
    device = torch.device(device)
    encoded = [tokenizer.encode(p + " ", add_special_tokens=False)[-(max_length - max_new_tokens) :] for p in prompts]
    correct = invalid = 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with _eval_mode(model):
        for idx in _batches([len(s) for s in encoded], batch_size, "generation accuracy"):
            batch = collate([encoded[i] for i in idx], pad_id, "left", device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx, texts, strict=False):
                pred = parse_label(text)
                invalid += pred == -1
                correct += pred == labels[i]
    correct, invalid, n = all_sum([correct, invalid, len(_shard(len(prompts)))], device)
    return {"acc": correct / n if n else float("nan"), "correct": int(correct), "invalid": int(invalid), "n": int(n)}


def score_split(
    model: nn.Module,
    tokenizer,
    split: EncodedSplit,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    padding_side: str = "right",
    generation: bool = True,
    gen_tokens: int = 3,
    max_length: int = 1024,
) -> dict[str, float]:
    """``{"label_acc"}`` on ``split`` and, with ``generation``, the study's ``{"gen_acc", "gen_invalid"}``."""
    pad, label_ids = tokenizer.pad_token_id, label_token_ids(tokenizer)
    acc = label_accuracy(
        model, split.sequences, split.labels, label_ids, pad, batch_size, device, amp_dtype, padding_side
    )
    scores = {"label_acc": acc["acc"]}
    if generation:
        gen = generation_accuracy(
            model, tokenizer, split.prompts, split.labels, batch_size, device, gen_tokens, amp_dtype, max_length
        )
        scores.update(gen_acc=gen["acc"], gen_invalid=gen["invalid"])
    return scores
