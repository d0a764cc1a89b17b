"""Operator-side adapter registration (CLI, embedded runs): validate, then register shared."""
from __future__ import annotations

import os
import re
from pathlib import Path


def operator_source(source: str) -> str:
    """An operator's source as the shared rules read it: a path the operator wrote relative
    to their own working directory ('./x', '../x', '.', or any relative path naming a
    directory there, 'adapters/sql' included, as Hugging Face's from_pretrained prefers a
    local directory) becomes absolute (and must then lie in the adapter roots); anything
    else is left for ``engine.lora.sources`` to decide (absolute path, or Hub id
    'owner/name'). Only the operator's own tools do this: a tenant's source through the API
    is never looked up on the server's disk."""
    from lorry.engine.lora.sources import HUB, source_kind

    if source in (".", "..") or source.startswith(("./", "../")):
        return os.path.abspath(source)
    if source and not source.startswith(("/", "~")) and os.path.isdir(source):
        return os.path.abspath(source)
    if source and not source.startswith(("/", "~")):
        try:
            hub = source_kind(source) == HUB
        except ValueError:
            hub = False
        if not hub:  # not 'owner/name': the operator meant a directory here
            raise ValueError(f"adapter directory {source!r} does not exist in "
                             f"{os.getcwd()}: give an existing PEFT directory (relative to "
                             "where you run this, or absolute) or a Hub repo id 'owner/name'")
        owner = source.split("/", 1)[0]
        if os.path.isdir(owner):  # 'adapters/sqll', a typo under a directory here: no Hub id
            raise ValueError(f"adapter directory {source!r} does not exist in {os.getcwd()} "
                             f"(./{owner} does, so this names a path, not the Hub repo "
                             f"{source!r}): give an existing PEFT directory; to register "
                             f"that Hub repo, run this where no ./{owner} is")
    return source


def register_shared(queue, settings, name: str, source: str, revision: str | None = None,
                    tenant_id: str | None = None):
    """Check a source with the engine's rules and register it (shared unless ``tenant_id``).

    A local PEFT directory must lie inside ``settings.adapter_roots`` (the plain roots, also
    when roots are per tenant) and is validated against the base model; Hub ids are
    registered as given and validated by the worker when it loads them.
    Raises ``engine.errors.LoRAError`` (or ValueError) naming the problem.
    """
    from lorry.api.batch_input import names_the_base
    from lorry.api.schemas import NAME_PATTERN
    from lorry.engine.lora.sources import LOCAL, check_source
    from lorry.engine.lora.spec import parse_adapter, read_base_config

    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"adapter name {name!r} is invalid: tenants name adapters with 1 to "
                         "64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if names_the_base(name, settings):
        raise ValueError(f"{name!r} names the base model on the OpenAI routes and in batch "
                         "lines (model=...); choose another adapter name")
    src = check_source(operator_source(source), revision=revision,
                       roots=settings.adapter_roots, allow_hub=settings.allow_hub_adapters)
    rank, source = None, src.location
    if src.kind == LOCAL:
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
