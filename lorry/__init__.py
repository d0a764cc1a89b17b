"""Lorry's public face: the Python client (``from lorry import Client``), settings and CLI."""
from __future__ import annotations

__all__ = ["Client", "LorryError"]


def __getattr__(name: str):
    # Lazy, so that `lorry --help` and settings imports stay light.
    if name == "Client":
        from lorry.client import Client
        return Client
    if name == "LorryError":
        from lorry.errors import LorryError
        return LorryError
    raise AttributeError(f"module 'lorry' has no attribute {name!r}")
