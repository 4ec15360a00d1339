"""A small random GPT-2 saved as a model folder, for offline smoke runs and tests.

``make_tiny_gpt2(out_dir, tokenizer_dir)`` writes a ``GPT2LMHeadModel`` with the real 50,257-token vocabulary but a
few layers of width 32–64, together with the tokenizer, so ``--model out_dir`` loads it like a hub checkpoint::

    python -m lora_fast.study.tiny /tmp/tiny-gpt2 --tokenizer path/to/gpt2-tokenizer
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

__all__ = ["make_tiny_gpt2"]


def make_tiny_gpt2(
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Save a random GPT-2 (``seed`` fixes the weights) and the tokenizer from ``tokenizer_dir`` to ``out_dir``."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_fast.study.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write the model and tokenizer to")
    parser.add_argument("--tokenizer", required=True, help="folder of a GPT-2 tokenizer (a save_pretrained folder)")
    parser.add_argument("--n-layer", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--n-embd", type=int, default=64, help="hidden width (default 64)")
    parser.add_argument("--n-head", type=int, default=2, help="attention heads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    if not Path(args.tokenizer).is_dir():
        print(f"error: --tokenizer {args.tokenizer}: no such folder", file=sys.stderr)
        return 2
    out = make_tiny_gpt2(
        args.out, args.tokenizer, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, seed=args.seed
    )
    print(f"wrote a random GPT-2 ({args.n_layer} layers, width {args.n_embd}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
