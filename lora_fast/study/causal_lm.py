"""The causal LM side of the study: loading a model and its tokenizer, GPT-2's GELU as one kernel, and the
last-token forward that the training step, the validation loss and the label-logit accuracy all run.

The loss is the LM loss on one token: the label word predicted at the prompt's last position (``"Label:"``). So the
forward runs the transformer body over the prompt, gathers the hidden state at each sequence's last real token, and
applies the LM head to those ``B`` rows only: ``(B, vocab)`` logits instead of HF's ``(B, T, vocab)`` (for gpt2-medium,
batch 32 and 128 tokens that is 0.8 GB of fp32 logits and their gradient that are never written). The loss equals HF's
``model(input_ids, labels=labels).loss`` with every position but the label masked (see ``prompts.encode_example``).
For GPT-2 the last transformer block, too, runs past its keys and values on those ``B`` rows only (see
``LastTokenLM``). Model families: ``load_causal_lm`` loads any ``AutoModelForCausalLM`` (a hub name, a folder or a
GGUF file); ``ATTENTION_PROJECTIONS`` gives LoRA's default targets per model type (GPT-2, Llama, Mistral, Qwen2/3);
``PLAIN_HEAD_MODEL_TYPES`` are the families whose head ``LastTokenLM`` applies itself to the gathered rows (any other
goes through its own forward with ``logits_to_keep``); the rows-only last block is GPT-2's
(``_gpt2_last_block_at_rows``), and another family takes the body path until it gets its own branch there.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.activations import NewGELUActivation

from lora_fast.gguf import PackedLinear
from lora_fast.io import recover_directory
from lora_fast.model import check_untied, find_targets
from lora_fast.study.errors import ModelLoadError, UsageError, first_line
from lora_fast.study.fsdp import is_sharded
from lora_fast.study.gguf import load_gguf, split_gguf
from lora_fast.study.hub import looks_local
from lora_fast.study.packing import model_mask

__all__ = [
    "ATTENTION_PROJECTIONS",
    "PLAIN_HEAD_MODEL_TYPES",
    "default_targets",
    "check_targets",
    "load_causal_lm",
    "max_positions",
    "use_fused_gelu",
    "LastTokenLM",
    "label_logits",
]


# ---------------------------------------------------------------- model loading and the GELU swap


# LoRA's default targets per model type (``--targets`` overrides them): the attention's input projections, then its
# output projection. GPT-2 computes query, key and value in one Conv1D; Llama, Mistral and Qwen use nn.Linear each.
ATTENTION_PROJECTIONS = {
    "gpt2": (["attn.c_attn"], ["attn.c_proj"]),
    **{kind: (["q_proj", "k_proj", "v_proj"], ["o_proj"]) for kind in ("llama", "mistral", "qwen2", "qwen3")},
}


def default_targets(model_type: str | None, output_projection: bool = True, flag: str = "--targets") -> list[str]:
    """LoRA's default target modules for ``model_type`` (``config.model_type``): the attention's query, key and
    value projections and, with ``output_projection``, its output projection. An unknown type is a UsageError that
    asks for ``flag``."""
    if model_type not in ATTENTION_PROJECTIONS:
        raise UsageError(
            f"no default LoRA targets for model type {model_type!r} (known: {', '.join(ATTENTION_PROJECTIONS)}): "
            f"pass {flag} with the names of the modules to wrap, e.g. {flag} q_proj v_proj"
        )
    inputs, output = ATTENTION_PROJECTIONS[model_type]
    return list(inputs) + (list(output) if output_projection else [])


def check_targets(model: nn.Module, targets: Sequence[str], flag: str = "--targets") -> None:
    """The checks of LoRA's target list that need the model (``find_targets``: each hits an ``nn.Linear``/``Conv1D``;
    ``check_untied``: no tied weight), with their refusals as one-line UsageErrors naming ``flag``: they are the
    user's to fix. Stricter than the library, which follows PEFT in only warning about a target that hits nothing
    while others hit something: on a command line that is a typo, and training on fewer modules than asked is a
    silent wrong run. Run right after the model loads, so ``apply_lora``, later, raises only on a bug."""
    try:
        check_untied(model, find_targets(model, targets, strict=True))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{flag} {' '.join(map(str, targets))}: {first_line(exc, 400)}") from None


def _set_dropout(config, dropout: float | None) -> None:
    if dropout is not None:
        for attr in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout"):
            if hasattr(config, attr):
                setattr(config, attr, dropout)


# Any of these in a model folder means it carries its tokenizer (fast, GPT-2 BPE, SentencePiece, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "vocab.txt")  # fmt: skip


def load_causal_lm(
    name_or_path: str,
    tokenizer_path: str | None = None,
    dropout: float | None = 0.0,
    dtype: torch.dtype = torch.float32,
    flag: str = "--model",
    gguf_file: str | None = None,
    keep_quantized: bool = False,
):
    """``(model, tokenizer)`` from a hub name, a local folder (weights, and the tokenizer unless ``tokenizer_path``
    names one) or a GGUF file (``name_or_path`` ending in ``.gguf``, or a folder plus ``gguf_file``: dequantised to
    ``dtype`` by ``lora_fast.study.gguf.load_gguf``). ``dropout`` sets the model's residual, embedding and attention
    dropout (None keeps the config's). The tokenizer gets ``pad = eos`` when it has no pad token, as GPT-2's has
    none. Errors are ModelLoadError naming ``flag``, the command-line option the name came from. A model folder that a
    killed save (``--method full``, ``gguf.save_model_folder``) left aside is put back first. ``keep_quantized``
    keeps a GGUF file's quantised weights packed (``--keep-quantized``; refused for any other model)."""
    if not name_or_path.endswith(".gguf"):
        recover_directory(name_or_path)  # a no-op unless a hidden ".<name>.<random>.old/<name>/" is there
    name_or_path, gguf_file = split_gguf(name_or_path, gguf_file, flag)
    if keep_quantized and not gguf_file:
        raise ModelLoadError(f"--keep-quantized keeps a GGUF file's weights packed; {flag} {name_or_path} is not one")
    if looks_local(name_or_path) and not os.path.isdir(name_or_path):
        raise ModelLoadError(
            f"{flag} {name_or_path}: no such folder (give a hub name such as gpt2, a folder with config.json, "
            f"weights and tokenizer files, or a .gguf file)"
        )
    if os.path.isdir(name_or_path) and not gguf_file and not tokenizer_path:
        if not any(os.path.isfile(os.path.join(name_or_path, f)) for f in TOKENIZER_FILES):
            raise ModelLoadError(
                f"{flag} {name_or_path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): pass "
                f"--tokenizer DIR, or save the tokenizer into the folder"
            )
    what = f"{flag} {name_or_path!r}" + (f" / --gguf-file {gguf_file!r}" if gguf_file else "")
    try:
        if gguf_file:
            model, tokenizer = load_gguf(
                name_or_path, gguf_file, dtype, lambda c: _set_dropout(c, dropout), tokenizer_path, keep_quantized
            )
        else:
            config = AutoConfig.from_pretrained(name_or_path)
            _set_dropout(config, dropout)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or name_or_path)
    except ModelLoadError:
        raise
    except Exception as e:  # hub offline, missing files, unknown architecture: one clear message
        raise ModelLoadError(
            f"could not load {what}"
            f"{f' / --tokenizer {tokenizer_path!r}' if tokenizer_path else ''}: {first_line(e)}. "
            f"Offline, pass a local folder; `python -m lora_fast.study.tiny OUT --tokenizer DIR` makes a "
            f"small random GPT-2 one"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise ModelLoadError(f"the tokenizer of {what} has neither a pad token nor an end-of-sequence token")
    return model, tokenizer


def max_positions(config) -> int | None:
    """The longest sequence the model's positions cover (GPT-2's ``n_positions``, Llama's and most others'
    ``max_position_embeddings``), or None when the config names no limit."""
    for attr in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    return None


def use_fused_gelu(model: nn.Module) -> int:
    """Replace every HF ``NewGELUActivation`` (GPT-2's ``gelu_new``, written as six elementwise ops) by
    ``nn.GELU(approximate="tanh")``, one fused kernel computing the same formula (equal to ~1e-6 in fp32). Explicit
    child replacement in each parent, no class patching. Returns how many modules were replaced."""
    hits = [name for name, module in model.named_modules() if isinstance(module, NewGELUActivation)]
    for name in hits:
        model.set_submodule(name, nn.GELU(approximate="tanh"))
    return len(hits)


# ---------------------------------------------------------------- the last-token forward


class _StopBeforeLastBlock(Exception):
    """Raised by the pre-hook on GPT-2's last block to leave HF's body with that block's input; private."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _gpt2_last_block_ok(model: nn.Module) -> bool:
    """Whether ``LastTokenLM``'s rows-only last block reproduces HF's block exactly for ``model``: GPT-2, self-attention
    only, without ``reorder_and_upcast_attn`` (a different attention formula, upcast and reordered)."""
    config = getattr(model, "config", None)
    body = getattr(model, "base_model", None)
    if config is None or getattr(config, "model_type", None) != "gpt2":
        return False
    if getattr(config, "reorder_and_upcast_attn", False) or getattr(config, "add_cross_attention", False):
        return False
    blocks = getattr(body, "h", None)
    if (
        not isinstance(blocks, nn.ModuleList)
        or len(blocks) == 0
        or not isinstance(getattr(body, "ln_f", None), nn.Module)
    ):
        return False
    attn = getattr(blocks[-1], "attn", None)
    return attn is not None and not getattr(attn, "is_cross_attention", False) and hasattr(blocks[-1], "mlp")


# Model types whose logits are exactly ``get_output_embeddings()(base_model(...).last_hidden_state)``: the LM head is
# a plain linear map of the body's output, with no scaling or soft-capping after it (their ``*ForCausalLM.forward`` in
# transformers 5.x). ``LastTokenLM`` gathers the body's hidden states at the label rows for these; any other model
# goes through its own forward with ``logits_to_keep``, so that whatever its head does is done.
PLAIN_HEAD_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


def _left_aligned(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, last_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch with each row rotated so that its last real token sits at the last column (right padding becomes
    left padding; left-padded rows stay as they are). Position ids travel with their tokens and the mask hides the
    padding, so every real token's output is unchanged; the last index becomes ``T - 1`` for every row."""
    T = input_ids.shape[1]
    shift = (T - 1 - last_index)[:, None]  # (B, 1): how far each row moves right
    source = (torch.arange(T, device=input_ids.device)[None, :] - shift) % T  # (B, T): column each entry comes from
    aligned = [t.gather(1, source) for t in (input_ids, attention_mask, position_ids)]
    return (*aligned, torch.full_like(last_index, T - 1))


class LastTokenLM(nn.Module):
    """``forward(...) -> (B, vocab)``, or ``(B, len(label_ids))``: the LM head applied at each sequence's last real
    token only, on every model. A module (not a function) so that DDP can wrap it and see every forward.

    - Models of ``PLAIN_HEAD_MODEL_TYPES``: the body (``model.base_model``) runs over the prompt, the hidden state at
      each sequence's last real token is gathered and only those ``B`` rows go through the head (with ``label_ids``
      and a plain ``nn.Linear`` head, only those rows of its weight; a wrapped head, e.g. with LoRA, runs whole).
    - With ``last_block_rows_only`` (default) and a GPT-2 model, the last transformer block also runs at those ``B``
      rows only: blocks ``0..L-2`` run as HF runs them, then the last block's ``c_attn`` runs over all positions (its
      keys and values are needed everywhere) while the query, attention output projection, MLP, both layer norms,
      ``ln_f`` and their backward run on ``B`` rows instead of ``B·T``. The same ops on fewer rows: the logits equal
      the full path's up to GEMM blocking. GPT-2 with ``reorder_and_upcast_attn`` or cross-attention takes the body
      path, as does ``last_block_rows_only=False``.
    - Any other model: its own forward with ``logits_to_keep`` set to the distinct last positions of the batch (one
      with left padding), so the head runs on at most ``B`` positions per sequence and computes what HF computes.
    - A packed batch (``packing.pack_rows``: a 4-D ``attention_mask`` and ``row_index``; GPT-2 and Llama only): the
      same, with each sequence's last token at ``(row_index, last_index)`` of the packed rows.
    - A model FSDP2 shards (``--parallel fsdp``): its own forward too (the root's weights are whole only inside it),
      on the padded rows rotated to left padding (``_left_aligned``), so the head runs at one position, ``(B, vocab)``;
      no packed batch (``--packing`` is off under fsdp).
    """

    def __init__(self, model: nn.Module, last_block_rows_only: bool = True):
        super().__init__()
        self.model = model
        self.last_block_rows_only = last_block_rows_only

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        last_index: torch.Tensor,
        label_ids: Sequence[int] | None = None,
        row_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        packed = attention_mask.dim() == 4
        if packed != (row_index is not None):
            raise ValueError(
                f"LastTokenLM: a packed batch (4-D attention_mask) comes with row_index and a padded one (2-D) "
                f"without; got a {attention_mask.dim()}-D mask and row_index {'given' if packed else 'missing'}"
            )
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if is_sharded(self.model):
            # FSDP gathers its root's weights (embeddings, final norm, head) in the hooks of the model's own forward,
            # so a sharded model runs that forward; rows moved to the left end at one position, the head runs there.
            if packed:
                raise ValueError("LastTokenLM: a model FSDP2 shards takes padded batches only (--packing off)")
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            input_ids, attention_mask, position_ids, last_index = _left_aligned(
                input_ids, attention_mask, position_ids, last_index
            )
            return self._own_forward_at_rows(input_ids, attention_mask, position_ids, last_index, rows, label_ids)
        if not packed:
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            if model_type not in PLAIN_HEAD_MODEL_TYPES:
                return self._own_forward_at_rows(input_ids, attention_mask, position_ids, last_index, rows, label_ids)
            return self._head_at(self._hidden_at(input_ids, attention_mask, position_ids, last_index, rows), label_ids)
        if model_type not in PLAIN_HEAD_MODEL_TYPES:
            raise ValueError(f"model type {model_type!r}: LastTokenLM takes no packed batch for it")
        # Sequences ending at one node (equal sequences under prefix sharing) are one computation, as every shared
        # node is: one dropout draw, and the gradient of their sum.
        width = input_ids.shape[1]
        nodes, inverse = torch.unique(row_index * width + last_index, return_inverse=True)
        h = self._hidden_at(input_ids, attention_mask, position_ids, nodes % width, nodes // width)
        return self._head_at(h, label_ids)[inverse]

    def _hidden_at(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        last_index: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """The final hidden states ``(B, C)`` at ``(rows, last_index)``: GPT-2's rows-only last block, or the body."""
        if self.last_block_rows_only and _gpt2_last_block_ok(self.model):
            return self._gpt2_last_block_at_rows(input_ids, attention_mask, position_ids, last_index, rows)
        body = self.model.base_model  # GPT-2's transformer, Llama's model: embeddings, blocks, final norm
        mask = model_mask(self.model, attention_mask) if attention_mask.dim() == 4 else attention_mask
        hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return hidden.last_hidden_state[rows, last_index]  # (B, C)

    def _head_at(self, h: torch.Tensor, label_ids: Sequence[int] | None) -> torch.Tensor:
        """The LM head on the gathered rows ``h (B, C)``: all of the vocabulary, or the ``label_ids`` columns."""
        head = self.model.get_output_embeddings()
        if label_ids is None:
            return head(h)
        index = torch.as_tensor(list(label_ids), device=h.device)
        if type(head) is PackedLinear:  # a GGUF-packed head: only the label rows are dequantised
            bias = None if head.bias is None else head.bias[index].to(h.dtype)
            return F.linear(h, head.weight.rows(index, h.dtype), bias)
        if type(head) is not nn.Linear:  # a wrapper (LoRALinear, ...) adds to its weight: its own forward, then pick
            return head(h)[:, list(label_ids)]
        # Only the label rows of a plain head: (B, C) @ (C, 2).
        weight = head.weight[index]
        bias = None if getattr(head, "bias", None) is None else head.bias[list(label_ids)]
        return F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))

    def _own_forward_at_rows(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        last_index: torch.Tensor,
        rows: torch.Tensor,
        label_ids: Sequence[int] | None,
    ) -> torch.Tensor:
        """The model's own forward, logits kept at the batch's distinct last positions ``(B, U, vocab)``, then each
        row's own position. A model whose forward takes no ``logits_to_keep`` is refused by name."""
        if "logits_to_keep" not in inspect.signature(self.model.forward).parameters:
            raise ValueError(
                f"{type(self.model).__name__} (model type {getattr(self.model.config, 'model_type', None)!r}) takes "
                f"no logits_to_keep: LastTokenLM cannot compute its logits at the label position only"
            )
        keep = torch.unique(last_index)  # sorted
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=keep,
        ).logits
        logits = logits[rows, torch.searchsorted(keep, last_index)]  # (B, vocab)
        return logits if label_ids is None else logits[:, list(label_ids)]

    def _gpt2_last_block_at_rows(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        last_index: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """``ln_f`` output at ``(rows, last_index)``, ``(B, C)``: HF's body up to the last block, then that block on
        the label rows (GPT2Block.forward and GPT2Attention.forward of transformers 5.x, SDPA form)."""
        body = self.model.base_model
        block = body.h[-1]
        attn = block.attn

        # How to stop HF's body before the last block: a forward pre-hook on that block that takes its input hidden
        # states and raises. Chosen over swapping ``body.h``/``ln_f`` for truncated copies because it changes no
        # module of the model (nothing to restore if anything raises, nothing another thread or DDP could see
        # half-swapped) and assumes nothing about how HF's loop walks the blocks or applies ``ln_f``: only that the
        # block is called with its hidden states first (positionally, or as ``hidden_states=``), true across
        # transformers 5.x. It also fires inside gradient checkpointing, whose layer wrapper calls the module.
        def grab(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            raise _StopBeforeLastBlock(hidden)

        packed = attention_mask.dim() == 4
        handle = block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            mask = model_mask(self.model, attention_mask) if packed else attention_mask
            body(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        except _StopBeforeLastBlock as stop:
            hidden = stop.hidden
        else:  # pragma: no cover - the hook always fires when the body runs its blocks
            raise RuntimeError("GPT-2's last block was never called")
        finally:
            handle.remove()

        R, T, C = hidden.shape  # R = B padded rows, or the packed rows
        B = rows.shape[0]
        H = attn.num_heads
        D = C // H
        qkv = attn.c_attn(block.ln_1(hidden))  # (R, T, 3C) over all positions: keys and values are needed everywhere
        q, k, v = qkv.split(C, dim=2)
        q = q[rows, last_index].view(B, 1, H, D).transpose(1, 2)  # (B, H, 1, D): the label row's query only
        k = k.view(R, T, H, D).transpose(1, 2)
        v = v.view(R, T, H, D).transpose(1, 2)
        # Keys the label row may see. Packed: its packed row's keys (B, H, T, D) under its row of the 4-D mask (the
        # tokens before it in its sequence, shared or not). Padded: real tokens at or before it (causal + padding
        # mask, either padding side).
        if packed:
            k, v = k[rows], v[rows]
            allowed = attention_mask[rows, 0, last_index]  # (B, T)
        else:
            positions = torch.arange(T, device=hidden.device)
            allowed = (attention_mask != 0) & (positions[None, :] <= last_index[:, None])  # (B, T)
        scale = 1.0
        if attn.scale_attn_weights:
            scale = D**-0.5
        if attn.scale_attn_by_inverse_layer_idx:
            scale /= float(attn.layer_idx + 1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed[:, None, None, :],
            dropout_p=attn.attn_dropout.p if attn.training else 0.0,
            scale=scale,
        )  # (B, H, 1, D)
        out = out.transpose(1, 2).reshape(B, 1, C)
        out = attn.resid_dropout(attn.c_proj(out))
        x = out + hidden[rows, last_index].unsqueeze(1)  # (B, 1, C)
        x = x + block.mlp(block.ln_2(x))
        return body.ln_f(x).squeeze(1)


def label_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    label_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """Logits at each sequence's last real token: ``(B, vocab)``, or ``(B, len(label_ids))``. Works for left or
    right padding; position ids are derived from the mask when not given."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    T = attention_mask.shape[1]
    # Last real token: the highest index whose mask is 1 (right padding: length - 1; left padding: T - 1).
    last_index = T - 1 - attention_mask.long().flip(1).argmax(1)
    head = model if isinstance(model, LastTokenLM) else LastTokenLM(model)
    return head(input_ids, attention_mask, position_ids, last_index, label_ids)
