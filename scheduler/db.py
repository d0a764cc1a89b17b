"""The queue_groups summary kept in step with the jobs it counts, and the queue's time."""
from __future__ import annotations

from datetime import datetime, timezone

from lorry.scheduler import queries
from lorry.scheduler.claim_cache import bump_generation

# Set in a connection's info by a write to queue_groups; the connector bumps the claim
# snapshots' generation again when that connection's transaction is over.
WROTE_GROUPS = "lorry_wrote_queue_groups"


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


def add_to_groups(conn, deltas: dict[tuple[str, int, int], tuple[int, datetime]]) -> None:
    """queue_groups += count per (tenant, adapter, priority); oldest becomes the earlier one.

    Keys are applied in sorted order, the lock order every writer of queue_groups follows.
    """
    if not deltas:
        return
    bump_generation()  # cached claim snapshots of this process are out of date
    conn.info[WROTE_GROUPS] = True  # ... and once more when this transaction is over
    keys = sorted(deltas)
    if conn.dialect.name == "postgresql":
        conn.execute(queries.ADD_TO_GROUPS_PG, dict(
            tenants=[k[0] for k in keys], adapters=[k[1] for k in keys],
            priorities=[k[2] for k in keys], counts=[deltas[k][0] for k in keys],
            oldest=[deltas[k][1] for k in keys]))
        return
    conn.execute(queries.add_to_groups_sqlite([
        dict(tenant_id=k[0], adapter_id=k[1], priority=k[2], queued_count=deltas[k][0],
             oldest_enqueued_at=deltas[k][1]) for k in keys]))
