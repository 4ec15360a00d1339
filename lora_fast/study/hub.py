"""The Hugging Face hub, checked once before anything loads.

A run names its model, tokenizer and data either by hub name (``gpt2``, ``rotten_tomatoes``) or as local paths.
Without a reachable hub, transformers and datasets each retry for tens of seconds and then fail one at a time, so a
user learns of ``--data-dir`` first and of ``--model`` only on the next try. :func:`check_hub_inputs` instead asks
once whether the hub answers (one TCP connection with a short timeout, or none when ``HF_HUB_OFFLINE`` is set); when
it does not, it puts transformers and datasets into offline mode (what is in the local cache still loads, without
retries) and tries each hub-named input from the cache alone, then names every one that is missing in one error.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from urllib.parse import urlparse

from lora_fast.study.errors import UsageError, first_line

__all__ = ["check_hub_inputs", "hub_reachable", "looks_local"]

OFFLINE_HELP = "pass local copies instead (README, 'Offline, on a CPU'; docs/TRAINING.md, 'Offline use')"
TRUE = {"1", "ON", "YES", "TRUE"}


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a path rather than a hub name (``gpt2``, ``org/name``): it exists, is absolute,
    starts with ``.`` or ``~``, is a ``.gguf`` file, has more than one ``/``, or its first part is a local folder
    (``runs/typo``: a mistyped path, not a repository)."""
    if os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(".gguf"):
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def _offline_env() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in TRUE:
            return f"{var}={os.environ[var]}"
    return None


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """``(reachable, why not)``: False at once when an offline variable is set, else whether the hub's endpoint
    (``HF_ENDPOINT``, default huggingface.co) accepts a TCP connection within ``timeout`` seconds."""
    offline = _offline_env()
    if offline:
        return False, offline
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, ""
    except OSError as exc:
        return False, f"{host}:{port}: {first_line(exc, 80)}"


def _go_offline() -> None:
    """Offline mode for this process: the environment for what reads it later, and the flags transformers
    (through huggingface_hub) and datasets already read at import."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config
    except ImportError:
        return
    datasets.config.HF_HUB_OFFLINE = True


def _in_cache(kind: str, name: str) -> None:
    """Load ``name`` (a model's config, a tokenizer, a GGUF file ``gguf:FILE`` of a repository, or a dataset) from
    the local cache alone: it raises when it is not there."""
    if kind == "dataset":
        from lora_fast.study.data import load_hub

        load_hub(name)
    elif kind.startswith("gguf:"):
        from huggingface_hub import hf_hub_download

        hf_hub_download(name, kind.removeprefix("gguf:"), local_files_only=True)
    else:
        from transformers import AutoConfig, AutoTokenizer

        (AutoTokenizer if kind == "tokenizer" else AutoConfig).from_pretrained(name, local_files_only=True)


def check_hub_inputs(named: Sequence[tuple[str, str | None, str]], timeout: float = 3.0) -> None:
    """``named``: ``(flag, name, kind)`` for each input, kind ``model``, ``tokenizer``, ``dataset`` or
    ``gguf:FILE``; a None or local name needs no hub. Nothing happens when no input needs the hub or the hub answers.
    Otherwise offline mode (``_go_offline``), and one UsageError naming every hub-named input the local cache lacks,
    with the flag that replaces it."""
    hub = [(flag, name, kind) for flag, name, kind in named if name and not looks_local(name)]
    if not hub:
        return
    reachable, why = hub_reachable(timeout)
    if reachable:
        return
    _go_offline()
    missing = []
    for flag, name, kind in hub:
        try:
            _in_cache(kind, name)
        except Exception:  # any failure to load from the cache alone means "not usable offline"
            missing.append(f"{flag} (now the hub name {name!r}, not in the local cache)")
    if missing:
        raise UsageError(f"the Hugging Face hub is unreachable ({why}) and the run needs it for: "
                         f"{'; '.join(missing)}; {OFFLINE_HELP}")  # fmt: skip
