"""An operator's mistakes starting the service processes (`lorry api`, `worker`, `beat`,
`flower`, `model prepare`) each end with one line naming the setting or option and a non-zero
exit status, not a traceback, and start nothing."""
from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

import lorry.cli as cli
from lorry.cli import app


@pytest.fixture
def nothing_starts(env, monkeypatch):
    """No Celery program nor uvicorn server starts in these tests."""
    import uvicorn

    monkeypatch.setattr(cli, "_celery", lambda argv: pytest.fail(f"started Celery {argv}"))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: pytest.fail("started uvicorn"))
    return env


def _refused(args: list[str], *says: str) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    for words in says:
        assert words in result.output, result.output
    return result.output


def test_beat_refuses_a_bad_setting_in_one_line(nothing_starts):
    nothing_starts.setenv("LORRY_MAINTAIN_INTERVAL", "0")
    out = _refused(["beat"], "LORRY_MAINTAIN_INTERVAL")
    assert len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize("url, says", [
    ("redis://:s3cret@127.0.0.1:6379/abc", "database index"),
    ("redis://:s3cret@127.0.0.1:port/0", "port"),
    ("http://:s3cret@127.0.0.1:6379/0", "redis://"),
])
def test_a_broker_url_redis_cannot_use_is_refused_without_its_password(nothing_starts, url,
                                                                        says):
    nothing_starts.setenv("LORRY_BROKER_URL", url)
    for args in (["worker"], ["beat"], ["api"]):
        out = _refused(args, "LORRY_BROKER_URL", says)
        assert "s3cret" not in out


def test_a_data_dir_that_cannot_be_created_is_named(nothing_starts, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    nothing_starts.setenv("LORRY_DATA_DIR", str(a_file / "data"))
    _refused(["api"], "LORRY_DATA_DIR")
    nothing_starts.setenv("LORRY_DATABASE_URL", f"sqlite:///{a_file}/sub/lorry.db")
    _refused(["db", "upgrade"], "LORRY_DATABASE_URL")


def test_the_api_refuses_a_sqlite_database_it_cannot_open(nothing_starts, tmp_path):
    (tmp_path / "lorry.db").mkdir()  # a directory where the database file should be
    nothing_starts.setenv("LORRY_DATABASE_URL", f"sqlite:///{tmp_path / 'lorry.db'}")
    _refused(["api"], "cannot use the job database", "LORRY_DATABASE_URL")


@pytest.mark.parametrize("args, option", [
    (["api", "--port", "0"], "--port"), (["api", "--port", "70000"], "--port"),
    (["api", "--port", "-1"], "--port"), (["api", "--workers", "0"], "--workers"),
    (["flower", "--insecure", "--port", "-5"], "--port"),
    (["worker", "--loglevel", "bogus"], "--loglevel"),
    (["beat", "--loglevel", "bogus"], "--loglevel"),
])
def test_service_options_out_of_range_are_usage_errors(nothing_starts, args, option):
    _refused(args, option)


def test_beat_refuses_a_schedule_file_in_a_missing_folder(nothing_starts, tmp_path):
    _refused(["beat", "--schedule", str(tmp_path / "nodir" / "schedule")], "--schedule",
             str(tmp_path / "nodir"))


def test_flower_on_a_port_in_use_says_so(env, monkeypatch):
    def bind_fails(argv):
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(cli, "_celery", bind_fails)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = str(taken.getsockname()[1])
        out = _refused(["flower", "--insecure", "--port", port], f"127.0.0.1:{port}",
                       "Address already in use", "--port")
    assert "Traceback" not in out


def test_a_worker_whose_model_cannot_be_loaded_stops_before_celery(nothing_starts, tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    nothing_starts.setenv("LORRY_MODEL", str(not_a_model))
    nothing_starts.setenv("LORRY_DEVICE", "cpu")
    out = _refused(["worker"], "cannot load", f"LORRY_MODEL={str(not_a_model)!r}")
    assert len(out.strip().splitlines()) == 1, out


def test_model_prepare_into_a_folder_it_cannot_write_is_one_line(env, tmp_path, monkeypatch):
    import lorry.engine.demo_model as demo_model

    monkeypatch.setattr(demo_model, "prepare_demo_model",
                        lambda out: pytest.fail("converted into a path it cannot write"))
    a_file = tmp_path / "file"
    a_file.write_text("")
    _refused(["model", "prepare", "--out", str(a_file)], str(a_file), "--out")
    env.setenv("LORRY_MODELS_DIR", str(a_file))
    _refused(["model", "prepare"], "LORRY_MODELS_DIR")
