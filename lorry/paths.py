"""Output paths checked before long work writes them (stdlib only: the client's CLI and the
embedded runner share it)."""
from __future__ import annotations

import os
from pathlib import Path


def check_writable(path: Path) -> None:
    """Raise ValueError unless ``path`` can be written as a file (its folder exists and is
    writable; it is no folder; an existing file is writable)."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory")
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"cannot write {path}: permission denied")
