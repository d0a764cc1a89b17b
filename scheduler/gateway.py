"""JobQueue: the one gateway to the queue's database (tenants and adapters live here; jobs,
claims, leases, batches and maintenance in the mixins it is built from)."""
from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Callable
from datetime import datetime

from lorry.scheduler import errors
from lorry.scheduler import queries as q
from lorry.scheduler.batches import BatchOps
from lorry.scheduler.claims import ClaimOps
from lorry.scheduler.connector import STATEMENT_TIMEOUT_S, Connector
from lorry.scheduler.db import naive_utc, utcnow
from lorry.scheduler.files import FileOps
from lorry.scheduler.jobs import JobOps
from lorry.scheduler.leases import LeaseOps
from lorry.scheduler.maintenance import MaintenanceOps
from lorry.scheduler.rows import adapter_info, tenant_info
from lorry.scheduler.types import AdapterInfo, TenantInfo

ADAPTER_STATUSES = ("ready", "pending", "invalid", "disabled")
REVOKED = "!revoked"  # a key_hash no sha256 hex digest equals: the tenant's key is revoked


class JobQueue(JobOps, ClaimOps, LeaseOps, BatchOps, FileOps, MaintenanceOps):
    """Durable job queue on SQLite or PostgreSQL.

    Every statement it runs is in scheduler.queries and goes through its Connector: a
    driver error leaves any method as a typed ``errors`` class (``Unavailable`` and its
    ``ConnectionLost``: the database cannot be reached; ``Retryable``: a transaction aborted
    by a conflict; ``DuplicateKey``), or unchanged when it is none of these.

    Parameters
    ----------
    url : str
        SQLAlchemy URL, ``sqlite:///path`` or ``postgresql+psycopg://...``.
    create : bool, optional
        Run the migrations up to head first (a database a newer Lorry migrated is left as it
        is). Default: True on SQLite (the embedded default), False elsewhere (run
        ``lorry db upgrade``; ``require_migrated`` tells whether it was).
    aging_seconds : float
        A group whose oldest job waited longer is claimed before anything else.
    worker_ttl_seconds : float
        A worker whose last heartbeat/claim is older counts as dead for affinity.
    clock : callable, optional
        Returns the current time (naive UTC or aware); tests pass a fake one.
    snapshot_ttl_seconds : float
        PostgreSQL: how long a worker's claim snapshot is reused, adjusted by its own claims,
        before it is read again (0: read it for every claim). See scheduler.claim_cache.
    statement_timeout_seconds : float
        PostgreSQL: the server cancels a statement running longer (``Unavailable``), and a
        connection whose server sends nothing for longer still (a frozen server: the
        deadline plus as much again, at most 10 s more) is closed (``ConnectionLost``).
        0: no limit.
    """

    def __init__(self, url: str, *, create: bool | None = None, aging_seconds: float = 300.0,
                 worker_ttl_seconds: float = 120.0, backoff_base_s: float = 2.0,
                 backoff_max_s: float = 300.0, clock: Callable[[], datetime] | None = None,
                 snapshot_ttl_seconds: float = 0.5,
                 statement_timeout_seconds: float = STATEMENT_TIMEOUT_S, **engine_kwargs):
        self.url = url
        if not (isinstance(statement_timeout_seconds, (int, float))
                and statement_timeout_seconds >= 0):
            raise ValueError(f"statement_timeout_seconds must be a number >= 0 (0: no limit), "
                             f"got {statement_timeout_seconds!r}")
        if create is None:
            create = url.startswith("sqlite")
        if create:
            from lorry.scheduler.migrate import upgrade_unless_newer
            upgrade_unless_newer(url)
        self.connector = Connector(url, float(statement_timeout_seconds), **engine_kwargs)
        self.engine = self.connector.engine  # for tools and tests that run their own SQL
        if not (isinstance(snapshot_ttl_seconds, (int, float)) and snapshot_ttl_seconds >= 0):
            raise ValueError(f"snapshot_ttl_seconds must be a number >= 0, "
                             f"got {snapshot_ttl_seconds!r}")
        self.snapshot_ttl_seconds = float(snapshot_ttl_seconds)
        self.aging_seconds = aging_seconds
        self.worker_ttl_seconds = worker_ttl_seconds
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self._clock = clock or utcnow

    def now(self) -> datetime:
        return naive_utc(self._clock())

    @classmethod
    def for_settings(cls, settings, **kwargs) -> "JobQueue":
        """The queue of a ``lorry.settings.Settings``: its database_url and statement
        timeout."""
        return cls(settings.database_url,
                   statement_timeout_seconds=settings.database_statement_timeout_seconds,
                   **kwargs)

    def close(self) -> None:
        self.connector.dispose()

    def require_migrated(self) -> None:
        """Raise ``errors.NotMigrated`` when the database is at an older migration than this
        code's newest (or at none): its statements would fail on the columns missing there.
        A newer migration is logged and accepted (``migrate.require_migrated``); raises
        ``errors.Unavailable`` when the database cannot be reached."""
        from lorry.scheduler.migrate import require_migrated

        with self.connector.connect() as conn:
            require_migrated(conn)

    # ---- tenants -------------------------------------------------------------------------
    def create_tenant(self, name: str, weight: float = 1.0,
                      max_queued: int | None = None) -> tuple[TenantInfo, str]:
        """Create a tenant; returns it and its API key (shown once, stored as a sha256)."""
        if not name or not isinstance(name, str):
            raise ValueError(f"tenant name must be a non-empty string, got {name!r}")
        if not (isinstance(weight, (int, float)) and weight > 0):
            raise ValueError(f"tenant weight must be a number > 0, got {weight!r}")
        if max_queued is not None and not (isinstance(max_queued, int) and max_queued >= 0):
            raise ValueError(f"max_queued must be an int >= 0 or None, got {max_queued!r}")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        row = dict(id=f"tenant_{uuid.uuid4().hex}", name=name, key_id=key_id,
                   key_hash=hashlib.sha256(secret.encode()).hexdigest(), weight=float(weight),
                   max_queued=max_queued, served=0.0, created_at=self.now())
        with self.connector.begin() as conn:
            conn.execute(q.INSERT_TENANT, row)
        return tenant_info(_Obj(row)), f"lorry_{key_id}_{secret}"

    def authenticate(self, api_key: str) -> TenantInfo | None:
        """The tenant owning api_key, or None (unknown or malformed key)."""
        parts = api_key.split("_", 2) if isinstance(api_key, str) else []
        if len(parts) != 3 or parts[0] != "lorry":
            return None
        with self.connector.connect() as conn:
            row = conn.execute(q.tenant_by_key_id(parts[1])).first()
        if row is None:
            return None
        digest = hashlib.sha256(parts[2].encode()).hexdigest()
        return tenant_info(row) if hmac.compare_digest(digest, row.key_hash) else None

    def list_tenants(self) -> list[tuple[TenantInfo, bool]]:
        """Every tenant, oldest first, with whether its API key works (False: revoked)."""
        with self.connector.connect() as conn:
            rows = conn.execute(q.ALL_TENANTS).all()
        return [(tenant_info(r), r.key_hash != REVOKED) for r in rows]

    def rotate_key(self, tenant_id: str) -> str:
        """Give the tenant a new API key (returned once); the old key stops working at once.
        Raises ``errors.UnknownTenant``."""
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        self._set_key(tenant_id, key_id, hashlib.sha256(secret.encode()).hexdigest())
        return f"lorry_{key_id}_{secret}"

    def revoke_key(self, tenant_id: str) -> None:
        """The tenant's API key stops working; its jobs, batches and adapters stay (a new key
        from ``rotate_key`` restores access). Raises ``errors.UnknownTenant``."""
        self._set_key(tenant_id, secrets.token_hex(8), REVOKED)

    def _set_key(self, tenant_id: str, key_id: str, key_hash: str) -> None:
        with self.connector.begin() as conn:
            done = conn.execute(q.set_tenant_key(tenant_id, key_id, key_hash)).rowcount
        if not done:
            raise errors.UnknownTenant(f"no tenant {tenant_id!r}")

    def get_tenant(self, tenant_id: str) -> TenantInfo | None:
        with self.connector.connect() as conn:
            row = conn.execute(q.tenant(tenant_id)).first()
        return None if row is None else tenant_info(row)

    # ---- adapters ------------------------------------------------------------------------
    def register_adapter(self, name: str, source: str, *, tenant_id: str | None = None,
                         revision: str | None = None, base_model: str | None = None,
                         rank: int | None = None, status: str = "ready",
                         max_tenant_adapters: int | None = None) -> AdapterInfo:
        """Add an adapter to a tenant's catalog (tenant_id=None: shared by all tenants).
        AdapterLimit when the tenant has max_tenant_adapters of its own already."""
        if not name or not isinstance(name, str) or len(name) > 200:
            raise ValueError(f"adapter name must be a non-empty string of <= 200 chars, "
                             f"got {name!r}")
        if not source or not isinstance(source, str):
            raise ValueError(f"adapter source must be a local path or hub id, got {source!r}")
        if status not in ADAPTER_STATUSES:
            raise ValueError(f"adapter status {status!r} is not one of {ADAPTER_STATUSES}")
        row = dict(name=name, tenant_id=tenant_id, tenant_key=tenant_id or "", source=source,
                   revision=revision, base_model=base_model, rank=rank, status=status,
                   created_at=self.now())
        with self.connector.begin() as conn:
            if tenant_id is not None and conn.execute(
                    q.tenant_exists(tenant_id)).first() is None:
                raise errors.UnknownTenant(f"tenant {tenant_id!r} does not exist")
            taken = conn.execute(q.adapter_id(row["tenant_key"], name)).first()
            if taken is not None:
                owner = f"tenant {tenant_id!r}" if tenant_id else "the shared catalog"
                raise errors.AdapterExists(f"adapter {name!r} already exists in {owner}; "
                                           "delete it first or pick another name")
            if tenant_id is not None and max_tenant_adapters is not None:
                if conn.dialect.name == "postgresql":  # SQLite's writers are serialized
                    conn.execute(q.adapters_lock(tenant_id))
                held = conn.execute(q.own_adapters(tenant_id)).scalar_one()
                if held >= max_tenant_adapters:
                    raise errors.AdapterLimit(
                        f"you have {held} adapters, the most allowed "
                        f"(LORRY_MAX_ADAPTERS_PER_TENANT={max_tenant_adapters}); delete "
                        f"adapters you no longer need (DELETE /v1/adapters/{{name}})")
            new_id = conn.execute(q.INSERT_ADAPTER, row).scalar_one()
        return adapter_info(_Obj(dict(row, id=new_id)))

    def get_adapter(self, name: str, tenant_id: str | None) -> AdapterInfo | None:
        """The tenant's own adapter of that name, else the shared one, else None."""
        with self.connector.connect() as conn:
            rows = conn.execute(q.adapters_named(name, [tenant_id or "", ""])).all()
        rows.sort(key=lambda r: r.tenant_key == "")  # own first
        return adapter_info(rows[0]) if rows else None

    def list_adapters(self, tenant_id: str | None) -> list[AdapterInfo]:
        """The tenant's own adapters and the shared ones, by name."""
        with self.connector.connect() as conn:
            rows = conn.execute(q.visible_adapters(tenant_id or "")).all()
        return [adapter_info(r) for r in rows]

    def delete_adapter(self, name: str, tenant_id: str | None) -> bool:
        """Delete the tenant's own adapter (tenant_id=None: the shared one). Its queued jobs
        fail when claimed, with an error naming the deleted adapter."""
        with self.connector.begin() as conn:
            res = conn.execute(q.delete_adapter(name, tenant_id or ""))
        return res.rowcount > 0


class _Obj:
    """Attribute view of a dict (to reuse the row converters on freshly inserted values)."""

    def __init__(self, d: dict):
        self.__dict__.update(d)
