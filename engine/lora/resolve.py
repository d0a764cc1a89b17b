"""Find a model or adapter directory: a local path, or a Hub repo id through huggingface_hub.

Hub downloads go through ``snapshot_download``, so with ``HF_HUB_OFFLINE=1`` a repo already in
the local cache (``HF_HUB_CACHE``) resolves without network.
"""
from __future__ import annotations

import os
from pathlib import Path

from lorry.engine.errors import AdapterNotFoundError


def resolve_dir(name_or_path: str, *, revision: str | None = None,
                allow_patterns: list[str] | None = None, what: str = "adapter") -> Path:
    """Return a local directory for ``name_or_path`` (downloading from the Hub if needed).

    Raises ``AdapterNotFoundError`` (a LoRAError) for adapters and ``FileNotFoundError``
    for models when neither a local directory nor a reachable Hub repo exists.
    """
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        return local
    error = AdapterNotFoundError if what == "adapter" else FileNotFoundError
    if local.exists() or name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise error(f"{what} {name_or_path!r}: no such directory (and not a Hub repo id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name_or_path, revision=revision,
                                      allow_patterns=allow_patterns))
    except HFValidationError as e:
        raise error(f"{what} {name_or_path!r} is neither a local directory nor a valid Hub repo "
                    f"id: {e}") from None
    except Exception as e:  # network errors, missing repo/revision, offline cache misses  # noqa: BLE001
        raise error(f"{what} {name_or_path!r} (revision {revision!r}) could not be fetched from "
                    f"the Hugging Face Hub or its local cache: {type(e).__name__}: {e}") from None


ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"]
