"""Scoring: label-logit accuracy, the study's generation metric, and validation loss.

- Label-logit accuracy (ours): at the prompt's last token (``"Label:"``) compare the logits of the two label tokens
  (`` negative`` / `` positive``); the larger one is the prediction. Every example gets a prediction.
- Generation accuracy (the study's): append a space (``"Label: "``, as the study did), generate greedily a few
  tokens and string-match the text: it is right when it starts with the label word. The trailing space means the
  model must produce ``"positive"`` (id 24561), not the `` positive`` (3967) it was trained on, which is why this
  metric reads low for a zero-shot model; it is reported beside ours for comparison.
- Validation loss: the training loss (full-vocabulary cross-entropy of the label token) averaged over examples.

``score_split`` computes both metrics from one forward over each prompt: when ``prompt + " "`` tokenises as the
prompt's ids plus a tail (the space), the model runs once over the prompt, left-padded, with its key/value cache
(``use_cache``) and logits at the last position only; those logits give the label-logit prediction, and HF's
``generate`` continues from that cache over the tail, so its greedy search runs the new tokens only. An example whose
tokens do not split that way (a prompt cut from the left, whose generation input is cut shorter to leave room for the
new tokens; a space that merges with the prompt's last token) or a model outside ``SHARED_FORWARD_MODEL_TYPES`` or
with a generation config that this is not exact for takes two passes, as ``label_accuracy`` and
``generation_accuracy`` run them. Both give the same predictions up to rounding (left padding and batch shapes).

Under ``torch.distributed`` each rank scores every ``world``-th example and the sums are all-reduced; a model FSDP
shards runs each pass in ``fsdp.lockstep`` (a process with fewer batches, or a ``generate`` that stops sooner, runs
placeholder forwards until all are done, since every forward gathers the weights from all processes). Each pass shows
its progress on the main process: a bar on a terminal, a line every 30 s with the time left in a log.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora_fast.study.causal_lm import PLAIN_HEAD_MODEL_TYPES, LastTokenLM
from lora_fast.study.distributed import all_sum, rank_and_world
from lora_fast.study.fsdp import lockstep
from lora_fast.study.packing import Packing, prefix_cached_forward, resolve_packing
from lora_fast.study.progress import progress
from lora_fast.study.prompts import LABEL_WORDS, EncodedSplit, encode_prompt, label_token_ids, text_prefix
from lora_fast.study.training import collate

__all__ = [
    "SHARED_FORWARD_MODEL_TYPES",
    "SplitPredictions",
    "label_accuracy",
    "val_loss",
    "generation_accuracy",
    "parse_label",
    "predict_split",
    "score_split",
]


OFF = Packing()  # padded batches


def _shard(n: int) -> list[int]:
    """The example indices this process scores: every ``world``-th from its rank."""
    rank, world = rank_and_world()
    return list(range(rank, n, world))


def _batches(
    lengths: Sequence[int],
    batch_size: int,
    desc: str,
    indices: Sequence[int] | None = None,
    groups: Mapping[int, int] | None = None,
) -> Iterable[list[int]]:
    """``indices`` (default: this process's share) sorted by length (less padding) and cut into batches, each batch
    within one value of ``groups[i]`` when given, behind progress named ``desc`` (main process only: a bar on a
    terminal, lines with the time left elsewhere, ``lora_fast.study.progress``)."""
    group = (lambda i: groups[i]) if groups is not None else (lambda i: 0)
    mine = sorted(_shard(len(lengths)) if indices is None else indices, key=lambda i: (group(i), -lengths[i]))
    batches = []
    for _, run in itertools.groupby(mine, key=group):
        run = list(run)
        batches += [run[i : i + batch_size] for i in range(0, len(run), batch_size)]
    return progress(batches, desc=desc, unit="batch", main=rank_and_world()[0] == 0, leave=False)


def _ratio(correct: float, n: float) -> float:
    return correct / n if n else float("nan")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode inside, and on a sharded model the processes' forwards in lockstep (``fsdp.lockstep``)."""
    was = model.training
    model.eval()
    try:
        with lockstep(model):
            yield
    finally:
        model.train(was)


@torch.no_grad()
def _scores(
    head: LastTokenLM,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batches: Iterable[list[int]],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    label_ids: Sequence[int] | None,
    padding_side: str = "right",
    packing: Packing = OFF,
):
    for idx in batches:
        batch = packing.batch([sequences[i] for i in idx], pad_id, padding_side, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = head(
                batch["input_ids"],
                batch["attention_mask"],
                batch["position_ids"],
                batch["last_index"],
                label_ids,
                row_index=batch.get("row_index"),
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
    packing: str | Packing = "off",
) -> dict[str, float]:
    """``{"acc", "correct", "n"}``: argmax over the two label-token logits at each prompt's last token.
    ``label_ids`` is ``(negative_id, positive_id)``, so the argmax is the dataset label. ``packing``: a
    ``--packing`` choice or a resolved ``Packing`` (``packing.resolve_packing``, for evaluation)."""
    device = torch.device(device)
    head, packing = LastTokenLM(model), resolve_packing(model, packing, training=False)
    correct = 0
    batches = _batches([len(s) for s in sequences], batch_size, "label-logit accuracy")
    with _eval_mode(model):
        for idx, logits in _scores(
            head, sequences, pad_id, batches, device, amp_dtype, label_ids, padding_side, packing
        ):
            pred = logits.argmax(-1).cpu()
            correct += int((pred == torch.as_tensor([labels[i] for i in idx])).sum())
    correct, n = all_sum([correct, len(_shard(len(sequences)))], device)
    return {"acc": _ratio(correct, n), "correct": int(correct), "n": int(n)}


def val_loss(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    targets: Sequence[int],
    pad_id: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    padding_side: str = "right",
    packing: str | Packing = "off",
) -> float:
    """Mean full-vocabulary cross-entropy of the label token ``targets[i]`` after prompt ``sequences[i]``;
    ``packing`` as ``label_accuracy``'s."""
    device = torch.device(device)
    head, packing = LastTokenLM(model), resolve_packing(model, packing, training=False)
    total = 0.0
    batches = _batches([len(s) for s in sequences], batch_size, "validation loss")
    with _eval_mode(model):
        for idx, logits in _scores(head, sequences, pad_id, batches, device, amp_dtype, None, padding_side, packing):
            target = torch.as_tensor([targets[i] for i in idx], device=device)
            total += float(F.cross_entropy(logits, target, reduction="sum"))
    total, n = all_sum([total, len(_shard(len(sequences)))], device)
    return _ratio(total, n)


def parse_label(generated: str) -> int:
    """The study's string match: 1 when the generated text starts with "positive", 0 with "negative", else -1."""
    text = generated.strip().lower()
    for label, word in enumerate(LABEL_WORDS):
        if text.startswith(word.strip()):
            return label
    return -1


def _generation_ids(tokenizer, prompts: Sequence[str], max_new_tokens: int, max_length: int) -> list[list[int]]:
    """The generation metric's input per prompt: ``prompt + " "`` tokenised after the tokenizer's prefix (a BOS, where
    it adds one), cut from the left of the text to leave room for the new tokens."""
    prefix = text_prefix(tokenizer)
    return [encode_prompt(tokenizer, p + " ", max_length - max_new_tokens, prefix) for p in prompts]


def _generation_pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _generate(
    model: nn.Module,
    tokenizer,
    batch: dict[str, torch.Tensor],
    pad_id: int,
    max_new_tokens: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    **cache,
) -> list[str]:
    """Greedy ``generate`` after each left-padded row of ``batch``, decoded; ``cache`` passes a key/value cache of
    the batch's first columns (the model's own name for it), which ``generate`` continues from."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            synced_gpus=False,  # a sharded model's processes keep in step in _eval_mode (fsdp.lockstep) instead
            **cache,
        )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def _generations(
    model: nn.Module,
    tokenizer,
    encoded: Sequence[Sequence[int]],
    pad_id: int,
    batches: Iterable[list[int]],
    max_new_tokens: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> Iterator[tuple[list[int], list[str]]]:
    for idx in batches:
        batch = collate([encoded[i] for i in idx], pad_id, "left", device)
        yield idx, _generate(model, tokenizer, batch, pad_id, max_new_tokens, device, amp_dtype)


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
    encoded = _generation_ids(tokenizer, prompts, max_new_tokens, max_length)
    correct = invalid = 0
    pad_id = _generation_pad_id(tokenizer)
    batches = _batches([len(s) for s in encoded], batch_size, "generation accuracy")
    with _eval_mode(model):
        for idx, texts in _generations(model, tokenizer, encoded, pad_id, batches, max_new_tokens, device, amp_dtype):
            for i, text in zip(idx, texts, strict=True):
                pred = parse_label(text)
                invalid += pred == -1
                correct += pred == labels[i]
    correct, invalid, n = all_sum([correct, invalid, len(_shard(len(prompts)))], device)
    return {"acc": _ratio(correct, n), "correct": int(correct), "invalid": int(invalid), "n": int(n)}


# ---------------------------------------------------------------- both metrics from one forward over each prompt


# Model types whose plain forward with ``logits_to_keep=1`` gives ``LastTokenLM``'s label logits (a linear head on the
# last hidden state) and whose ``generate``, continued from that forward's cache, runs what a fresh ``generate`` runs
# (the same dynamic cache, built from the config). Any other model takes the two passes.
SHARED_FORWARD_MODEL_TYPES = PLAIN_HEAD_MODEL_TYPES

# The generation settings (``model.generation_config``, non-default values) under which a ``generate`` continued from
# our cache is a fresh greedy ``generate``: special tokens, length limits, sampling parameters (unused: we pass
# ``do_sample=False``) with any value; one sequence per prompt (beams or returned copies would need the cache
# expanded), the cache on, no extra outputs, with the values given. Any other setting takes the two passes.
_ANY_VALUE = frozenset(
    "bos_token_id eos_token_id pad_token_id max_length max_new_tokens do_sample temperature top_k top_p "
    "_from_model_config transformers_version".split()
)
_REQUIRED_VALUE = {
    "use_cache": True,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict_in_generate": False,
}


def _cache_name(model: nn.Module) -> str | None:
    """The name of the key/value cache argument of ``model.forward`` and ``generate`` (``cache`` in transformers
    5.24, ``past_key_values`` before), or None."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _shares_forward(model: nn.Module) -> bool:
    """Whether one forward over the prompt gives both metrics exactly on ``model``: its type, its forward's
    arguments and its generation settings (the tables above)."""
    if getattr(getattr(model, "config", None), "model_type", None) not in SHARED_FORWARD_MODEL_TYPES:
        return False
    if _cache_name(model) is None or "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return False
    config = getattr(model, "generation_config", None)
    if config is None:
        return False
    return all(k in _ANY_VALUE or _REQUIRED_VALUE.get(k, object()) == v for k, v in config.to_diff_dict().items())


def _tail_length(prompt_ids: Sequence[int], generation_ids: Sequence[int]) -> int:
    """``len(tail)`` when ``generation_ids == prompt_ids + tail`` with a tail (the trailing space), else 0."""
    n = len(prompt_ids)
    return len(generation_ids) - n if len(generation_ids) > n and list(generation_ids[:n]) == list(prompt_ids) else 0


@torch.no_grad()
def _shared_pass(
    model: nn.Module,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    generation_ids: Sequence[Sequence[int]],
    pad_id: int,
    label_ids: Sequence[int],
    max_new_tokens: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    share_prefix: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """``(label logits (B, 2) in fp32, generated texts)`` of a batch whose generation inputs are its prompts plus
    tails of one length, from one forward over the prompts (``packing.prefix_cached_forward``; with
    ``share_prefix``, the prompts' common prefix runs once). Both are left-padded: with one tail length, the prompts'
    columns are the first columns of the generation input, so the cache holds what ``generate``'s own first forward
    would compute there, and ``generate`` runs the tail and the new tokens only."""
    name = _cache_name(model)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out, prompt = prefix_cached_forward(model, prompt_ids, pad_id, name, share_prefix, device)
    tails = torch.tensor([list(g[len(p) :]) for p, g in zip(prompt_ids, generation_ids, strict=True)], device=device)
    full = {
        "input_ids": torch.cat([prompt["input_ids"], tails], 1),
        "attention_mask": torch.cat([prompt["attention_mask"], torch.ones_like(tails)], 1),
    }
    logits = out.logits[:, -1, list(label_ids)].float()  # every row's last real token: left padding
    texts = _generate(model, tokenizer, full, pad_id, max_new_tokens, device, amp_dtype, **{name: out[name]})
    return logits, texts


@dataclass
class SplitPredictions:
    """This process's examples of a split, by index: the label-token logits ``(negative, positive)`` in fp32 at the
    prompt's last token, the text generated after ``prompt + " "``, and the examples whose prompt ran one forward
    for both (the others ran two passes)."""

    label_logits: dict[int, torch.Tensor]
    generated: dict[int, str]
    shared: set[int]


def predict_split(
    model: nn.Module,
    tokenizer,
    split: EncodedSplit,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    padding_side: str = "right",
    gen_tokens: int = 3,
    max_length: int = 1024,
    share: bool = True,
    packing: str | Packing = "off",
) -> SplitPredictions:
    """Both metrics' raw predictions for this process's examples of ``split``: one forward per prompt where
    ``_shares_forward(model)`` and the example's tokens split as prompt + tail, else (and for every example with
    ``share=False``) ``label_accuracy``'s pass (``padding_side``) and ``generation_accuracy``'s. ``packing``
    (``label_accuracy``'s): ``prefix`` runs each batch's common prefix once in the one forward (its keys and values
    shared across the batch, for generation too) and packs the label pass; ``flat`` packs the label pass only, as
    generation needs rows; generation alone is always padded."""
    device = torch.device(device)
    packing = resolve_packing(model, packing, training=False)
    label_ids, pad_id = label_token_ids(tokenizer), _generation_pad_id(tokenizer)
    generation_ids = _generation_ids(tokenizer, split.prompts, gen_tokens, max_length)
    mine = _shard(len(split))
    tails = {i: _tail_length(split.sequences[i], generation_ids[i]) for i in mine}
    shared = [i for i in mine if tails[i]] if share and _shares_forward(model) else []
    alone = sorted(set(mine) - set(shared))
    logits, texts = {}, {}
    prompt_lengths, generation_lengths = [len(s) for s in split.sequences], [len(s) for s in generation_ids]
    with _eval_mode(model):
        if shared:
            batches = _batches(generation_lengths, batch_size, "label-logit and generation accuracy", shared, tails)
            for idx in batches:
                prompts, inputs = [split.sequences[i] for i in idx], [generation_ids[i] for i in idx]
                batch_logits, batch_texts = _shared_pass(
                    model, tokenizer, prompts, inputs, pad_id, label_ids, gen_tokens, device, amp_dtype,
                    share_prefix=packing.mode == "prefix",
                )  # fmt: skip
                logits.update(zip(idx, batch_logits.cpu(), strict=True))
                texts.update(zip(idx, batch_texts, strict=True))
        if alone:
            head = LastTokenLM(model)
            batches = _batches(prompt_lengths, batch_size, "label-logit accuracy", alone)
            pad = tokenizer.pad_token_id
            for idx, batch_logits in _scores(
                head, split.sequences, pad, batches, device, amp_dtype, label_ids, padding_side, packing
            ):
                logits.update(zip(idx, batch_logits.cpu(), strict=True))
            batches = _batches(generation_lengths, batch_size, "generation accuracy", alone)
            for idx, batch_texts in _generations(
                model, tokenizer, generation_ids, pad_id, batches, gen_tokens, device, amp_dtype
            ):
                texts.update(zip(idx, batch_texts, strict=True))
    return SplitPredictions(label_logits=logits, generated=texts, shared=set(shared))


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
    packing: str | Packing = "off",
) -> dict[str, float]:
    """``{"label_acc"}`` on ``split`` and, with ``generation``, the study's ``{"gen_acc", "gen_invalid"}``, both from
    one forward over each prompt where ``predict_split`` can; ``packing`` as ``predict_split``'s."""
    if not generation:
        pad, label_ids = tokenizer.pad_token_id, label_token_ids(tokenizer)
        acc = label_accuracy(
            model, split.sequences, split.labels, label_ids, pad, batch_size, device, amp_dtype, padding_side, packing
        )
        return {"label_acc": acc["acc"]}
    batching = dict(
        batch_size=batch_size, device=device, amp_dtype=amp_dtype, padding_side=padding_side, packing=packing
    )
    pred = predict_split(model, tokenizer, split, **batching, gen_tokens=gen_tokens, max_length=max_length)
    label_correct = sum(int(v.argmax()) == split.labels[i] for i, v in pred.label_logits.items())
    parsed = {i: parse_label(text) for i, text in pred.generated.items()}
    gen_correct = sum(p == split.labels[i] for i, p in parsed.items())
    invalid = sum(p == -1 for p in parsed.values())
    label_correct, gen_correct, invalid, n = all_sum(
        [label_correct, gen_correct, invalid, len(pred.label_logits)], torch.device(device)
    )
    return {"label_acc": _ratio(label_correct, n), "gen_acc": _ratio(gen_correct, n), "gen_invalid": int(invalid)}
