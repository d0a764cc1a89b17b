"""Alembic environment: migrates the queue database named by the caller (see scheduler.migrate)."""
from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from lorry.scheduler.models import Base

config = context.config
DEFAULT_URL = "sqlite:///lorry.db"


def database_url() -> str:
    return (config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
            or os.environ.get("LORRY_DATABASE_URL") or DEFAULT_URL)


def run_offline() -> None:
    url = database_url()
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(conn) -> None:
    # SQLite cannot ALTER most things: batch mode rebuilds tables for later migrations.
    context.configure(connection=conn, target_metadata=Base.metadata, compare_type=True,
                      render_as_batch=conn.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
    conn.commit()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
