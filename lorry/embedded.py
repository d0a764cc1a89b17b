"""The embedded default: a SQLite job table and an in-process worker, no servers needed."""
from __future__ import annotations

import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lorry.paths import check_writable


@contextmanager
def embedded_queue(settings, database_url: str | None = None, **overrides):
    """Yield (settings, queue, tenant) on a migrated database (a temporary SQLite by default);
    the settings yielded are ``settings`` with that database and ``overrides``."""
    from lorry.scheduler import JobQueue

    with tempfile.TemporaryDirectory(prefix="lorry-") as tmp:
        url = database_url or f"sqlite:///{tmp}/lorry.db"
        settings = settings.model_copy(update={"database_url": url, **overrides})
        queue = JobQueue.for_settings(settings, create=True)   # migrated unless newer
        tenant, _ = queue.create_tenant(f"local-{Path(tmp).name}")
        try:
            yield settings, queue, tenant
        finally:
            close = getattr(queue, "close", None)
            if close:
                close()


def named_adapters(pairs: list[str], adapters_dir=None, empty_ok: bool = True
                   ) -> dict[str, str]:
    """NAME -> source of NAME=PATH pairs and of every adapter in ``adapters_dir`` (which must
    hold one unless ``empty_ok``)."""
    from lorry.adapters import demo_adapter_dirs, operator_source

    wanted = {n: str(p) for n, p in demo_adapter_dirs(adapters_dir).items()} \
        if adapters_dir else {}
    if adapters_dir and not wanted and not empty_ok:
        raise ValueError(f"--adapters-dir {str(adapters_dir)!r} holds no PEFT adapter: give a "
                         "directory with one subdirectory (with adapter_config.json) per "
                         "adapter")
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {pair!r} is invalid: use NAME=PATH")
        wanted[name] = operator_source(path)
    return wanted


def run_roots(settings, wanted: dict[str, str]) -> list[str]:
    """The adapter roots of an embedded run: the configured ones plus every local directory
    the operator named for this run (its worker checks them again at load time)."""
    from lorry.engine.lora.sources import LOCAL, source_kind

    named = [p for p in wanted.values() if source_kind(p) == LOCAL]
    return [*settings.adapter_roots, *named]


def register_adapters(queue, settings, wanted: dict[str, str]) -> list[str]:
    """Register ``wanted`` (from ``named_adapters``) as shared adapters; return their names.
    ``settings.adapter_roots`` must hold the run's roots (``run_roots``)."""
    from lorry.adapters import operator_source, register_shared
    from lorry.engine.lora.sources import check_source
    from lorry.scheduler import errors

    for name, path in wanted.items():
        try:
            register_shared(queue, settings, name, path)
        except errors.AdapterExists:
            # a --database used before: the same adapter again is kept, another is refused
            known = queue.get_adapter(name, None)
            source = check_source(operator_source(path), roots=settings.adapter_roots).location
            if known is None or known.source != source:
                raise ValueError(f"adapter {name!r} is registered in this database with the "
                                 f"source {getattr(known, 'source', None)!r}, not {source!r}; "
                                 "pick another name or another --database") from None
    return list(wanted)


def drain_with_progress(settings, queue, total: int, description: str) -> dict:
    """Run the in-process drain loop until the queue is empty, with a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from lorry.workers.runtime import build_drainer

    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), transient=False,
                  console=Console(stderr=True)) as bar:  # stdout: what scripts read
        task = bar.add_task("loading model", total=total)
        drainer = build_drainer(settings, queue=queue, publish=False,
                                on_result=lambda job, status: bar.advance(task))
        bar.update(task, description=description)
        summary = drainer.run(stop_when_empty=True)
    return summary.to_dict()


def run_file(settings, file: Path, output: Path, adapters: list[str] = (), adapters_dir=None,
             database_url: str | None = None) -> dict:
    """Run an OpenAI Batch JSONL file embedded; write OpenAI output lines.

    Failed lines go to ``<output stem>.errors.jsonl`` beside it.
    """
    from lorry.api.batch_input import (
        DuplicateCustomId,
        IngestStats,
        base_model_name,
        ingest_chunks,
        line_error_dict,
    )
    from lorry.api.convert import output_line

    errors_path = output.with_name(output.stem + ".errors.jsonl")
    for path in (output, errors_path):  # before the run: a bad path would lose its results
        check_writable(path)
    wanted = named_adapters(list(adapters), adapters_dir, empty_ok=False)
    with embedded_queue(settings, database_url, adapter_roots=run_roots(settings, wanted)) \
            as (settings, queue, tenant):
        register_adapters(queue, settings, wanted)
        base = base_model_name(settings)
        stats = IngestStats()
        with open(file, "rb") as f:
            lines = enumerate((line.rstrip(b"\r\n") for line in f), start=1)
            try:
                batch, _ = queue.ingest_batch(
                    tenant.id, ingest_chunks(lines, queue, tenant, base, settings,
                                             stats=stats),
                    model=base, metadata={})
            except DuplicateCustomId as e:
                raise SystemExit("\n".join(d["message"] for d in e.errors)) from None
        rejects = queue.batch_errors(batch.id, tenant.id, limit=stats.rejected or 1)
        for err in rejects:
            print(f"{file}: {err.message}", file=sys.stderr)
        if not stats.accepted:
            raise SystemExit(f"{file}: no request could be queued")
        drain_with_progress(settings, queue, stats.accepted, f"{stats.accepted} requests")
        queue.finalize_batches()
        counts = {"succeeded": 0, "failed": len(rejects)}
        with open(output, "w") as out, open(errors_path, "w") as errs:
            for err in rejects:
                errs.write(json.dumps({"id": None, "custom_id": err.custom_id, "response": None,
                                       "error": line_error_dict(err)}) + "\n")
            for job in queue.batch_results(batch.id, tenant.id):
                line = output_line(job, base)
                ok = job.status == "succeeded"
                counts["succeeded" if ok else "failed"] += 1
                (out if ok else errs).write(json.dumps(line) + "\n")
        if not counts["failed"]:
            errors_path.unlink()
    return counts
