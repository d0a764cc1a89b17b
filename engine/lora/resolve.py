"""Find a model or adapter directory: a local path, or a Hub repo id through huggingface_hub.

Adapters follow ``engine.lora.sources``: the form of the source decides local vs Hub, and a
local adapter must lie inside the allowed roots. Hub downloads go through
``snapshot_download``, so with ``HF_HUB_OFFLINE=1`` a repo already in the local cache
(``HF_HUB_CACHE``) resolves without network.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lorry.engine.errors import AdapterNotFoundError
from lorry.engine.lora.sources import ADAPTER_FILES, LOCAL, check_source

MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"]
__all__ = ["ADAPTER_FILES", "MODEL_FILES", "resolve_adapter_dir", "resolve_dir"]


def resolve_adapter_dir(source: str, *, revision: str | None = None,
                        roots: Sequence[str] | None = None) -> Path:
    """The local directory of adapter ``source``: its real path when it is an absolute path
    inside ``roots`` (None: anywhere), else a snapshot of the Hub repo ``owner/name``.

    Raises ``AdapterSourceError`` for a source the rules refuse and ``AdapterNotFoundError``
    when the Hub repo cannot be fetched (both LoRAErrors).
    """
    src = check_source(source, revision=revision, roots=roots)
    if src.kind == LOCAL:
        if not os.path.isdir(src.location):
            raise AdapterNotFoundError(f"adapter {source!r}: no such directory")
        return Path(src.location)
    return _snapshot(src.location, revision, ADAPTER_FILES, AdapterNotFoundError, "adapter",
                     hint="; a local adapter is given by its absolute path")


def resolve_dir(name_or_path: str, *, revision: str | None = None,
                allow_patterns: list[str] | None = None, what: str = "adapter") -> Path:
    """Return a local directory for ``name_or_path`` (downloading from the Hub if needed).

    Adapters (``what="adapter"``) follow ``resolve_adapter_dir`` without root confinement.
    A model may also be a relative directory (the operator's own configuration). Raises
    ``FileNotFoundError`` for models when neither a local directory nor a reachable Hub repo
    exists.
    """
    if what == "adapter":
        return resolve_adapter_dir(name_or_path, revision=revision)
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        return local
    if local.exists() or name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"{what} {name_or_path!r}: no such directory (and not a Hub "
                                "repo id)")
    return _snapshot(name_or_path, revision, allow_patterns, FileNotFoundError, what)


def _snapshot(repo_id: str, revision: str | None, allow_patterns, error, what: str,
              hint: str = "") -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    except HFValidationError as e:
        raise error(f"{what} {repo_id!r} is neither a local directory nor a valid Hub repo "
                    f"id: {e}") from None
    except Exception as e:  # network errors, missing repo/revision, offline cache misses  # noqa: BLE001
        raise error(f"{what} {repo_id!r} (revision {revision!r}) could not be fetched from "
                    f"the Hugging Face Hub or its local cache: {type(e).__name__}: {e}{hint}"
                    ) from None
