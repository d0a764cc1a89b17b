"""``lorry submit``, ``lorry status`` and ``lorry batch ...``: the Python client from the shell."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from lorry.cli import app
from lorry.paths import check_writable

URL = typer.Option("http://127.0.0.1:8000", "--url", envvar="LORRY_URL", help="API base URL")
KEY = typer.Option(..., "--key", envvar="LORRY_API_KEY", help="tenant API key")


def _client(url: str, key: str):
    from lorry.client import Client

    try:
        return Client(url, key)
    except ValueError as e:   # an empty key, or a URL without http:// (--url)
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _fail(e) -> None:
    """Print the server's error (``error.message``, with its ``param`` and ``code``); exit 2."""
    about = ", ".join(f"{k} {v}" for k, v in (("param", e.param), ("code", e.code)) if v)
    line = f"error: {e}" + (f" [{about}]" if about else "")
    if e.retry_after is not None:
        line += f" (retry in {e.retry_after:g} s)"
    if e.status == 0 and str(e).startswith("cannot reach"):
        line += "; is `lorry api` running there? (--url or LORRY_URL)"
    typer.echo(line, err=True)
    raise typer.Exit(2)


# A wait that has seen nothing run for this long says once that it needs a worker.
IDLE_HINT_SECONDS = 20.0


def _idle_hint(what: str, moved):
    """A ``progress`` callback for waits: when ``moved(obj)`` (what the object shows of work
    done; None: work is under way) stays the same for IDLE_HINT_SECONDS, say once on stderr
    that workers run jobs (the usual cause of a wait that never ends: none is started)."""
    state = {"seen": None, "since": time.monotonic(), "said": False}

    def check(obj) -> None:
        now, seen = time.monotonic(), moved(obj)
        if seen is None or seen != state["seen"]:
            state.update(seen=seen, since=now)
        elif not state["said"] and now - state["since"] >= IDLE_HINT_SECONDS:
            state["said"] = True
            typer.echo(f"{what.format(seconds=now - state['since'])}; if no worker runs, start "
                       "one: `lorry worker` (and `lorry beat`) with this API's "
                       "LORRY_DATABASE_URL and LORRY_BROKER_URL", err=True)
    return check


@app.command("submit")
def submit(prompt: str, adapter: Optional[str] = typer.Option(None, help="adapter name "
                                                                         "(default: base model)"),
           max_tokens: int = typer.Option(64, min=1), temperature: float = 0.0,
           chat: bool = typer.Option(True, help="send the prompt as a user chat message"),
           wait: bool = typer.Option(False, help="wait for the result and print it"),
           url: str = URL, key: str = KEY):
    """Submit one job over the API; print its id (or its result with --wait).

    With --wait the exit status is 1 when the job ended other than succeeded."""
    from lorry.errors import LorryError

    try:
        with _client(url, key) as c:
            kw = dict(adapter=adapter, max_tokens=max_tokens, temperature=temperature)
            job = c.submit(messages=[{"role": "user", "content": prompt}], **kw) if chat \
                else c.submit(prompt, **kw)
            if not wait:
                typer.echo(job.id)
                return
            job = c.wait(job.id, progress=_idle_hint(
                f"{job.id} is still queued after {{seconds:.0f}} s",
                lambda j: "queued" if j.status == "queued" else None))
    except LorryError as e:
        _fail(e)
    if job.status != "succeeded":
        typer.echo(f"{job.status}: {job.error or 'no result'}", err=True)
        raise typer.Exit(1)
    typer.echo(job.text)


@app.command("status")
def status(job_id: str, url: str = URL, key: str = KEY):
    """Print a job (or a batch, for ids starting with batch_) as JSON."""
    from lorry.errors import LorryError

    try:
        with _client(url, key) as c:
            obj = c.batch(job_id) if job_id.startswith("batch_") else c.get(job_id)
    except LorryError as e:
        _fail(e)
    typer.echo(json.dumps(obj.model_dump(exclude_none=True), indent=2))


batch_app = typer.Typer(help="OpenAI Batch files over the API: submit, status, download.",
                        no_args_is_help=True)
app.add_typer(batch_app, name="batch")


def _wait_with_bar(c, batch):
    """Poll until the batch is final, drawing a progress bar of its finished requests (and
    saying when nothing runs for a while)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), transient=False,
                  console=Console(stderr=True)) as bar:  # stdout: what scripts read
        task = bar.add_task(batch.id, total=batch.request_counts.total or None)

        idle = _idle_hint(f"{batch.id}: no request has finished for {{seconds:.0f}} s",
                          lambda b: None if b.done else (b.request_counts.completed,
                                                         b.request_counts.failed))

        def show(b):
            idle(b)
            counts = b.request_counts
            bar.update(task, total=counts.total or None,
                       completed=counts.completed + counts.failed,
                       description=f"{b.id} {b.status}")
        return c.wait_batch(batch.id, progress=show)


@batch_app.command("submit")
def batch_submit(file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                             help="an OpenAI Batch JSONL file"),
                 endpoint: str = typer.Option("/v1/chat/completions",
                                              help="the endpoint every line uses"),
                 completion_window: str = typer.Option("24h", help="OpenAI's window "
                                                       "(24h); past it, what has not run "
                                                       "expires"),
                 idempotency_key: Optional[str] = typer.Option(
                     None, help="retrying with the same key creates nothing new"),
                 wait: bool = typer.Option(False, help="wait (progress bar) until it is final"),
                 url: str = URL, key: str = KEY):
    """Upload FILE (purpose "batch") and create its batch; print the batch id.

    Refused lines are printed with their custom_id. With --wait it prints the final state; the
    exit status is then 1 when the batch ended other than completed (e.g. failed because no
    line was valid)."""
    from lorry.errors import LorryError

    try:
        with _client(url, key) as c:
            up = c.upload_file(file, idempotency_key=idempotency_key and f"{idempotency_key}:file")
            try:
                batch = c.create_batch(up.id, endpoint=endpoint,
                                       completion_window=completion_window,
                                       idempotency_key=idempotency_key)
            except LorryError as e:
                # Refused: no batch holds the upload just made, so take it back; unless it
                # came by an idempotency key (it may be an earlier batch's input, or another
                # create's being read; a retry with the key reuses it).
                if 400 <= e.status < 500 and idempotency_key is None:
                    _forget_upload(c, up.id)
                raise
            for err in batch.line_errors:
                who = f" (custom_id {err['custom_id']!r})" if err.get("custom_id") else ""
                typer.echo(f"{file}: refused{who}: {err['message']}", err=True)
            more = batch.request_counts.failed - len(batch.line_errors)
            if more > 0 and batch.line_errors:  # the server lists the first 1,000
                typer.echo(f"{file}: and {more} more refused lines: all are in the batch's "
                           f"error file (lorry batch download {batch.id} -o FILE)", err=True)
            if wait:
                batch = _wait_with_bar(c, batch)
    except LorryError as e:
        _fail(e)
    if not wait:
        typer.echo(batch.id)
        return
    counts = batch.request_counts
    typer.echo(f"{batch.id} {batch.status}: {counts.completed} completed, {counts.failed} "
               f"failed of {counts.total}")
    if batch.status != "completed":
        raise typer.Exit(1)


def _forget_upload(c, file_id: str) -> None:
    """Delete the file that a refused ``batch submit`` uploaded (kept if that fails too: the
    refusal is what the user needs to read)."""
    from lorry.errors import LorryError

    try:
        c.delete_file(file_id)
    except LorryError:
        pass


@batch_app.command("status")
def batch_status(batch_id: str, url: str = URL, key: str = KEY):
    """Print the batch (OpenAI's Batch object) as JSON."""
    from lorry.errors import LorryError

    try:
        with _client(url, key) as c:
            batch = c.batch(batch_id)
    except LorryError as e:
        _fail(e)
    typer.echo(json.dumps(batch.model_dump(exclude_none=True), indent=2))


@batch_app.command("download")
def batch_download(batch_id: str,
                   output: Path = typer.Option(..., "-o", "--output",
                                               help="where the output file goes; the error "
                                                    "file goes beside it as <stem>.errors.jsonl"),
                   wait: bool = typer.Option(False, help="wait until the batch is final"),
                   url: str = URL, key: str = KEY):
    """Download a finished batch's output file (and its error file, if any)."""
    from lorry.errors import LorryError

    try:
        with _client(url, key) as c:
            batch = _wait_with_bar(c, c.batch(batch_id)) if wait else c.batch(batch_id)
            if not batch.done:
                typer.echo(f"error: batch {batch_id} is {batch.status!r}; its files exist once "
                           "it is final (use --wait)", err=True)
                raise typer.Exit(2)
            written = []
            files = ((batch.output_file_id, output),
                     (batch.error_file_id, output.with_name(output.stem + ".errors.jsonl")))
            for _, path in files:
                check_writable(path)
            for file_id, path in files:
                if file_id is None:
                    path.unlink(missing_ok=True)  # not another batch's file left beside
                    continue
                with open(path, "wb") as f:
                    for chunk in c.file_content(file_id):
                        f.write(chunk)
                written.append(str(path))
    except LorryError as e:
        _fail(e)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo("\n".join(written) or f"batch {batch_id} has no output or error file")
