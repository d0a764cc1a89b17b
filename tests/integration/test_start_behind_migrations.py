"""A worker or API of this version on a job database at an older migration (0008: no
jobs.cached_tokens, so no result could be stored, and job reads answered 500) refuses to start
and says to run `lorry db upgrade`; once migrated, or on SQLite (which they migrate
themselves), they start. A database away at start is checked once it answers."""
from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import lorry.cli as cli
from lorry.scheduler import JobQueue, errors
from lorry.scheduler.migrate import head_revision, upgrade
from tests.integration.scheduler.conftest import create_pg_database, drop_pg_database
from tests.unit.api.conftest import tiny_model  # noqa: F401  (fixture)

DOWN = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # nothing listens on port 1


def behind(where: str = "") -> str:
    database = f"the job database {where}" if where else "the job database"
    return (f"{database} is at migration 0008, this Lorry needs {head_revision()}: run "
            "`lorry db upgrade` first")


@pytest.fixture(params=["sqlite", "postgresql"])
def old_url(request, tmp_path):
    """A job database migrated only to 0008, the migration before jobs.cached_tokens."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
        upgrade(url, "0008")
        yield url
        return
    name, url = create_pg_database()
    try:
        upgrade(url, "0008")
        yield url
    finally:
        drop_pg_database(name)


def revision(url: str) -> str:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


# ---- the API -----------------------------------------------------------------------------
def make_app(url: str, queue, tiny_model):  # noqa: F811
    from lorry.api.app import create_app
    from lorry.settings import Settings

    settings = Settings(database_url=url, model=str(tiny_model), max_model_len=128)
    return create_app(settings, queue=queue, nudger=None, redis_client=None)


def test_the_api_does_not_start_on_a_database_behind_its_migrations(old_url, tiny_model,  # noqa: F811
                                                                      caplog):
    queue = JobQueue(old_url, create=False)  # (SQLite opened by `lorry api` is migrated)
    try:
        with caplog.at_level("ERROR", logger="lorry.api.app"):
            with pytest.raises(errors.NotMigrated) as refused:
                with TestClient(make_app(old_url, queue, tiny_model)):
                    pytest.fail("the API started")
        assert str(refused.value) == behind()
        assert f"the API does not start: {behind()}" in caplog.text

        upgrade(old_url)
        tenant, key = queue.create_tenant("after-upgrade")
        with TestClient(make_app(old_url, queue, tiny_model)) as c:
            c.headers["Authorization"] = f"Bearer {key}"
            job = c.post("/v1/jobs", json={"prompt": "hi"})
            assert job.status_code == 201, job.text
            assert c.get(f"/v1/jobs/{job.json()['id']}").status_code == 200
            assert c.get("/readyz").json() == {"status": "ok"}
    finally:
        queue.close()


def test_readyz_of_an_api_that_could_not_check_at_start_names_the_migration(old_url,
                                                                           tiny_model):  # noqa: F811
    """Started while the database was away (no check at start): /readyz checks it, 503 with
    what to do while it is behind, 200 once migrated."""
    queue = JobQueue(old_url, create=False)
    try:
        c = TestClient(make_app(old_url, queue, tiny_model))  # no `with`: no startup check
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert r.json() == {"status": "unavailable", "database": behind()}
        upgrade(old_url)
        assert c.get("/readyz").json() == {"status": "ok"}
    finally:
        queue.close()


# ---- `lorry api` and `lorry worker` -------------------------------------------------------
@pytest.fixture
def started() -> list[str]:
    """What `lorry worker` and `lorry api` started ("worker", "api"): nothing really starts."""
    return []


@pytest.fixture
def env(monkeypatch, tmp_path, tiny_model, started):  # noqa: F811
    """The LORRY_* environment of a CPU worker of the tiny model; no Celery nor uvicorn
    starts (``started`` records them), no engine is kept."""
    import os

    import uvicorn

    from lorry.workers import runtime

    for name in [n for n in os.environ if n.startswith("LORRY_")]:
        monkeypatch.delenv(name)
    for name, value in {"LORRY_DATA_DIR": str(tmp_path / "data"), "LORRY_DEVICE": "cpu",
                        "LORRY_MODEL": str(tiny_model), "LORRY_MAX_MODEL_LEN": "128",
                        "LORRY_BROKER_URL": "redis://127.0.0.1:6379/7"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(runtime, "_runtime", None)
    monkeypatch.setattr(runtime, "_migrated", False)
    monkeypatch.setattr(cli, "_celery", lambda argv: started.append(argv[0]))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: started.append("api"))
    return monkeypatch


@pytest.mark.parametrize("old_url", ["postgresql"], indirect=True)
def test_lorry_worker_and_api_refuse_a_database_behind_their_migrations(env, started,
                                                                        old_url):
    from lorry.workers import runtime

    env.setenv("LORRY_DATABASE_URL", old_url)
    for args in (["worker"], ["api"]):
        result = CliRunner().invoke(cli.app, args)
        assert result.exit_code == 2, result.output
        assert isinstance(result.exception, SystemExit), result.exception  # no traceback
        assert result.output == f"error: {behind(cli._redact(old_url))}\n"
    assert runtime._runtime is None and started == []  # no engine loaded, nothing served

    upgrade(old_url)
    for args in (["worker"], ["api"]):
        result = CliRunner().invoke(cli.app, args)
        assert result.exit_code == 0, result.output
    assert started == ["worker", "api"]
    assert runtime._runtime.engine is not None and runtime._migrated


@pytest.mark.parametrize("old_url", ["sqlite"], indirect=True)
def test_lorry_worker_and_api_migrate_a_sqlite_database_and_start(env, started, old_url):
    """The embedded default: the first run's database is migrated when opened."""
    from lorry.workers import runtime

    env.setenv("LORRY_DATABASE_URL", old_url)
    for args in (["worker"], ["api"]):
        result = CliRunner().invoke(cli.app, args)
        assert result.exit_code == 0, result.output
    assert started == ["worker", "api"] and runtime._migrated
    assert revision(old_url) == head_revision()


def test_a_worker_started_while_the_database_was_away_checks_it_before_its_first_drain(
        env, old_url, caplog):
    """The worker could not check at start (the database was down, a warning); when it comes
    back behind its migrations, the first drain refuses before claiming anything and the
    worker stops with exit status 2 (unchecked, it failed every job it finished: "the result
    could not be stored")."""
    from celery.worker import state

    from lorry.workers import runtime, tasks

    env.setenv("LORRY_DATABASE_URL", DOWN)
    with caplog.at_level("WARNING", logger="lorry.workers.runtime"):
        result = CliRunner().invoke(cli.app, ["worker"])
    assert result.exit_code == 0, result.output
    assert "cannot check the job database's migration now" in caplog.text
    assert not runtime._migrated

    # the database is back, at 0008 (the drainer's queue now reaches it)
    queue = JobQueue(old_url, create=False)
    runtime._runtime.queue = queue
    env.setattr(runtime._runtime, "run", lambda **kw: pytest.fail("drained"))
    env.setattr(tasks, "_nudge_taken", lambda settings: None)
    env.setattr(tasks, "_shutting_down", threading.Event())
    env.setattr(tasks, "_not_migrated", threading.Event())
    env.setattr(state, "should_stop", None)
    try:
        with caplog.at_level("CRITICAL", logger="lorry.workers.tasks"):
            with pytest.raises(errors.NotMigrated):
                tasks.drain.run()
        assert f"{behind()}; this worker stops and takes no jobs (exit status 2)" in caplog.text
        assert state.should_stop == tasks.exit_status() == 2
        assert tasks._shutting_down.is_set()
    finally:
        queue.close()
