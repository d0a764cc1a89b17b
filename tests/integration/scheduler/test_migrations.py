"""Migrations upgrade and downgrade on SQLite and PostgreSQL; the schema equals the models."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from lorry.scheduler.migrate import check, downgrade, upgrade

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
