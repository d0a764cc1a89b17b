"""A newcomer's usual mistakes with the `lorry` CLI each get one line saying what to do (exit
2), not a traceback: a database that is down, misnamed or not migrated, a base model not
prepared, an API URL without http://, an API that is not running, a job no worker runs."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lorry.cli import app

DOWN = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # nothing listens on port 1


def _refused(args: list[str], *says: str) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert len(result.output.strip().splitlines()) == 1, result.output
    for words in says:
        assert words in result.output, result.output
    return result.output


@pytest.mark.parametrize("args", [["db", "upgrade"], ["tenant", "list"],
                                  ["tenant", "create", "acme"], ["adapter", "list"]])
def test_a_database_that_cannot_be_reached_is_one_line_naming_the_url(env, args):
    env.setenv("LORRY_DATABASE_URL", DOWN)
    _refused(args, "cannot use the job database postgresql+psycopg://nobody@127.0.0.1:1/none",
             "check LORRY_DATABASE_URL")


@pytest.mark.parametrize("url, says", [("localhost/lorry", "is not a database URL"),
                                       ("mysql://u@host/lorry", "names a mysql database")])
def test_a_database_url_lorry_cannot_use_says_what_to_give(env, url, says):
    env.setenv("LORRY_DATABASE_URL", url)
    _refused(["tenant", "list"], f"LORRY_DATABASE_URL {says}", "postgresql+psycopg://")


def test_a_url_whose_port_is_no_number_is_one_line_without_its_password(env):
    # (a traceback before; the parser's message quotes what it read as the port)
    env.setenv("LORRY_DATABASE_URL", "postgresql+psycopg://u:s3cret@db:notaport/lorry")
    out = _refused(["tenant", "list"], "LORRY_DATABASE_URL is not a database URL")
    assert "s3cret" not in out and "notaport" not in out


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://nobody@127.0.0.1:1/none?password=s3cret",
    "postgresql+psycopg:///none?host=127.0.0.1&port=1&user=nobody&password=s3cret",
    "postgresql+psycopg://nobody:s3cret@127.0.0.1:1/none?sslpassword=s3cret"])
def test_a_password_in_the_urls_query_is_not_printed(env, url):
    """SQLAlchemy hides only the user part's password: ?password= was printed as given (a
    hostile-tenant audit)."""
    env.setenv("LORRY_DATABASE_URL", url)
    out = _refused(["tenant", "list"], "cannot use the job database", "check LORRY_DATABASE_URL")
    assert "s3cret" not in out and "password=redacted" in out


def test_an_argument_error_of_a_good_url_is_the_commands_own_and_propagates():
    from sqlalchemy import exc as sa_exc

    from lorry.cli import _database_problem

    assert _database_problem(sa_exc.ArgumentError("Column expression expected"),
                             "sqlite:///x.db") is None
    assert _database_problem(ValueError("weight must be > 0"), "sqlite:///x.db") is None


def test_a_database_without_the_tables_says_to_run_db_upgrade():
    from psycopg import errors as pg_errors
    from sqlalchemy import exc as sa_exc

    from lorry.cli import _database_problem

    missing = sa_exc.ProgrammingError("SELECT 1 FROM tenants", {},
                                      pg_errors.UndefinedTable('relation "tenants" does not '
                                                               "exist"))
    problem = _database_problem(missing, "postgresql+psycopg://u:secret@db/lorry")
    assert "run `lorry db upgrade` first" in problem and "secret" not in problem
    assert _database_problem(KeyError("x"), "sqlite:///x.db") is None  # not the database's


def test_a_worker_without_a_prepared_model_says_to_prepare_it(env, monkeypatch):
    import lorry.cli as cli

    monkeypatch.setattr(cli, "_celery", lambda argv: pytest.fail("started Celery"))
    _refused(["worker"], "the demo base model is not prepared", "lorry model prepare")
    env.setenv("LORRY_MODEL", "/no/such/model")
    _refused(["worker"], "LORRY_MODEL='/no/such/model' is not a directory")
    _refused(["adapter", "add", "sql", "/no/such/adapter"], "LORRY_MODEL")


def test_a_relative_adapter_directory_that_does_not_exist_is_named(env, tmp_path, monkeypatch):
    from lorry.adapters import operator_source

    monkeypatch.chdir(tmp_path)
    for missing in ("adapters/demo/nosuch", "nosuch"):
        with pytest.raises(ValueError, match=f"adapter directory '{missing}' does not exist"):
            operator_source(missing)
    assert operator_source("owner/name") == "owner/name"  # a Hub id stays one


def test_a_typo_under_a_directory_here_is_not_taken_for_a_hub_id(env, tmp_path, monkeypatch):
    """`cd adapters && lorry adapter add x demo/nothere` registered the Hub repo
    'demo/nothere' (exit 0), to fail only when jobs ran on it: ./demo is a directory here."""
    from lorry.adapters import operator_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    with pytest.raises(ValueError, match=r"'demo/nothere' does not exist .*\./demo does"):
        operator_source("demo/nothere")
    assert operator_source("owner/name") == "owner/name"  # no ./owner: the Hub id it was


def test_an_api_url_without_http_or_an_api_that_is_down(env):
    from lorry.client import Client

    with pytest.raises(ValueError, match="must start with http://") as e:
        Client("user:pw@127.0.0.1:8000", "lorry_k")
    assert "pw" not in str(e.value)
    _refused(["status", "job_x", "--url", "127.0.0.1:8000", "--key", "k"],
             "base_url must start with http://")
    _refused(["status", "job_x", "--url", "http://127.0.0.1:1", "--key", "k"],
             "cannot reach http://127.0.0.1:1", "is `lorry api` running there?")


def test_a_wait_on_a_job_nobody_runs_says_once_to_start_a_worker(make_client, monkeypatch):
    import lorry.cli_client as cli_client

    c, _ = make_client("acme")
    monkeypatch.setattr(cli_client, "_client", lambda url, key: c)
    monkeypatch.setattr(cli_client, "IDLE_HINT_SECONDS", 0.0)

    def no_worker_then_cancel(job_id, progress=None, **kw):
        for _ in range(3):
            progress(c.get(job_id))  # still queued: no worker took it
        c.cancel(job_id)
        return c.get(job_id)

    monkeypatch.setattr(c, "wait", no_worker_then_cancel)
    result = CliRunner().invoke(app, ["submit", "hi", "--wait", "--key", "k"])
    assert result.exit_code == 1, result.output
    assert result.output.count("is still queued after") == 1, result.output
    assert "`lorry worker`" in result.output


def test_a_refusal_inside_a_database_command_is_printed_once(env):
    env.setenv("LORRY_MAX_LORA_RANK", "12")
    _refused(["tenant", "list"], "LORRY_MAX_LORA_RANK=12 is invalid")
