"""Engine set-up per dialect (SQLite serialized writers, PostgreSQL pool), upserts and time."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Engine, case, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite

from lorry.scheduler.claim_cache import bump_generation
from lorry.scheduler.models import QueueGroup


def make_engine(url: str, **kwargs) -> Engine:
    """An Engine for `sqlite:///path` or `postgresql+psycopg://...`."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            # Take over transaction control from the driver, so BEGIN IMMEDIATE below is ours.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            # One writer at a time: a claim is a serialized transaction on SQLite.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_size", 8)
    kwargs.setdefault("pool_pre_ping", True)
    engine = create_engine(url, **kwargs)
    event.listen(engine, "checkin", _bump_after_write)
    return engine


def _bump_after_write(_dbapi_conn, record) -> None:
    # A claim snapshot read while a queue write was still uncommitted took the generation the
    # write had already bumped, yet lacks its rows: bump again once the write's transaction is
    # over (its connection back in the pool), so such a snapshot is not reused.
    if record is not None and record.info.pop(_WROTE, False):
        bump_generation()


_WROTE = "lorry_wrote_queue_groups"


def utcnow() -> datetime:
    """Naive UTC (what every timestamp column stores)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


EPOCH = datetime(1970, 1, 1)


def epoch_seconds(value: datetime) -> float:
    """Seconds since the epoch of a naive UTC datetime (no local-time conversion)."""
    return (value - EPOCH).total_seconds()


def naive_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def insert_for(engine: Engine):
    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert


# The same upsert as below with arrays as parameters: compiling a multi-row VALUES of a
# thousand groups costs more client time than the whole statement takes in the server.
GROUPS_UPSERT_PG = text("""
INSERT INTO queue_groups AS g (tenant_id, adapter_id, priority, queued_count, oldest_enqueued_at)
SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:adapters AS bigint[]),
                     CAST(:priorities AS int[]), CAST(:counts AS int[]),
                     CAST(:oldest AS timestamp[]))
ON CONFLICT (tenant_id, adapter_id, priority) DO UPDATE SET
  queued_count = g.queued_count + excluded.queued_count,
  oldest_enqueued_at = CASE WHEN g.queued_count <= 0 OR g.oldest_enqueued_at IS NULL
                              OR excluded.oldest_enqueued_at < g.oldest_enqueued_at
                            THEN excluded.oldest_enqueued_at ELSE g.oldest_enqueued_at END
""")


def add_to_groups(conn, deltas: dict[tuple[str, int, int], tuple[int, datetime]]) -> None:
    """queue_groups += count per (tenant, adapter, priority); oldest becomes the earlier one.

    Keys are applied in sorted order, the lock order every writer of queue_groups follows.
    """
    if not deltas:
        return
    bump_generation()  # cached claim snapshots of this process are out of date
    conn.info[_WROTE] = True  # ... and once more when this transaction is over (make_engine)
    if conn.dialect.name == "postgresql":
        keys = sorted(deltas)
        conn.execute(GROUPS_UPSERT_PG, dict(
            tenants=[k[0] for k in keys], adapters=[k[1] for k in keys],
            priorities=[k[2] for k in keys], counts=[deltas[k][0] for k in keys],
            oldest=[deltas[k][1] for k in keys]))
        return
    ins = insert_for(conn.engine)
    table = QueueGroup.__table__
    rows = [dict(tenant_id=k[0], adapter_id=k[1], priority=k[2], queued_count=n,
                 oldest_enqueued_at=oldest) for k, (n, oldest) in sorted(deltas.items())]
    stmt = ins(table).values(rows)  # one multi-row upsert (keys are distinct)
    exc = stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=["tenant_id", "adapter_id", "priority"],
        set_=dict(
            queued_count=table.c.queued_count + exc.queued_count,
            oldest_enqueued_at=case(
                (table.c.queued_count <= 0, exc.oldest_enqueued_at),
                (table.c.oldest_enqueued_at.is_(None), exc.oldest_enqueued_at),
                (exc.oldest_enqueued_at < table.c.oldest_enqueued_at, exc.oldest_enqueued_at),
                else_=table.c.oldest_enqueued_at)))
    conn.execute(stmt)
