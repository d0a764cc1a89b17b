"""Operator-side adapter registration (CLI, embedded runs): validate, then register shared."""
from __future__ import annotations

import os
from pathlib import Path


def register_shared(queue, settings, name: str, source: str, revision: str | None = None,
                    tenant_id: str | None = None):
    """Validate a local PEFT directory against the base model (engine rules) and register it.

    Hub ids are registered as given; the worker validates them when it loads them.
    Raises ``engine.errors.LoRAError`` (or ValueError) naming the problem.
    """
    from lorry.engine.lora.spec import parse_adapter, read_base_config

    rank = None
    local = Path(os.path.expanduser(source))
    if local.exists() or source.startswith(("/", ".", "~")):
        source = os.path.realpath(local)
        spec = parse_adapter(source, read_base_config(settings.model),
                             max_lora_rank=settings.max_lora_rank, base_model=settings.model)
        rank = spec.max_rank or spec.r
        revision = None
    return queue.register_adapter(name, source, tenant_id=tenant_id, revision=revision,
                                  base_model=settings.model, rank=rank)


def demo_adapter_dirs(root: str | Path = "adapters/demo") -> dict[str, Path]:
    """name -> directory of every PEFT adapter under ``root`` (adapters/demo/<name>/)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {p.name: p.resolve() for p in sorted(root.iterdir())
            if (p / "adapter_config.json").is_file()}
