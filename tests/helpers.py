"""What several test modules share: the data tier's paths, the CUDA-tier marker, small model configs.

Imported as ``from tests.helpers import ...`` everywhere (the repository root is on ``sys.path``, see pyproject's
``pythonpath``); ``conftest.py`` holds only the session set-up and fixtures.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The data tier: the real GPT-2 tokenizer and the real Rotten Tomatoes splits, found through one variable naming a
# folder that holds `gpt2-tokenizer/` (HF format) and `rotten_tomatoes/` (train/validation/test.jsonl). Without it,
# the tier's tests are skipped with that reason; with LORA_FAST_DATA_TIER=require (CI) a missing folder is a failure.
DATA_ENV = "LORA_FAST_DATA"
DATA_ROOT = pathlib.Path(os.environ[DATA_ENV]).expanduser() if os.environ.get(DATA_ENV) else None
TOKENIZER_DIR = DATA_ROOT / "gpt2-tokenizer" if DATA_ROOT else None
DATA_DIR = DATA_ROOT / "rotten_tomatoes" if DATA_ROOT else None


def require_data() -> tuple[pathlib.Path, pathlib.Path]:
    """``(DATA_DIR, TOKENIZER_DIR)`` for a data-tier test, or its skip (a failure under LORA_FAST_DATA_TIER=require)
    naming what is missing."""
    if DATA_ROOT is None:
        reason = f"data tier: set {DATA_ENV} to a folder holding gpt2-tokenizer/ and rotten_tomatoes/ (README, tests)"
    else:
        missing = [str(d) for d in (TOKENIZER_DIR, DATA_DIR) if not d.is_dir()]
        reason = f"data tier: {DATA_ENV}={DATA_ROOT} lacks {' and '.join(missing)}" if missing else None
    if reason is None:
        return DATA_DIR, TOKENIZER_DIR
    if os.environ.get("LORA_FAST_DATA_TIER") == "require":
        pytest.fail(f"{reason}, and LORA_FAST_DATA_TIER=require")
    pytest.skip(reason)


# A script run in a test: no hub access (fail fast instead of retrying the network), one thread (a shared machine).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tier: no CUDA device on this machine")


def tiny_gpt2_config(**overrides):
    """A small random GPT-2 config with the real vocabulary (50,257 tokens)."""
    from transformers import GPT2Config

    kw = dict(
        vocab_size=50257,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    kw.update(overrides)
    return GPT2Config(**kw)


def tiny_llama_config(**overrides):
    """A small random Llama config (vocabulary of 100 tokens): nn.Linear projections, untied embeddings."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def model_snapshot(model):
    """Copies of the state_dict and the module types, for ``unchanged_since``."""
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def unchanged_since(model, snapshot) -> bool:
    """True when ``model`` holds exactly the tensors and module types of ``snapshot`` (a refusal touched nothing)."""
    state, types = snapshot
    now = model.state_dict()
    return (
        set(now) == set(state)
        and all(torch.equal(now[k], v) for k, v in state.items())
        and types == [type(m) for m in model.modules()]
    )


def run_script(
    args, script: str = "train_sentiment.py", timeout: float = 300, env: dict | None = None, umask: int | None = None
) -> subprocess.CompletedProcess:
    """``python <script> <args>`` in a fresh process at the repository root, offline, with its output captured.
    ``env`` adds variables (a value None removes one); ``umask`` is the process's umask."""
    environ = {**os.environ, **OFFLINE_ENV, **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        env={k: v for k, v in environ.items() if v is not None},
        cwd=ROOT,
        timeout=timeout,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def run_compile_tier(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` (a compile tier of bench/) in a fresh process at the repository root, with
    Triton's interpreter off (the kernels are compiled for real GPU targets, never run) and one thread per math
    library; output captured, 10 minutes at most."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that report an error (``error: ...``), after a carriage return where a progress bar
    shares the line."""
    return [ln.split("\r")[-1] for ln in stderr.splitlines() if ln.split("\r")[-1].startswith("error:")]


def kill_at_rename(monkeypatch, call):
    """``os.replace`` in :mod:`lora_fast.io` raises on its ``call``-th use, as a kill at that moment would (per-file
    saves: 1 the weights, 2 the config; a whole-folder swap: 1 the old folder aside, 2 the new one in)."""
    import lora_fast.io

    calls, real = [], lora_fast.io.os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == call:
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(lora_fast.io.os, "replace", replace)
