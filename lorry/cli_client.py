"""``lorry submit`` and ``lorry status``: the Python client from the shell."""
from __future__ import annotations

import json
from typing import Optional

import typer

from lorry.cli import app

URL = typer.Option("http://127.0.0.1:8000", "--url", envvar="LORRY_URL", help="API base URL")
KEY = typer.Option(..., "--key", envvar="LORRY_API_KEY", help="tenant API key")


def _client(url: str, key: str):
    from lorry.client import Client

    return Client(url, key)


def _fail(e) -> None:
    """Print the server's error (``error.message``, with its ``param`` and ``code``); exit 2."""
    about = ", ".join(f"{k} {v}" for k, v in (("param", e.param), ("code", e.code)) if v)
    line = f"error: {e}" + (f" [{about}]" if about else "")
    if e.retry_after is not None:
        line += f" (retry in {e.retry_after:g} s)"
    typer.echo(line, err=True)
    raise typer.Exit(2)


@app.command("submit")
def submit(prompt: str, adapter: Optional[str] = typer.Option(None, help="adapter name "
                                                                         "(default: base model)"),
           max_tokens: int = typer.Option(64, min=1), temperature: float = 0.0,
           chat: bool = typer.Option(True, help="send the prompt as a user chat message"),
           wait: bool = typer.Option(False, help="wait for the result and print it"),
           url: str = URL, key: str = KEY):
    """Submit one job; print its id (or its result with --wait)."""
    from lorry.errors import LorryError

    try:
        with _client(url, key) as c:
            kw = dict(adapter=adapter, max_tokens=max_tokens, temperature=temperature)
            job = c.submit(messages=[{"role": "user", "content": prompt}], **kw) if chat \
                else c.submit(prompt, **kw)
            if not wait:
                typer.echo(job.id)
                return
            job = c.wait(job.id)
    except LorryError as e:
        _fail(e)
    typer.echo(job.text if job.status == "succeeded" else f"{job.status}: {job.error}")


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
