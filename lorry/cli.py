"""The ``lorry`` command line: set up, run the services, submit work, run a batch embedded.

Heavy modules (torch, the engine, SQLAlchemy, Celery) are imported inside the commands, so
``lorry --help`` is fast and ``lorry api`` never imports torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Lorry: many LoRA adapters on one base model, as durable async jobs.",
                  no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="The base model.", no_args_is_help=True)
db_app = typer.Typer(help="The job database.", no_args_is_help=True)
tenant_app = typer.Typer(help="Tenants and their API keys.", no_args_is_help=True)
adapter_app = typer.Typer(help="Shared adapters (tenants register their own over the API).",
                          no_args_is_help=True)
for sub, name in ((model_app, "model"), (db_app, "db"), (tenant_app, "tenant"),
                  (adapter_app, "adapter")):
    app.add_typer(sub, name=name)


def _settings():
    """The LORRY_* settings, read once here; a refused value exits 2 naming it (and no other
    value: the message never shows the environment's secrets)."""
    from lorry.settings import SettingsError, get_settings

    try:
        return get_settings()
    except SettingsError as e:
        typer.echo(f"error: invalid LORRY_* setting: {e}", err=True)
        raise typer.Exit(2) from None


def _queue():
    from lorry.scheduler import JobQueue

    return JobQueue(_settings().database_url)


@model_app.command("prepare")
def model_prepare(out: Optional[Path] = typer.Option(None, help="output directory")):
    """Convert the packaged demo model (SmolLM2-135M-Instruct) to safetensors, once."""
    from lorry.engine.demo_model import prepare_demo_model
    from lorry.settings import DEMO_MODEL_NAME

    typer.echo(prepare_demo_model(out or _settings().models_dir / DEMO_MODEL_NAME))


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")):
    """Apply the migrations to LORRY_DATABASE_URL."""
    from lorry.scheduler.migrate import upgrade

    url = _settings().database_url
    upgrade(url, revision) if revision != "head" else upgrade(url)
    typer.echo(f"database at revision {revision}: {_redact(url)}")


@tenant_app.command("create")
def tenant_create(name: str, weight: float = typer.Option(1.0, min=0.001),
                  max_queued: Optional[int] = typer.Option(None, min=1)):
    """Create a tenant and print its API key (shown once; only its hash is stored). The name
    must be new: the other tenant commands find tenants by it."""
    if not name or name != name.strip() or len(name) > 128 or not name.isprintable():
        typer.echo(f"error: tenant name {name!r} is invalid: give 1-128 printable characters "
                   "without leading or trailing spaces", err=True)
        raise typer.Exit(2)
    queue = _queue()
    taken = [t.id for t, _ in queue.list_tenants() if t.name == name]
    if taken:
        typer.echo(f"error: a tenant named {name!r} exists ({', '.join(taken)}); choose "
                   "another name (`lorry tenant list`)", err=True)
        raise typer.Exit(2)
    tenant, key = queue.create_tenant(name, weight=weight, max_queued=max_queued)
    typer.echo(f"tenant {tenant.name} ({tenant.id})")
    typer.echo(f"api key: {key}")


def _one_tenant(queue, name_or_id: str):
    """The tenant named or id'd ``name_or_id``; exits 2 when there is none or the name is
    ambiguous (several tenants share it: use the id)."""
    found = [t for t, _ in queue.list_tenants() if name_or_id in (t.id, t.name)]
    if len(found) != 1:
        if not found:
            typer.echo(f"error: no tenant named {name_or_id!r} (see `lorry tenant list`)",
                       err=True)
        else:
            ids = "".join(f"\n  {t.id}" for t in found)
            typer.echo(f"error: {len(found)} tenants are named {name_or_id!r}; give one of "
                       f"their ids:{ids}", err=True)
        raise typer.Exit(2)
    return found[0]


@tenant_app.command("list")
def tenant_list():
    """Tenants with their id, weight, quota and whether their API key works."""
    for t, active in _queue().list_tenants():
        quota = "-" if t.max_queued is None else t.max_queued
        typer.echo(f"{t.id}  {t.name}  weight={t.weight:g}  max_queued={quota}  "
                   f"key={'active' if active else 'revoked'}")


@tenant_app.command("rotate-key")
def tenant_rotate_key(tenant: str = typer.Argument(..., help="tenant name or id")):
    """Give a tenant a new API key (printed once); the old key stops working at once."""
    queue = _queue()
    t = _one_tenant(queue, tenant)
    key = queue.rotate_key(t.id)
    typer.echo(f"tenant {t.name} ({t.id})")
    typer.echo(f"api key: {key}")


@tenant_app.command("revoke")
def tenant_revoke(tenant: str = typer.Argument(..., help="tenant name or id")):
    """Revoke a tenant's API key (its jobs and adapters stay; rotate-key gives a new one)."""
    queue = _queue()
    t = _one_tenant(queue, tenant)
    queue.revoke_key(t.id)
    typer.echo(f"tenant {t.name} ({t.id}): api key revoked")


@adapter_app.command("add")
def adapter_add(name: str, source: str, revision: Optional[str] = None):
    """Register a shared adapter: a local PEFT directory or a Hub repo id."""
    from lorry.adapters import register_shared

    try:
        info = register_shared(_queue(), _settings(), name, source, revision)
    except ValueError as e:  # refused by the engine's rules, or the name is taken
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"adapter {info.name} (id {info.id}, rank {info.rank}) -> {info.source}")


@adapter_app.command("list")
def adapter_list():
    """List the shared adapters."""
    for a in _queue().list_adapters(None):
        typer.echo(f"{a.id}\t{a.name}\trank={a.rank}\t{a.source}")


@app.command("api")
def api(host: Optional[str] = None, port: Optional[int] = None, workers: int = 1):
    """Serve the REST API (uvicorn)."""
    import uvicorn

    s = _settings()
    uvicorn.run("lorry.api.app:main_app", factory=True, host=host or s.api_host,
                port=port or s.api_port, workers=workers, log_level="info")


def _celery(argv: list[str]) -> None:
    from lorry.workers.celery_app import app as celery_app

    celery_app.start(argv)


@app.command("worker")
def worker(name: Optional[str] = typer.Option(None, help="Celery node name"),
           loglevel: str = "info"):
    """Run a GPU worker (Celery, solo pool: one engine per process, loaded once)."""
    argv = ["worker", "--pool", "solo", "--concurrency", "1", "-E", f"--loglevel={loglevel}"]
    _celery(argv + ([f"--hostname={name}"] if name else []))


@app.command("beat")
def beat(loglevel: str = "info",
         schedule: Path = typer.Option(Path("/tmp/lorry-beat-schedule"), help="state file")):
    """Run Celery beat: maintain (reaper, deadlines, batches, workers) and drain nudges."""
    _celery(["beat", f"--loglevel={loglevel}", f"--schedule={schedule}"])


@app.command("flower")
def flower(port: Optional[int] = None, address: str = "127.0.0.1",
           insecure: bool = typer.Option(False, "--insecure", help="serve Flower without "
                                         "credentials (it can stop workers and send tasks)")):
    """Run Flower behind basic auth (LORRY_FLOWER_BASIC_AUTH=user:password) on every page."""
    from lorry.flower_auth import protect_open_handlers

    s = _settings()
    argv = ["flower", f"--port={port or s.flower_port}", f"--address={address}"]
    user, _, password = (s.flower_basic_auth or "").partition(":")
    if s.flower_basic_auth and (not user or not password):
        typer.echo("error: LORRY_FLOWER_BASIC_AUTH must be 'user:password'", err=True)
        raise typer.Exit(2)
    if s.flower_basic_auth:
        argv.append(f"--basic-auth={s.flower_basic_auth}")
    elif insecure:
        typer.echo("warning: Flower runs WITHOUT authentication (--insecure): anyone who can "
                   f"reach {address} can see tasks, stop workers and send tasks", err=True)
    else:
        typer.echo("error: set LORRY_FLOWER_BASIC_AUTH=user:password (Flower can stop "
                   "workers and send tasks), or pass --insecure to run it open", err=True)
        raise typer.Exit(2)
    protect_open_handlers()
    _celery(argv)


@app.command("run")
def run(file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                    help="OpenAI Batch JSONL input"),
        output: Path = typer.Option(..., "-o", "--output", help="output JSONL"),
        adapter: list[str] = typer.Option([], "--adapter", help="NAME=PATH, repeatable"),
        adapters_dir: Optional[Path] = typer.Option(None, exists=True, file_okay=False,
                                                    help="register every PEFT adapter in this "
                                                         "directory (one per subdir)"),
        database: Optional[str] = typer.Option(None, help="SQLAlchemy URL (default: a "
                                                        "temporary SQLite file)")):
    """Run a batch file embedded (SQLite + in-process worker) and write OpenAI output lines."""
    from lorry.embedded import run_file

    try:
        counts = run_file(_settings(), file, output, adapters=adapter, adapters_dir=adapters_dir,
                          database_url=database)
    except ValueError as e:  # a refused adapter or a bad --adapter value
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{counts['succeeded']} succeeded, {counts['failed']} failed -> {output}")
    if counts["failed"]:
        raise typer.Exit(1)


@app.command("demo")
def demo(max_tokens: int = typer.Option(32, min=1, max=256),
         adapters_dir: Optional[Path] = typer.Option(
             None, exists=True, file_okay=False,
             help="PEFT adapters, one per subdirectory (default: the packaged demo adapters)")):
    """Prepare the model, register the demo adapters, run one mixed batch, print a table."""
    from lorry.demo import run_demo

    run_demo(_settings(), max_tokens=max_tokens, adapters_dir=adapters_dir)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


from lorry import cli_client  # noqa: E402,F401  (registers submit/status on `app`)
