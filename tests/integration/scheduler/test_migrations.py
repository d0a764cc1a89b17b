"""Migrations upgrade and downgrade on SQLite and PostgreSQL; the schema equals the models."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from lorry.scheduler import JobQueue, errors
from lorry.scheduler.migrate import check, downgrade, head_revision, upgrade

ROOT = Path(__file__).resolve().parents[3]
TABLES = {"tenants", "adapters", "batches", "jobs", "queue_groups", "workers", "files",
          "file_chunks", "batch_rejects", "maintenance_runs"}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return request.getfixturevalue("fresh_pg_url")


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_check_downgrade_upgrade(empty_url):
    upgrade(empty_url)
    assert tables(empty_url) == TABLES
    check(empty_url)  # raises when the migrated schema differs from the models
    downgrade(empty_url, "base")
    assert tables(empty_url) == set()
    upgrade(empty_url)
    assert tables(empty_url) == TABLES


def test_alembic_cli_check_passes(empty_url):
    upgrade(empty_url)
    run = subprocess.run([sys.executable, "-m", "alembic", "-x", f"url={empty_url}", "check"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "No new upgrade operations detected" in run.stdout + run.stderr


def test_a_database_behind_the_migrations_is_refused_saying_what_to_do(empty_url):
    queue = JobQueue(empty_url, create=False)
    try:
        with pytest.raises(errors.NotMigrated) as none:
            queue.require_migrated()
        assert str(none.value) == (f"the job database has no Lorry migration applied, this "
                                   f"Lorry needs {head_revision()}: run `lorry db upgrade` first")
        upgrade(empty_url, "0008")
        with pytest.raises(errors.NotMigrated) as behind:
            queue.require_migrated()
        assert (behind.value.current, behind.value.head) == ("0008", head_revision())
        assert "is at migration 0008" in str(behind.value)
        upgrade(empty_url)
        queue.require_migrated()
    finally:
        queue.close()


def test_a_database_a_newer_lorry_migrated_is_used_with_a_warning(empty_url, caplog):
    """Old code on a newer schema runs (migrations only add) during a rolling upgrade; on
    SQLite, which JobQueue migrates when opened, the unknown revision failed alembic's
    upgrade ("Can't locate revision identified by '0999'")."""
    upgrade(empty_url)
    engine = create_engine(empty_url)
    with engine.begin() as conn:  # what a later version's migration leaves
        conn.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    engine.dispose()
    with caplog.at_level("WARNING", logger="lorry.scheduler.migrate"):
        queue = JobQueue(empty_url)
        try:
            queue.require_migrated()
            tenant, key = queue.create_tenant("old-code")
            assert queue.authenticate(key) == tenant
        finally:
            queue.close()
    assert (f"the job database is at migration 0999, which this Lorry (newest: "
            f"{head_revision()}) does not know") in caplog.text
