"""``lorry demo``: the demo adapters and the base model answer the same prompts in one batch."""
from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from lorry.embedded import (
    drain_with_progress,
    embedded_queue,
    named_adapters,
    register_adapters,
    run_roots,
)

BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Why is the sky blue? Answer in one sentence.",
    "Give me a tip for staying focused.",
]


def demo_adapters_dir() -> Path:
    """The demo adapters' folder: ``adapters/demo`` of the checkout, package data in a wheel."""
    import lorry.demo_adapters

    return Path(next(iter(lorry.demo_adapters.__path__))).resolve()


def demo_prompts() -> list[str]:
    """The packaged demo prompts (lorry/demo_prompts.json: {"prompts": [...]}), else built-ins."""
    path = resources.files("lorry").joinpath("demo_prompts.json")
    if path.is_file():
        data = json.loads(path.read_text())
        items = data.get("prompts", []) if isinstance(data, dict) else data
        prompts = [p if isinstance(p, str) else p.get("prompt") for p in items]
        prompts = [p for p in prompts if p]
        if prompts:
            return prompts
    return BUILTIN_PROMPTS


def demo_engine_settings(settings, queue, n_jobs: int, max_tokens: int):
    """An engine sized for this one batch (a 2-core CPU loads and steps it quickly)."""
    from lorry.engine.config import LORA_RANKS

    ranks = [a.rank or 8 for a in queue.list_adapters(None)]
    rank = next(r for r in LORA_RANKS if r >= max(ranks, default=8))
    loras = max(1, len(ranks))
    return settings.model_copy(update={
        "max_num_seqs": n_jobs, "max_model_len": 256 + max_tokens, "max_loras": loras,
        "max_cpu_loras": loras, "max_lora_rank": rank})


def run_demo(settings, max_tokens: int = 32, adapters_dir=None) -> None:
    """Run the demo prompts through the base model and every demo adapter; print a table."""
    from rich.console import Console
    from rich.table import Table

    from lorry.engine.demo_model import DEMO_MODEL_NAME, prepare_demo_model
    from lorry.scheduler import JobSpec

    console = Console()
    start = time.monotonic()
    model_dir = prepare_demo_model(settings.models_dir / DEMO_MODEL_NAME)
    wanted = named_adapters([], adapters_dir or demo_adapters_dir())
    with embedded_queue(settings, model=str(model_dir),
                        adapter_roots=run_roots(settings, wanted)) as (settings, queue, tenant):
        adapters = register_adapters(queue, settings, wanted)
        if not adapters:
            console.print(f"[yellow]no demo adapters in {adapters_dir or demo_adapters_dir()}: "
                          "the base model only")
        prompts = demo_prompts()
        names = [None, *adapters]
        settings = demo_engine_settings(settings, queue, len(prompts) * len(names), max_tokens)
        specs = [JobSpec(adapter=a, messages=[{"role": "user", "content": p}],
                         sampling={"max_tokens": max_tokens, "temperature": 0.0})
                 for p in prompts for a in names]
        jobs = queue.submit(tenant.id, specs)
        summary = drain_with_progress(settings, queue, len(specs),
                                      f"{len(prompts)} prompts x {len(names)} adapters")
        table = Table(title=f"one mixed batch on {model_dir.name}", show_lines=True)
        for col in ("prompt", "adapter", "answer"):
            table.add_column(col, overflow="fold")
        for job in jobs:
            info = queue.get_job(job.id)
            text = info.result.text.strip() if info.result else f"[red]{info.status}: {info.error}"
            table.add_row(info.messages[0]["content"], info.adapter or "(base)", text)
        console.print(table)
        console.print(f"{len(specs)} jobs, {summary['tokens']} tokens generated; "
                      f"total {time.monotonic() - start:.1f} s")
